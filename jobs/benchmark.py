"""Throughput benchmarks.

    python jobs/benchmark.py data      # Ray Data triplet pipeline vs a plain numpy reader
    python jobs/benchmark.py stage1    # Ray Train stage 1 (1 and 2 workers) vs a plain PyTorch loop
    python jobs/benchmark.py stage1 --raw --device cuda   # the step alone (no Ray): samples/s, MFU
    python jobs/benchmark.py envrunners  # RLlib env steps/s with 1 and 2 env runners vs the raw env
    python jobs/benchmark.py stream    # a corpus 3x the object store through stage 1: memory, spill, triplets/s
    python jobs/benchmark.py label     # latent labelling rows/s with 1, 2 and 4 actors
"""

import argparse
import json
import sys



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray instance (pin the process with taskset to match)")
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="triplets/s of the Ray Data pipeline and of a plain reader")
    d.add_argument("--corpus", default="data/bench-corpus", help="collected if missing")
    d.add_argument("--frames", type=int, default=200_000)
    d.add_argument("--batch-size", type=int, default=128)
    s = sub.add_parser("stage1", help="stage-1 samples/s: Ray Train (1, 2 workers) vs plain loop")
    s.add_argument("--corpus", default="data/bench-corpus")
    s.add_argument("--preset", choices=["cpu", "paper"], default="cpu")
    s.add_argument("--steps", type=int, default=None, help="default 200 (Ray), 50 timed steps (--raw)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every mode")
    s.add_argument("--raw", action="store_true",
                   help="time the training step alone on random triplets already on --device; no Ray, no corpus")
    s.add_argument("--device", default="cpu", help="--raw: cpu, cuda, cuda:1, ...")
    s.add_argument("--batch-sizes", default="64,128,256", help="--raw: comma list")
    s.add_argument("--precisions", default="fp32,bf16", help="--raw: comma list of fp32, bf16")
    s.add_argument("--warmup", type=int, default=10, help="--raw: untimed steps first (compilation included)")
    s.add_argument("--compile", action="store_true", help="--raw: torch.compile the model")
    s.add_argument("--compile-mode", default="default", help="--raw: default, reduce-overhead (CUDA graphs), ...")
    s.add_argument("--threads", type=int, default=None, help="--raw: torch intra-op threads (default: torch's)")
    s.add_argument("--peak-tflops", type=float, default=None,
                   help="--raw: the device's peak for MFU (known GPUs are looked up; CPUs print n/a)")
    e = sub.add_parser("envrunners", help="env steps/s: RLlib PPO with 1 and 2 env runners vs the raw vector env")
    e.add_argument("--envs-per-runner", type=int, default=16)
    e.add_argument("--rollout-length", type=int, default=64)
    e.add_argument("--iterations", type=int, default=4)
    e.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of 1 and 2 runners")
    e.add_argument("--epochs", type=int, default=None, help="PPO epochs per iteration (default: the cpu preset's)")
    e.add_argument("--cpus", type=int, default=None,
                   help="split this many CPUs evenly over the runners (default: the cpu preset's 0.5 each)")
    st = sub.add_parser("stream", help="one epoch of a corpus larger than the object store through stage 1: "
                                       "peak memory of every process, spilled bytes, triplets/s")
    st.add_argument("--corpus", default="data/stream-corpus",
                    help="written as noise (incompressible frames) at --store-factor x the store if missing")
    st.add_argument("--object-store-mb", type=int, default=100, help="object store of the local Ray instance")
    st.add_argument("--store-factor", type=float, default=3.0, help="corpus size over the object store's")
    st.add_argument("--batch-size", type=int, default=256)
    st.add_argument("--model", choices=["none", "cpu"], default="none",
                    help="none: a one-parameter stand-in (the data path at full speed); cpu: the cpu-preset stage-1 "
                    "model (~100-200 triplets/s here, an epoch takes minutes)")
    st.add_argument("--workers", type=int, default=1)
    st.add_argument("--block-mb", type=float, default=0.0, help="Ray Data target block size (0: Ray's default)")
    st.add_argument("--local-shuffle-buffer", type=int, default=2048)
    st.add_argument("--consumer", choices=["train", "task"], default="train",
                    help="train: the stage loop on Ray Train; task: one Ray task reading the same split, "
                    "without Ray Train's start-up")
    st.add_argument("--prefetch-blocks", type=int, default=None,
                    help="blocks of segments each worker fetches ahead (default: the cpu preset's)")
    lb = sub.add_parser("label", help="latent labelling rows/s with 1, 2 and 4 actors (fractional CPUs)")
    lb.add_argument("--corpus", default="data/label-corpus", help="written as noise if missing")
    lb.add_argument("--frames", type=int, default=16_384)
    lb.add_argument("--actors", default="1,2,4", help="comma list")
    args = parser.parse_args(argv)
    if args.what == "stage1" and args.raw:
        # Before anything of Ray is imported: this mode runs where PyTorch is all there is.
        import torch

        from lapo_ray.train.speed import bench_step, format_rows

        if args.threads:
            torch.set_num_threads(args.threads)
        r = bench_step(args.preset, args.device, [int(b) for b in args.batch_sizes.split(",")],
                       args.precisions.split(","), args.steps or 50, args.warmup, args.compile,
                       args.compile_mode, args.peak_tflops)
        print(json.dumps(r, indent=2))
        print()
        print(format_rows(r))
        return 0
    from lapo_ray.runtime import init_ray

    init_ray(args.num_cpus, object_store_memory=args.object_store_mb * 2**20 if args.what == "stream" else None)
    if args.what == "stream":
        from lapo_ray.benchmarks import bench_stream, format_processes

        r = bench_stream(args.corpus, args.store_factor, args.batch_size, args.model, args.workers,
                         block_mb=args.block_mb, local_shuffle_buffer=args.local_shuffle_buffer,
                         prefetch_blocks=args.prefetch_blocks, consumer=args.consumer)
        procs = r.pop("processes")
        print(json.dumps(r, indent=2))
        mib = 2**20
        print(f"\ncorpus {r['corpus_frames']:,} frames: {r['corpus_decoded_bytes'] / mib:,.0f} MiB of frames "
              f"({r['corpus_disk_bytes'] / mib:,.0f} MiB on disk) = {r['corpus_over_store']:.1f} x the object store "
              f"({r['object_store_bytes'] / mib:,.0f} MiB)")
        print(f"one epoch through {'stage 1' if r['consumer'] == 'train' else 'a Ray task'} ({r['model']} model, "
              f"{r['workers']} worker(s), batch {r['batch_size']}): "
              f"{r['triplets_streamed']:,} triplets, {r['triplets_per_s_steady_median']:,.0f} triplets/s (median "
              f"report window), {r['triplets_per_s_wall']:,.0f}/s over the whole run with Ray Train's start; "
              f"data wait {100 * r['data_wait_frac']:.0f}%")
        print(f"object store: {r['spilled_bytes'] / mib:,.0f} MiB spilled to disk, "
              f"{r['restored_bytes'] / mib:,.0f} MiB restored; at most {r['peak_store_used_bytes'] / mib:,.0f} MiB in use "
              f"and {r['peak_fallback_bytes'] / mib:,.0f} MiB past the cap (sampled each second)")
        print(f"peak RSS: largest process {r['peak_rss_max'] / mib:,.0f} MiB; all {len(procs)} processes together "
              f"{r['peak_rss_sum'] / mib:,.0f} MiB (object-store pages counted once per process that touched them), "
              f"private {r['peak_anon_sum'] / mib:,.0f} MiB")
        print(f"loaded whole (the official code's way): {r['whole_corpus_in_memory_bytes'] / mib:,.0f} MiB of "
              "frames in one process, before any batch")
        print(format_processes(procs, most=len(procs)))
        return 0
    if args.what == "label":
        from lapo_ray.benchmarks import bench_label

        r = bench_label(args.corpus, tuple(int(a) for a in args.actors.split(",")), args.frames)
        print(json.dumps(r, indent=2))
        print(f"\nlabelling {r['corpus_triplets']:,} steps in {r['files']} files on {r['cpus']:g} CPUs")
        for key, x in r.items():
            if key.startswith("actors_"):
                print(f"{key.removeprefix('actors_')} actor(s) x {x['cpus_per_actor']:.2g} CPU: "
                      f"{x['rows_per_s']:,.0f} steps/s ({x['wall_seconds']:.1f} s with the actors' start)")
        return 0
    if args.what == "data":
        from lapo_ray.benchmarks import bench_data

        r = bench_data(args.corpus, args.frames, args.batch_size)
        print(json.dumps(r, indent=2))
        plain = r["plain"]["triplets_per_s"]
        print(f"\n{r['corpus_frames']:,}-frame corpus, batches of {r['batch_size']}")
        print(f"plain numpy reader: {plain:,.0f} triplets/s")
        for mode in ("files", "none", "segments"):
            x = r[f"ray_{mode}"]
            print(f"Ray Data pipeline (global shuffle={mode}): {x['triplets_per_s']:,.0f} triplets/s "
                  f"= {x['triplets_per_s'] / plain:.2f} x plain (steady {x['steady_triplets_per_s']:,.0f}/s "
                  f"after a first batch at {x['first_batch_s']:.1f} s)")
    elif args.what == "envrunners":
        from lapo_ray.benchmarks import bench_env_runners

        r = bench_env_runners(args.envs_per_runner, args.rollout_length, args.iterations, cpus=args.cpus,
                              rounds=args.rounds, num_epochs=args.epochs)
        print(json.dumps(r, indent=2))
        raw = r["raw_vector_env_steps_per_s"]
        print(f"\nProcgen vector env alone ({r['envs_per_runner']} envs, random actions): {raw:,.0f} steps/s (ceiling)")
        for n in (1, 2):
            x = r[f"rllib_{n}_runners"]
            print(f"RLlib PPO, {n} env runner(s) x {r['envs_per_runner']} envs: sampling "
                  f"{x['sampling_env_steps_per_s']:,.0f} steps/s (median iteration "
                  f"{x['sampling_env_steps_per_s_median']:,.0f}) ({x['sampling_env_steps_per_s'] / raw:.2f} x raw), "
                  f"whole iteration incl. learning {x['iteration_env_steps_per_s']:,.0f} steps/s; per iteration "
                  f"sample {', '.join(f'{t:.2f}' for t in x['sample_seconds'])} s, "
                  f"learn {', '.join(f'{t:.2f}' for t in x['learn_seconds'])} s "
                  f"({x['cpus_per_env_runner']:g} CPU per runner)")
    else:
        from lapo_ray.benchmarks import bench_stage1

        if args.device != "cpu":
            parser.error("stage1 through Ray Train runs on CPUs here; use --raw for --device")
        r = bench_stage1(args.corpus, args.preset, args.steps or 200, args.batch_size, rounds=args.rounds)
        print(json.dumps({k: v for k, v in r.items() if k != "window_samples_per_s"}, indent=2))
        plain = r["plain"]["median"]
        print(f"\nstage 1, {r['preset']} preset, batch {r['batch_size']}, {r['precision']}; median (quartiles) of "
              f"{r['window']}-step windows over {r['rounds']} interleaved rounds")
        print(f"plain PyTorch loop (no Ray):  {plain:8.1f} samples/s ({r['plain']['q1']:.0f}-{r['plain']['q3']:.0f})")
        for w in (1, 2):
            x = r[f"ray_{w}w"]
            print(f"Ray Train, {w} worker(s):      {x['median']:8.1f} samples/s ({x['q1']:.0f}-{x['q3']:.0f}) "
                  f"= {x['median'] / plain:.2f} x plain (data wait {100 * x['data_wait_frac']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
