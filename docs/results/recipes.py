"""Stage-1 recipe options measured with the project's probe on three games at equal budget.

    PYTHONPATH=. python docs/results/recipes.py --out artifacts/recipes

Per game: one sticky-random corpus (the project's collection), the ceiling (supervised IDM) and
floor (untrained IDM) trained or drawn once, then for each recipe config a stage 1 of the same
steps and batch and ``probe_references``. One JSON per (game, config) under ``--out``; a run
whose JSON exists is skipped, so the script resumes where it stopped. The table goes to
``--table`` (docs/results/recipes.md) after every run, so a partial table is always there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

GAMES = ("coinrun", "ninja", "jumper")

# name -> stage-1 / model overrides. Order is priority: the first three on every game first.
CONFIGS = {
    "baseline": {},
    "labels512": {"stage1.action_labels": 512, "stage1.action_label_weight": 1.0},
    # Weight 1 let the label loss (~2 nats against a world-model MSE of ~0.02) take over the
    # clipped gradient on coinrun; 0.02 puts the two on one scale.
    "labels512w002": {"stage1.action_labels": 512, "stage1.action_label_weight": 0.02},
    "change5": {"stage1.change_weight": 5.0},
    "shift4": {"stage1.augment": "shift", "stage1.shift_pad": 4},
    "novq": {"model.vq.enabled": False},
    "offset2": {"model.frame_offset": 2},
}
PRIORITY = [(g, c) for g in GAMES for c in ("baseline", "labels512w002", "change5")]
PRIORITY += [("coinrun", "labels512"), ("coinrun", "shift4"), ("coinrun", "novq")]
PRIORITY += [(g, c) for g in GAMES[1:] for c in ("labels512", "shift4", "novq")]
PRIORITY += [(g, "offset2") for g in GAMES]


def base_config(args, game: str, name: str):
    from lapo_ray.config import cpu_pretrain
    from lapo_ray.config.cli import apply_overrides

    cfg = cpu_pretrain()
    cfg.out = os.path.join(args.out, game, name)
    cfg.corpus = os.path.join(args.out, game, "corpus")
    cfg.stages = "stage1"
    cfg.stage1.steps, cfg.stage1.batch_size = args.steps, args.batch
    cfg.stage1.report_every, cfg.stage1.checkpoint_every = 100, args.steps
    cfg.stage1.seed = args.seed
    # A larger validation split gives the probe more held-out episodes; the same for every run.
    cfg.data.val_fraction = 0.2
    cfg.probe.during_training = 0  # the final probe only: the budget goes to training
    cfg.wandb.mode = "disabled"
    return apply_overrides(cfg, CONFIGS[name])


def collect_corpus(args, game: str) -> None:
    from lapo_ray import storage
    from lapo_ray.config import CollectConfig
    from lapo_ray.data.collect import collect

    out = os.path.join(args.out, game, "corpus")
    if storage.exists(os.path.join(out, "manifest.json")):
        return
    print(f"[recipes] collecting {args.frames} frames of {game}", flush=True)
    collect(CollectConfig(out=out, game=game, frames=args.frames, seed=args.seed))


def run_one(args, game: str, name: str) -> dict | None:
    from lapo_ray.train.pretrain import run_pretrain

    result = os.path.join(args.out, game, f"{name}.json")
    if os.path.exists(result):
        return json.load(open(result))
    collect_corpus(args, game)
    cfg = base_config(args, game, name)
    # The ceiling is trained once per game (in the first run) and copied: train_ceiling skips
    # a finished run it finds in the artifact folder, and every config has the same steps.
    for other in CONFIGS:
        src = os.path.join(args.out, game, other, "ceiling")
        dst = os.path.join(cfg.out, "ceiling")
        if other != name and os.path.isdir(src) and not os.path.exists(dst):
            shutil.copytree(src, dst)
            break
    t0 = time.monotonic()
    print(f"[recipes] {game} / {name}: stage 1 {args.steps} steps at batch {args.batch}", flush=True)
    summary = run_pretrain(cfg)
    probe = summary.get("probe")
    if probe is None:
        print(f"[recipes] {game} / {name}: no probe", flush=True)
        return None
    from lapo_ray.experiment import versions

    commit = versions()["lapo_ray_commit"][:7]
    row = {"game": game, "config": name, "overrides": CONFIGS[name], "steps": args.steps, "batch": args.batch,
           "frames": args.frames, "seconds": round(time.monotonic() - t0, 1), "commit": commit,
           "stage1_train_seconds": summary.get("stage1", {}).get("train_seconds"),
           "probe": {k: v for k, v in probe.items() if not k.endswith("_detail")}}
    with open(result + ".tmp", "w") as f:
        json.dump(row, f, indent=2)
    os.replace(result + ".tmp", result)
    p = row["probe"]
    print(f"[recipes] {game} / {name}: probe {p['probe_acc']:.3f} floor {p['floor_untrained_idm']:.3f} "
          f"ceiling {p.get('ceiling_supervised_idm', float('nan')):.3f} gap {p.get('gap_closed')} "
          f"in {row['seconds']:.0f}s", flush=True)
    return row


def _f(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def write_table(args) -> None:
    rows, missing = [], []
    for game in GAMES:
        for name in CONFIGS:
            path = os.path.join(args.out, game, f"{name}.json")
            if os.path.exists(path):
                rows.append(json.load(open(path)))
            else:
                missing.append(f"{game}/{name}")
    lines = ["# Stage-1 recipe options on three games", "",
             f"Made by `PYTHONPATH=. python docs/results/recipes.py --out {args.out} --steps {args.steps} "
             f"--batch {args.batch} --frames {args.frames}` (see the script's docstring; what the options "
             "are and where they come from: docs/recipes.md).", "",
             f"Equal budget for every row: the cpu preset, stage 1 for {args.steps} steps at batch {args.batch} "
             f"on a {args.frames}-frame sticky-random corpus per game (20% of the episodes held out), seed "
             f"{args.seed}, one run each (no repeats: differences of a few points are within run-to-run noise). "
             "The probe is `probe_references`: an MLP on the IDM's continuous latent, trained on half of the "
             "held-out episodes with early stopping and tested on the other half. Floor: the same probe on "
             "the untrained IDM; ceiling: on the latent layer of an IDM trained on the true actions for the "
             "same steps. NMI: code-action normalised mutual information (chance-corrected); n/a without VQ.",
             "", "| game | config | probe acc | floor | ceiling | gap closed | NMI trained | NMI untrained | "
             "majority | stage-1 s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["probe"]
        lines.append(f"| {r['game']} | {r['config']} | {_f(p['probe_acc'])} | {_f(p['floor_untrained_idm'])} | "
                     f"{_f(p.get('ceiling_supervised_idm'))} | {_f(p.get('gap_closed'), '.2f')} | "
                     f"{_f(p.get('nmi_trained'))} | {_f(p.get('nmi_untrained'))} | {_f(p.get('majority_rate'))} | "
                     f"{_f(r.get('stage1_train_seconds'), '.0f')} |")
    lines += ["", "Configs: " + "; ".join(f"`{k}` = {v or 'the cpu preset as is'}" for k, v in CONFIGS.items())]
    # A row is measured with the code of its commit: a recipe whose code changed is rerun alone.
    by_commit: dict[str, list[str]] = {}
    for r in rows:
        by_commit.setdefault(r.get("commit") or "not recorded (2026-11-26)", []).append(f"{r['game']}/{r['config']}")
    lines += ["", "Measured at commit: " + "; ".join(f"{c}: {len(v)} rows" + (f" ({', '.join(v)})" if len(v) < 10 else "")
                                               for c, v in by_commit.items()) + "."]
    if missing:
        lines += ["", f"**Not measured (time box): {', '.join(missing)}.**"]
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/recipes")
    ap.add_argument("--table", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes.md"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=30_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma list of game/config to run (default: all, by priority)")
    args = ap.parse_args(argv)

    from lapo_ray.runtime import init_ray

    init_ray()
    todo = [tuple(x.split("/")) for x in args.only.split(",") if x] or PRIORITY
    for i, (game, name) in enumerate(todo):
        print(f"[recipes] {i + 1}/{len(todo)} {game} / {name}", flush=True)
        run_one(args, game, name)
        write_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
