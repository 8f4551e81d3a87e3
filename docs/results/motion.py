"""What does a stage-1 latent carry: the action, or the camera's motion? On held-out episodes.

    PYTHONPATH=. python docs/results/motion.py --run artifacts/experiment/pretrain \
        --corpus artifacts/experiment/corpus --name experiment

In CoinRun the camera follows the agent, so the frame moves by the agent's velocity. For each
sampled validation triplet (o[t-1], o[t], o[t+1]) this estimates the camera's shift between
consecutive frames (the integer (dx, dy) in [-6, 6]^2 that best aligns the grey frames, the
estimate stage 1's ``--stage1.change-baseline camera`` uses) and asks of the run's trained IDM:

- how much its world model leans on the latent: prediction error with the true latent, with the
  latent of another triplet (shuffled) and the copy-last-frame baseline, and where in the frame
  the latent's gain lies (plotted);
- what an MLP reads from the latent (fit on half of the episodes, scored on the other half): the
  shift o[t] -> o[t+1] (R^2), the previous shift o[t-1] -> o[t], their difference (the
  acceleration, which is what an action changes), and the action itself, beside the action read
  from the two shifts alone and the majority rate.

No Ray and no training beyond the small read-out MLPs: a few minutes on 2 cores. Writes
``<out>/motion-<name>.json`` and ``.png``; prints a Markdown row for docs/results/motion.md.

Without ``--run`` it screens a corpus before any training (about a minute): on triplets from
all its episodes, how well the camera's two shifts name the action against the majority rate.
That lift is what reconstruction can give a latent on a camera-follow game.

    PYTHONPATH=. python docs/results/motion.py --corpus artifacts/candidate/corpus --name candidate

With ``--through-probe`` it also puts the camera's two shifts through the run's own probe, on the
very triplets of its probe.json (same split, same halves, same early stopping), so the share of
the floor-to-ceiling gap that the motion alone closes sits beside the latent's. Slower: the
shifts of about 20k triplets take a few minutes. With ``--agent`` (the corpus's demonstrator)
the same probe also reads the demonstrator's action logits on o[t] alone: what the state, with
no look at o[t+1], tells about the action pressed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
import torch

def sample_triplets(corpus: str, val_episodes: set[int], n: int, seed: int = 0):
    """About ``n`` triplets of the validation episodes, sampled uniformly, with their actions."""
    import pyarrow.parquet as pq

    from lapo_ray.data.corpus import decode_frames

    rows = []
    for f in sorted(glob.glob(os.path.join(corpus, "shards", "*.parquet"))):
        t = pq.read_table(f, columns=["episode_id", "num_frames", "frames", "actions"])
        rows += [r for r in t.to_pylist() if r["episode_id"] in val_episodes]
    total = sum(r["num_frames"] - 2 for r in rows)
    if total <= 0:
        raise ValueError(f"{corpus}: no triplets in the run's validation episodes")
    rng = np.random.default_rng(seed)
    keep = min(1.0, n / total)
    frames, actions, episodes = [], [], []
    for r in rows:
        fr = decode_frames(r["frames"], r["num_frames"], (64, 64, 3))
        for i in np.flatnonzero(rng.random(r["num_frames"] - 2) < keep) + 1:
            frames.append(fr[i - 1:i + 2])
            actions.append(r["actions"][i])
            episodes.append(r["episode_id"])
    return np.stack(frames), np.asarray(actions, np.int64), np.asarray(episodes, np.int64)


def two_shifts(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per uint8 triplet (N, 3, H, W, C), the camera's shifts o[t-1] -> o[t] and o[t] -> o[t+1]
    as (dx, dy) rows: the estimate stage 1's camera baseline uses (train/recipes.camera_shifts)."""
    from lapo_ray.models.impala import frames_to_input
    from lapo_ray.train.recipes import camera_shifts

    prev, nxt = [], []
    for chunk in torch.from_numpy(frames).split(512):
        x = frames_to_input(chunk)
        prev.append(torch.stack(camera_shifts(x[:, 0], x[:, 1]), 1))
        nxt.append(torch.stack(camera_shifts(x[:, 1], x[:, 2]), 1))
    return torch.cat(prev).float().numpy(), torch.cat(nxt).float().numpy()


def readout(x: np.ndarray, y: np.ndarray, test: np.ndarray, classify: bool, seed: int = 0) -> float:
    """Test score of a one-hidden-layer MLP fit on ``~test``: accuracy, or R^2 averaged over y's
    columns. Early-stopped on the test half's best epoch, so an upper bound for both sides alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(x, dtype=torch.float32)
    tr, te = torch.as_tensor(np.flatnonzero(~test)), torch.as_tensor(np.flatnonzero(test))
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    if classify:
        yt = torch.as_tensor(y, dtype=torch.long)
        out = int(y.max()) + 1
    else:
        yt = torch.tensor(y, dtype=torch.float32)
        yt = (yt - yt[tr].mean(0)) / (yt[tr].std(0) + 1e-6)
        out = yt.shape[1]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, out))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    best = -np.inf
    for _ in range(60):
        for idx in tr[torch.randperm(len(tr), generator=g)].split(128):
            p = net(x[idx])
            loss = (torch.nn.functional.cross_entropy(p, yt[idx]) if classify
                    else ((p - yt[idx]) ** 2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = net(x[te])
            if classify:
                score = (p.argmax(-1) == yt[te]).float().mean().item()
            else:
                score = (1 - ((p - yt[te]) ** 2).mean(0) / yt[te].var(0)).mean().item()
        best = max(best, score)
    return float(best)


@torch.no_grad()
def world_model_use(model, frames: np.ndarray, seed: int = 0) -> dict:
    """Prediction error of o[t+1] with the true latent, a shuffled one, and copying o[t]; the
    per-pixel gain of the true latent over the shuffled one."""
    from lapo_ray.models.impala import frames_to_input, stack_frames

    g = torch.Generator().manual_seed(seed)
    err = {"true": [], "shuffled": [], "copy_last": []}
    gain = torch.zeros(64, 64)
    for chunk in torch.from_numpy(frames).split(256):
        x = frames_to_input(chunk)
        zq = model.idm(stack_frames(x), update_codebook=False)["latent_q"]
        ctx, target = stack_frames(x[:, :2]), x[:, 2]
        e_true = ((model.wm(ctx, zq) - target) ** 2).mean(1)
        e_shuf = ((model.wm(ctx, zq[torch.randperm(len(zq), generator=g)]) - target) ** 2).mean(1)
        err["true"].append(e_true.mean((1, 2)))
        err["shuffled"].append(e_shuf.mean((1, 2)))
        err["copy_last"].append(((x[:, 1] - target) ** 2).mean((1, 2, 3)))
        gain += (e_shuf - e_true).sum(0)
    out = {k: float(torch.cat(v).mean()) for k, v in err.items()}
    gain = (gain / len(frames)).numpy()
    out["gain_share_lower_half"] = float(gain[32:].sum() / gain.sum())
    out["gain_share_centre_quarter"] = float(gain[16:48, 16:48].sum() / gain.sum())
    return out, gain


def ceiling_saliency(run: str, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Where the ceiling (the IDM trained on the true actions) looks: mean |d log p(true action) /
    d pixel| over the triplets, summed over colour, per frame of the triplet: (3, H, W)."""
    from lapo_ray.train.checkpoint import Checkpoint, load_supervised_idm

    ckpt = Checkpoint.latest(os.path.join(run, "ceiling"))
    if ckpt is None:
        raise FileNotFoundError(f"{run}/ceiling: no ceiling checkpoint")
    sup = load_supervised_idm(ckpt.uri).eval()
    total = np.zeros(frames.shape[1:4], np.float64)
    for f, a in zip(torch.from_numpy(frames).split(128), torch.from_numpy(actions).split(128)):
        x = f.float().requires_grad_(True)
        logp = torch.log_softmax(sup.head(sup.features(x)).float(), -1)
        logp.gather(1, a[:, None]).sum().backward()
        total += x.grad.abs().sum(-1).sum(0).numpy()
    return total / len(frames)


def motion_through_probe(args) -> int:
    from lapo_ray.config import PretrainConfig, config_from_dict
    from lapo_ray.evaluation.probe import gap_closed, probe_accuracy, probe_halves
    from lapo_ray.runtime import init_ray
    from lapo_ray.data.triplets import SplitSpec
    from lapo_ray.evaluation.references import encode_probe_triplets
    from lapo_ray.pipelines.pretrain import open_corpus

    cfg = config_from_dict(PretrainConfig, json.load(open(os.path.join(args.run, "config.json"))))
    # The run's own corpus, wherever it lies now (the README's default job collected into a
    # folder that was moved afterwards).
    cfg.corpus = args.corpus
    ref = json.load(open(os.path.join(args.run, "probe.json")))
    init_ray()
    source = open_corpus(cfg)
    scan = source.scan(on_bad=cfg.data.on_bad_files)
    spec = SplitSpec.from_dict(json.load(open(os.path.join(args.run, "split.json"))))  # the run's own split
    encoders = {"motion": lambda f: {"latent": torch.from_numpy(np.concatenate(two_shifts(f.numpy()), 1))}}
    if args.agent:
        from lapo_ray.rl.decode import agent_logits
        from lapo_ray.rl.evaluate import load_agent

        logits = agent_logits(load_agent(args.agent)[0])
        encoders["state"] = lambda f: {"latent": logits(f[:, 1].contiguous()).float()}
    enc = encode_probe_triplets(source, cfg.data, cfg.probe.triplets, scan.files, spec, encoders,
                                cfg.model.frame_offset)
    actions, episodes = enc["action"], enc["episode_id"]
    test = probe_halves(episodes)
    acc = probe_accuracy(enc["motion/latent"], actions, test, cfg.probe, episode_ids=episodes)["probe_acc"]
    floor, ceiling = ref["floor_untrained_idm"], ref["ceiling_supervised_idm"]
    res = {"run": args.run, "triplets": int(len(actions)), "n_test": int(test.sum()),
           "probe_acc_motion": acc, "probe_acc_latent": ref["probe_acc"], "floor": floor, "ceiling": ceiling,
           "majority_rate": ref["majority_rate"], "gap_closed_motion": gap_closed(acc, floor, ceiling),
           "gap_closed_latent": ref["gap_closed"]}
    if args.agent:
        state = enc["state/latent"]
        res["agent"] = args.agent
        res["demonstrator_argmax_acc"] = float((state[test].argmax(-1) == actions[test]).mean())
        res["probe_acc_state"] = probe_accuracy(state, actions, test, cfg.probe, episode_ids=episodes)["probe_acc"]
        res["gap_closed_state"] = gap_closed(res["probe_acc_state"], floor, ceiling)
        print(f"state alone (the demonstrator's logits on o[t]): probe {res['probe_acc_state']:.3f} "
              f"(gap {res['gap_closed_state']:.2f}), its argmax {res['demonstrator_argmax_acc']:.3f}")
    # Where the action shows, for the ceiling: the agent sits in the frame's centre (the camera
    # follows it), the camera's motion shows everywhere.
    frames, acts, _ = sample_triplets(args.corpus, set(spec.val_episodes), 1000)
    sal = ceiling_saliency(args.run, frames, acts)
    h, w = sal.shape[1:]
    centre = np.zeros((h, w), bool)
    centre[h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8] = True
    res["ceiling_saliency_share_next_frame"] = float(sal[2].sum() / sal.sum())
    res["ceiling_saliency_share_centre_16px_of_next_frame"] = float(sal[2][centre].sum() / sal[2].sum())
    res["centre_area_share"] = float(centre.mean())
    from lapo_ray.evaluation.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, m, t in zip(axes, sal, ("o[t-1]", "o[t]", "o[t+1]")):
        ax.imshow(m, cmap="magma", vmin=0, vmax=sal.max())
        ax.set_title(f"{t}: {m.sum() / sal.sum():.0%} of the saliency", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{args.name}: where the supervised IDM (the ceiling) looks to name the action", fontsize=10)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, f"motion-probe-{args.name}.png"), dpi=110)
    print(f"ceiling saliency: {res['ceiling_saliency_share_next_frame']:.2f} on o[t+1], of which "
          f"{res['ceiling_saliency_share_centre_16px_of_next_frame']:.2f} in the central 16x16 px "
          f"({res['centre_area_share']:.2f} of the area)")
    with open(os.path.join(args.out, f"motion-probe-{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"| {args.name} | {res['triplets']} | {acc:.3f} | {ref['probe_acc']:.3f} | {floor:.3f} | "
          f"{ceiling:.3f} | {res['majority_rate']:.3f} | {res['gap_closed_motion']:.2f} | {res['gap_closed_latent']:.2f} |")
    return 0


def screen(args) -> int:
    """The corpus-only screen: shifts -> action against the majority rate, halves by episode."""
    import pyarrow.parquet as pq

    from lapo_ray.evaluation.probe import probe_halves

    shards = sorted(glob.glob(os.path.join(args.corpus, "shards", "*.parquet")))
    if not shards:
        raise FileNotFoundError(f"{args.corpus}: no shards/*.parquet (is it a corpus folder?)")
    ids = {e for f in shards for e in pq.read_table(f, columns=["episode_id"]).column(0).to_pylist()}
    frames, actions, episodes = sample_triplets(args.corpus, ids, args.triplets)
    v_prev, v_next = two_shifts(frames)
    test = probe_halves(episodes)
    res = {"corpus": args.corpus, "triplets": int(len(frames)), "episodes": int(len(np.unique(episodes))),
           "still_share": float((np.abs(v_next).sum(1) == 0).mean()),
           "acc_shifts_to_action": readout(np.c_[v_prev, v_next], actions, test, True),
           "majority_rate": float(np.bincount(actions[test]).max() / test.sum())}
    res["lift"] = res["acc_shifts_to_action"] - res["majority_rate"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"screen-{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"| {args.name} | {res['triplets']} | {res['episodes']} | {res['still_share']:.2f} | "
          f"{res['acc_shifts_to_action']:.3f} | {res['majority_rate']:.3f} | {res['lift']:+.3f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a pretrain artifact folder (stage1/, split.json); "
                    "without it, screen the corpus alone")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--triplets", type=int, default=4000)
    ap.add_argument("--through-probe", action="store_true",
                    help="with --run: the motion's share of the gap, measured by the run's probe")
    ap.add_argument("--agent", default=None, help="with --through-probe: the demonstrator's agent folder")
    args = ap.parse_args(argv)
    from lapo_ray.evaluation.probe import probe_halves
    from lapo_ray.train.checkpoint import Checkpoint, load_dynamics

    torch.manual_seed(0)
    if args.run is None:
        return screen(args)
    if args.through_probe:
        return motion_through_probe(args)
    latest = Checkpoint.latest(os.path.join(args.run, "stage1"))
    if latest is None:
        raise FileNotFoundError(f"{args.run}/stage1: no stage-1 checkpoint")
    ckpt = latest.uri
    val = set(json.load(open(os.path.join(args.run, "split.json")))["val_episodes"])
    frames, actions, episodes = sample_triplets(args.corpus, val, args.triplets)
    v_prev, v_next = two_shifts(frames)
    model = load_dynamics(ckpt).eval()
    use, gain = world_model_use(model, frames)
    with torch.no_grad():
        z = torch.cat([model.encode(c)[0] for c in torch.from_numpy(frames).split(256)]).float().numpy()
    test = probe_halves(episodes)
    res = {
        "run": args.run, "checkpoint": ckpt, "triplets": int(len(frames)), "episodes": int(len(np.unique(episodes))),
        "still_share": float((np.abs(v_next).sum(1) == 0).mean()),
        "shift_std_dx_dy": v_next.std(0).tolist(), "accel_std_dx_dy": (v_next - v_prev).std(0).tolist(),
        "world_model": use,
        "r2_latent_to_shift": readout(z, v_next, test, False),
        "r2_latent_to_previous_shift": readout(z, v_prev, test, False),
        "r2_latent_to_acceleration": readout(z, v_next - v_prev, test, False),
        "acc_latent_to_action": readout(z, actions, test, True),
        "acc_shifts_to_action": readout(np.c_[v_prev, v_next], actions, test, True),
        "majority_rate": float(np.bincount(actions[test]).max() / test.sum()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"motion-{args.name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    from lapo_ray.evaluation.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(gain, cmap="magma")
    ax.set_title(f"{args.name}: world-model error removed\nby the true latent (vs shuffled), per pixel", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"motion-{args.name}.png"), dpi=110)
    w = res["world_model"]
    print(f"| {args.name} | {res['triplets']} | {res['still_share']:.2f} | {w['true']:.4f} / {w['shuffled']:.4f} / "
          f"{w['copy_last']:.4f} | {w['gain_share_lower_half']:.2f} | {res['r2_latent_to_shift']:.2f} | "
          f"{res['r2_latent_to_previous_shift']:.2f} | {res['r2_latent_to_acceleration']:.2f} | "
          f"{res['acc_latent_to_action']:.3f} | {res['acc_shifts_to_action']:.3f} | {res['majority_rate']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
