"""How much can an IDM learn about the action from a corpus, as training grows?

    PYTHONPATH=. python docs/results/identifiability.py --corpus artifacts/experiment/corpus \
        --corpus artifacts/eps/corpus-e0.3 --out artifacts/identifiability --device cuda

The experiment's probe asks what stage 1 learned in a fixed CPU budget. This script asks the
question behind it: how much action information a corpus lets any IDM find, and how fast. Per
corpus, on one device and without Ray (a GPU machine with PyTorch, pyarrow and gymnasium is
enough; lapo_ray.envs imports gymnasium, so carry its wheel there), it trains the supervised
IDM (the probe's ceiling) and the LAPO stage-1 model (the ``--preset``'s IDM + VQ + world model)
on the same triplets, and at each of ``--evals`` steps reads both with the
project's probe (``evaluation.probe.probe_accuracy``) on held-out episodes. Step 0 of the LAPO
model is the untrained floor. A corpus whose ceiling stays at the majority rate however long it
trains cannot show a probe gap, whatever stage 1 does. Both models train at the preset's stage-1
learning rate, constant (no warm-up or decay), on uniformly drawn batches of the other episodes.

Writes ``<out>/<corpus name>.json`` (rewritten after every evaluation; ``"finished"`` says whether
the run got to the last step; a finished corpus is skipped on a rerun) and ``<out>/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from lapo_ray import storage
from lapo_ray.config import PRETRAIN_PRESETS, ProbeConfig
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.triplets import iter_plain_batches
from lapo_ray.envs import NUM_ACTIONS
from lapo_ray.evaluation.probe import encode_in_batches, episode_split, majority_rate, probe_accuracy
from lapo_ray.models import LatentDynamics, SupervisedIDM
from lapo_ray.train.recipes import random_shift


def load_triplets(corpus: str, max_frames: int | None = None) -> dict[str, np.ndarray]:
    """Every labelled triplet of the corpus's shards that are on disk (all of them, or the first
    ones up to ``max_frames`` frames; a copy may hold only some of its manifest's shards)."""
    src = CorpusSource(corpus)
    files, frames = [], 0
    for shard in src.manifest.shards:
        uri = storage.join(src.uri, shard.path)
        if storage.exists(uri) and not (max_frames and frames >= max_frames):
            files.append(uri)
            frames += shard.frames
    if not files:
        raise FileNotFoundError(f"{corpus}: none of its manifest's shards is on disk")
    parts = list(iter_plain_batches(src, "all", 4096, files=files))
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("frames", "action", "episode_id")}
    keep = out["action"] >= 0
    return {k: v[keep] for k, v in out.items()}


def probe(features: np.ndarray, data: dict[str, np.ndarray], test_mask: np.ndarray, cfg: ProbeConfig) -> dict:
    r = probe_accuracy(features, data["action"], test_mask, cfg, episode_ids=data["episode_id"])
    return {k: r[k] for k in ("probe_acc", "probe_info_bits", "best_epoch", "n_test")}


def write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def run_corpus(corpus: str, args, device: torch.device, path: str) -> dict:
    data = load_triplets(corpus, max_frames=args.max_frames)
    held = episode_split(data["episode_id"], args.probe_share, seed=99)
    train_idx = np.flatnonzero(~held)
    probe_idx = np.flatnonzero(held)[: args.probe_triplets]
    pdata = {k: v[probe_idx] for k, v in data.items()}
    test_mask = episode_split(pdata["episode_id"], 0.5, seed=1234)
    frames = torch.from_numpy(data["frames"][train_idx]).to(device)
    actions = torch.from_numpy(data["action"][train_idx]).to(device)
    pframes = pdata["frames"]
    cfg = PRETRAIN_PRESETS[args.preset]()
    pcfg = ProbeConfig()
    result = {"corpus": corpus, "n_train": len(train_idx), "n_probe": len(probe_idx),
              "majority": majority_rate(pdata["action"], test_mask),
              "action_share": np.bincount(data["action"], minlength=15).tolist(),
              "preset": args.preset, "batch": args.batch, "evals": {}}
    torch.manual_seed(0)
    models = {"ceiling": SupervisedIDM(cfg.model, NUM_ACTIONS).to(device),
              "lapo": LatentDynamics(cfg.model).to(device)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=cfg.stage1.lr, weight_decay=cfg.stage1.weight_decay)
            for k, m in models.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    evals, started = sorted(set(args.evals)), time.monotonic()
    for step in range(max(evals) + 1):
        if step in evals:
            row = {}
            for name, m in models.items():
                m.eval()
                with torch.no_grad():
                    enc = (lambda f: m.features(f.to(device)).float().cpu()) if name == "ceiling" else \
                          (lambda f: m.encode(f.to(device))[0].float().cpu())
                    feats = encode_in_batches(enc, pframes)
                row[name] = probe(feats, pdata, test_mask, pcfg)
                m.train()
            c, l = row["ceiling"]["probe_acc"], row["lapo"]["probe_acc"]
            result["evals"][step] = row
            result["seconds"], result["finished"] = round(time.monotonic() - started, 1), step == max(evals)
            write_json(path, result)
            rate = step / max(time.monotonic() - started, 1e-9)
            print(f"{os.path.basename(corpus)} step {step}: ceiling {c:.3f} ({row['ceiling']['probe_info_bits']:.3f} b) "
                  f"lapo {l:.3f} ({row['lapo']['probe_info_bits']:.3f} b) majority {result['majority']:.3f} "
                  f"| {rate:.0f} steps/s | ETA {(max(evals) - step) / rate if rate else float('nan'):.0f} s", flush=True)
        if step == max(evals):
            break
        idx = torch.randint(0, len(frames), (args.batch,), device=device, generator=gen)
        batch = random_shift(frames[idx], 4) if args.shift else frames[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ce = torch.nn.functional.cross_entropy(models["ceiling"](batch).float(), actions[idx])
            lapo_loss = models["lapo"](batch)["loss"]
        for name, loss in (("ceiling", ce), ("lapo", lapo_loss)):
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[name].parameters(), cfg.stage1.grad_clip)
            opts[name].step()
    return result


def plot(results: list[dict], path: str) -> None:
    from lapo_ray.evaluation.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r, color in zip(results, ("C0", "C1", "C2", "C3")):
        steps = sorted(int(s) for s in r["evals"])
        name = os.path.basename(r["corpus"].rstrip("/"))
        for ax, key in zip(axes, ("probe_acc", "probe_info_bits")):
            for model, style in (("ceiling", "--"), ("lapo", "-")):
                ax.plot(steps, [r["evals"][str(s)][model][key] for s in steps], style, color=color, marker="o",
                        label=f"{name} {model}")
        axes[0].axhline(r["majority"], color=color, lw=0.8, ls=":")
    axes[0].set(xlabel="training steps", ylabel="probe accuracy (dotted: majority)")
    axes[1].set(xlabel="training steps", ylabel="action information (bits)")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=500)
        ax.set_xlim(left=0)
    axes[1].legend(fontsize=7)
    fig.suptitle("What an IDM can learn about the action, by corpus and training steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", action="append", required=True, help="a lapo_ray corpus folder (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="cpu", choices=sorted(PRETRAIN_PRESETS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--evals", type=lambda s: [int(x) for x in s.split(",")], default=[0, 250, 1000, 4000, 12000])
    p.add_argument("--shift", action="store_true", help="random-shift augmentation (the experiment preset's)")
    p.add_argument("--probe-share", type=float, default=0.25, help="share of episodes held out for the probe")
    p.add_argument("--probe-triplets", type=int, default=20_000)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--plot-only", action="store_true", help="plot the JSONs already in --out; train nothing")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    results = []
    for corpus in args.corpus:
        path = os.path.join(args.out, os.path.basename(corpus.rstrip("/")) + ".json")
        done = os.path.exists(path) and json.load(open(path)).get("finished")
        if not done and not args.plot_only:
            run_corpus(corpus, args, device, path)
        with open(path) as f:
            results.append(json.load(f))
    plot(results, os.path.join(args.out, "curves.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
