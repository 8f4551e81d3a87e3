"""Which frames to label: random against coverage selection for offline decoding.

    PYTHONPATH=. python docs/results/label_budget.py --pretrain artifacts/pretrain --out artifacts/label-budget

For every k in --ks, every selection (`--decoder.select random|coverage`) and every seed, the
offline decoder of `jobs/decode.py` learns from k labelled training triplets of the run's own
corpus, and its action accuracy is measured on held-out triplets of the validation episodes
(`decoder_val_accuracy`). A seed draws the decoder's weights, the frames and the held-out set, so
both selections at one seed meet the same held-out triplets and their difference is paired:
random takes the first k of a seeded shuffle, coverage runs k-center greedy on the IDM latents of
a seeded candidate pool. Each cell's decode.json is kept under --out, so a rerun skips finished
cells; the table and plot are rewritten after each one.

Returns: ``--episodes N`` plays each cell's decoded agent for N episodes on its training levels
(and N on held-out levels) and adds the mean return to the table, for a corpus whose actions come
from a demonstrator. On a corpus of random play the action accuracy is what selection can change,
and the decoded agent's return is the random policy's: the default, one episode, keeps that run
in minutes.
"""

from __future__ import annotations

import argparse
import os
import time

from lapo_ray import storage
from lapo_ray.config.rl import DecodeConfig, DecoderConfig, EvalConfig
from lapo_ray.evaluation.stats import mean_interval

SELECTIONS = ("random", "coverage")

# What the committed table shows; the script prints it under every table it writes.
NO_READING = "**Reading.** Not written yet."
READING = """**Reading** (2026-12-07, the README's default run, 400 stage-1 steps, gap closed 0.42).
Coverage selection does not help here: it is behind random at every k, clearly at k = 256
(-0.044 ± 0.011, paired over 3 seeds) and within the noise elsewhere. Below 256 labels neither
beats the majority action (0.085). k-center greedy spends its labels on the latent space's far
corners first: every pick is the candidate farthest from those before it, so rare latents
(outliers included) get as many labels as the common ones. The likely cost (not measured apart):
the decoder learns the action frequencies of a sample unlike the held-out triplets. On this
random-play corpus, where the latent says little about the action (probe 0.18 against a majority
rate of 0.06), matching the corpus's own distribution was worth more than spreading. Whether it holds on the experiment's
demonstrator corpus is not measured yet."""
DEMONSTRATOR_READING = """**Reading** (2026-12-07). The run: jobs/experiment.py's pretraining step (its
`cpu` recipe: stage 1 on an 8-minute budget, here 1,669 steps; stage 2 for 1,000) on the experiment's
corpus, 85,000 frames of CoinRun from its PPO demonstrator with held random excursions, made with
the experiment's recipe by the fidelity study (docs/results/fidelity.py). Its probe closed 0.18 of the
gap (probe 0.422, floor 0.404, ceiling 0.504; the committed experiment's closed 0.20). On this corpus
the selection changes nothing that the seeds can see: coverage and random are within 0.03 of each
other at every k, the paired difference is inside the noise at k = 16, 64 and 256 and slightly
against coverage at k = 1024 (-0.009 ± 0.004). Neither decoder gets clear of the majority action
(0.362) at any k (0.388 ± 0.056 at best), because the latent carries little about the
demonstrator's action here: even the probe's supervised ceiling is only 0.12 above its majority
action (0.504 against 0.387). The decoded agents' returns, 4.4-5.6 over 16
episodes of their training levels, sit between the random policy's 3.10 and the demonstrator's 7.10
(docs/results/report.md) for both selections alike. With the README's random-play corpus (where
coverage was behind at k = 256), random selection stays the default."""
READINGS = {"label_budget.md": READING, "label_budget_demonstrator.md": DEMONSTRATOR_READING}


def cell_dir(out: str, select: str, k: int, seed: int) -> str:
    return os.path.join(out, f"{select}-k{k}-s{seed}")


def run_cells(pretrain: str, out: str, ks: list[int], seeds: int, table: str, episodes: int = 1) -> dict:
    from lapo_ray.rl.decode import decode_offline

    cells = [(k, s, seed) for k in ks for s in SELECTIONS for seed in range(seeds)]
    results, t0, ran = {}, time.time(), 0
    for i, (k, select, seed) in enumerate(cells):
        where = cell_dir(out, select, k, seed)
        done = os.path.join(where, "decode.json")
        if not os.path.exists(done):
            cfg = DecodeConfig(out=where, pretrain=pretrain, seed=seed,
                               decoder=DecoderConfig(k=k, select=select),
                               eval=EvalConfig(episodes=episodes, num_envs=min(episodes, 16)))
            decode_offline(cfg)
            ran += 1
            rate = (time.time() - t0) / ran
            print(f"label-budget: {i + 1}/{len(cells)} cells, {rate:.0f} s a cell, "
                  f"ETA {rate * (len(cells) - i - 1) / 60:.0f} min", flush=True)
        results[(k, select, seed)] = storage.read_json(done)
        write_table(results, pretrain, out, ks, seeds, table, episodes)
    return results


def summarise(results: dict, ks: list[int]) -> list[dict]:
    rows = []
    for k in ks:
        row = {"k": k}
        for select in SELECTIONS:
            accs = [r["decoder_val_accuracy"] for (kk, s, _), r in sorted(results.items()) if kk == k and s == select]
            if accs:
                row[select] = (*mean_interval(accs), len(accs))
            rets = [r["train_levels"]["return_mean"] for (kk, s, _), r in sorted(results.items())
                    if kk == k and s == select]
            if rets:
                row[f"{select}_return"] = (*mean_interval(rets), len(rets))
        pairs = [results[(k, "coverage", seed)]["decoder_val_accuracy"] - r["decoder_val_accuracy"]
                 for (kk, s, seed), r in sorted(results.items())
                 if kk == k and s == "random" and (k, "coverage", seed) in results]
        if pairs:
            row["difference"] = (*mean_interval(pairs), len(pairs))
        majority = [r["majority_action_rate"] for (kk, _, _), r in results.items() if kk == k]
        row["majority"] = sum(majority) / len(majority) if majority else None
        rows.append(row)
    return rows


def write_table(results: dict, pretrain: str, out: str, ks: list[int], seeds: int, table: str,
                episodes: int = 1) -> None:
    rows = summarise(results, ks)
    cell = lambda v: "n/a" if not v else f"{v[0]:.3f} ± {v[1]:.3f} ({v[2]})"  # noqa: E731
    any_result = next(iter(results.values()))
    png = os.path.splitext(os.path.basename(table))[0] + ".png"
    returns = episodes > 1
    lines = [
        "# Which frames to label: random against coverage selection",
        "",
        f"Made by `PYTHONPATH=. python docs/results/label_budget.py --pretrain {pretrain} --out {out} "
        f"--ks {' '.join(map(str, ks))} --seeds {seeds}" + (f" --episodes {episodes}" if returns else "")
        + f" --table {table}` on 2 CPU cores. Corpus: `{any_result['corpus']}`; "
        f"held-out triplets: {any_result['val_triplets']:,} of the validation episodes, drawn by the seed, the same "
        "for both selections at one seed. Decoder action accuracy, mean ± 95% t half-width over seeds (number of "
        "seeds); coverage − random is paired by seed."
        + (f" Returns: the decoded agent's mean over {episodes} episodes of its training levels, then over seeds."
           if returns else ""),
        "",
        "| k labelled | random | coverage (k-center greedy) | majority action | coverage − random |"
        + (" return, random | return, coverage |" if returns else ""),
        "|---:|---|---|---|---|" + ("---|---|" if returns else ""),
    ]
    for r in rows:
        maj = "n/a" if r["majority"] is None else f"{r['majority']:.3f}"
        diff = "n/a" if not r.get("difference") else f"{r['difference'][0]:+.3f} ± {r['difference'][1]:.3f}"
        ret = (f" {cell(r.get('random_return'))} | {cell(r.get('coverage_return'))} |" if returns else "")
        lines.append(f"| {r['k']} | {cell(r.get('random'))} | {cell(r.get('coverage'))} | {maj} | {diff} |" + ret)
    lines += ["", f"![decoder accuracy against k]({png})", "", READINGS.get(os.path.basename(table), NO_READING), ""]
    with open(table, "w") as f:
        f.write("\n".join(lines))
    _plot(rows, os.path.join(os.path.dirname(table), png))


def _plot(rows: list[dict], path: str) -> None:
    from lapo_ray.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for select, colour in zip(SELECTIONS, ("tab:blue", "tab:orange")):
        have = [r for r in rows if r.get(select)]
        if have:
            ax.errorbar([r["k"] for r in have], [r[select][0] for r in have], yerr=[r[select][1] for r in have],
                        fmt="o-", capsize=4, color=colour, label=select)
    maj = [r for r in rows if r["majority"] is not None]
    ax.plot([r["k"] for r in maj], [r["majority"] for r in maj], "k--", label="majority action")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="labelled frames k", ylabel="decoder accuracy, held-out triplets",
           title="offline decoding: which frames to label (95% intervals)")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain", required=True, help="a pretraining run folder (stage 1 and stage 2)")
    ap.add_argument("--out", required=True, help="where each cell's decode.json goes (resumable)")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--table", default="docs/results/label_budget.md", help="the page; its plot goes beside it")
    ap.add_argument("--episodes", type=int, default=1,
                    help="episodes each decoded agent plays per level set; above 1 the page gives returns too")
    args = ap.parse_args()
    run_cells(args.pretrain, args.out, args.ks, args.seeds, args.table, args.episodes)


if __name__ == "__main__":
    main()
