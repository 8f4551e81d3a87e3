"""Throughput benchmarks.

    python jobs/benchmark.py data      # Ray Data triplet pipeline vs a plain numpy reader
    python jobs/benchmark.py stage1    # Ray Train stage 1 (1 and 2 workers) vs a plain PyTorch loop
    python jobs/benchmark.py stage1 --raw --device cuda   # the step alone (no Ray): samples/s, MFU
    python jobs/benchmark.py envrunners  # RLlib env steps/s with 1 and 2 env runners vs the raw env
    python jobs/benchmark.py stream    # a corpus 3x the object store through stage 1: memory, spill, triplets/s
    python jobs/benchmark.py label     # latent labelling rows/s with 1, 2 and 4 actors
    python jobs/benchmark.py label --corpus data/label-videos   # the same on a folder of videos (decoding included)
"""

import argparse
import json
import sys


def add_data(sub) -> None:
    d = sub.add_parser("data", help="triplets/s of the Ray Data pipeline and of a plain reader")
    d.add_argument("--corpus", default="data/bench-corpus", help="collected if missing")
    d.add_argument("--frames", type=int, default=200_000)
    d.add_argument("--batch-size", type=int, default=128)


def add_stage1(sub) -> None:
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


def add_envrunners(sub) -> None:
    e = sub.add_parser("envrunners", help="env steps/s: RLlib PPO with 1 and 2 env runners vs the raw vector env")
    e.add_argument("--envs-per-runner", type=int, default=16)
    e.add_argument("--rollout-length", type=int, default=64)
    e.add_argument("--iterations", type=int, default=4)
    e.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of 1 and 2 runners")
    e.add_argument("--epochs", type=int, default=None, help="PPO epochs per iteration (default: the cpu preset's)")
    e.add_argument("--cpus", type=int, default=None,
                   help="split this many CPUs evenly over the runners (default: the cpu preset's 0.5 each)")


def add_stream(sub) -> None:
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


def add_label(sub) -> None:
    lb = sub.add_parser("label", help="latent labelling rows/s with 1, 2 and 4 actors (fractional CPUs)")
    lb.add_argument("--corpus", default="data/label-corpus",
                    help="a corpus, video folder or LAPO npz folder; a missing one is written as a noise corpus")
    lb.add_argument("--frames", type=int, default=16_384)
    lb.add_argument("--actors", default="1,2,4", help="comma list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray instance (pin the process with taskset to match)")
    sub = parser.add_subparsers(dest="what", required=True)
    for add in (add_data, add_stage1, add_envrunners, add_stream, add_label):
        add(sub)
    return parser


def run_raw_step(args) -> None:
    # Nothing of Ray is imported on this path: it runs where PyTorch is all there is.
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


def run_data(args) -> None:
    from lapo_ray.benchmarks import bench_data, report_data

    print(report_data(bench_data(args.corpus, args.frames, args.batch_size)))


def run_stage1(args) -> None:
    from lapo_ray.benchmarks import bench_stage1, report_stage1

    print(report_stage1(bench_stage1(args.corpus, args.preset, args.steps or 200, args.batch_size,
                                     rounds=args.rounds)))


def run_envrunners(args) -> None:
    from lapo_ray.benchmarks import bench_env_runners, report_env_runners

    print(report_env_runners(bench_env_runners(args.envs_per_runner, args.rollout_length, args.iterations,
                                               cpus=args.cpus, rounds=args.rounds, num_epochs=args.epochs)))


def run_stream(args) -> None:
    from lapo_ray.benchmarks import bench_stream, report_stream

    print(report_stream(bench_stream(args.corpus, args.store_factor, args.batch_size, args.model, args.workers,
                                     block_mb=args.block_mb, local_shuffle_buffer=args.local_shuffle_buffer,
                                     prefetch_blocks=args.prefetch_blocks, consumer=args.consumer)))


def run_label(args) -> None:
    from lapo_ray.benchmarks import bench_label, report_label

    print(report_label(bench_label(args.corpus, tuple(int(a) for a in args.actors.split(",")), args.frames)))


RUNS = {"data": run_data, "stage1": run_stage1, "envrunners": run_envrunners, "stream": run_stream,
        "label": run_label}


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, parsed only: nothing runs."""
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "stage1" and args.raw:
        run_raw_step(args)
        return 0
    if args.what == "stage1" and args.device != "cpu":
        parser.error("stage1 through Ray Train runs on CPUs here; use --raw for --device")
    from lapo_ray.runtime import init_ray

    init_ray(args.num_cpus, object_store_memory=args.object_store_mb * 2**20 if args.what == "stream" else None)
    RUNS[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
