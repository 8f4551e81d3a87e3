"""jobs/probe.py: any stage-1 checkpoint assessed on any corpus (probe, codes, maps, atlas), the
atlas pretraining draws with the same functions, and offline decoding's coverage selection."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_data import encode_video, moving_square_frames, write_lapo_npz
from test_jobs import _job
from test_rl import tiny_pretrain_config

from lapo_ray import UsageError, load_run
from lapo_ray.config.rl import DecoderConfig
from lapo_ray.evaluation.atlas import atlas_rows, atlas_summary, plot_atlas
from lapo_ray.evaluation.latents import ContextSample, code_action_table, codebook_usage, latent_actions
from lapo_ray.evaluation.reports import render_probe_report
from lapo_ray.models import LatentDynamics
from lapo_ray.models.impala import frames_to_input, stack_frames
from lapo_ray.rl.decode import k_center_greedy
from lapo_ray.train.checkpoint import save_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## Latent-action probe", "## Codes against true actions", "## Codebooks", "## Latent-action atlas")


def stage1_checkpoint(folder, frame_size: int = 64) -> str:
    """A stage-1 checkpoint folder in the real layout, seeded random weights, cpu-preset model."""
    cfg = tiny_pretrain_config()
    cfg.model.frame_size = frame_size
    torch.manual_seed(0)
    uri = os.path.join(folder, "stage1", "checkpoint_000000")
    save_checkpoint(uri, LatentDynamics(cfg.model), None, {"step": 7, "train_seconds": 0.0, "done": True,
                                                          "stage": "stage1"}, cfg.to_dict())
    return str(folder)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> str:
    return stage1_checkpoint(tmp_path_factory.mktemp("probe-run") / "run")


def frames(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def table_rows(text: str) -> list[list[str]]:
    """Every markdown table row of ``text`` as its cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


# --------------------------------------------------------------------------- codes, without models


def test_codebook_usage_counts_used_and_dead_codes_and_the_perplexity():
    codes = np.zeros((8, 2, 2), np.int64)
    codes[:, 0] = [[0, 1]] * 8  # codebook 0: codes 0 and 1, equally
    codes[:, 1] = 3  # codebook 1: code 3 only
    codes[:2, 1, 0] = 5  # ... and code 5 for 2 of its 16 latents
    books = codebook_usage(codes, num_embs=16)
    assert [(b["used"], b["dead"], b["codes"]) for b in books] == [(2, 14, 16), (2, 14, 16)]
    assert books[0]["perplexity"] == pytest.approx(2.0) and books[0]["top_share"] == 0.5
    p = np.array([14, 2]) / 16
    assert books[1]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert books[1]["top_share"] == pytest.approx(14 / 16)


def tuples(counts: list[int]) -> np.ndarray:
    """Code tuples (N, 2, 2): tuple i (codes 4i..4i+3) repeated counts[i] times."""
    return np.concatenate([np.tile(np.arange(4 * i, 4 * i + 4).reshape(1, 2, 2), (n, 1, 1))
                           for i, n in enumerate(counts)])


def test_latent_actions_rank_whole_code_tuples_with_the_action_each_stands_for():
    # tuple 0 x3 (LEFT, LEFT, unknown), tuple 1 x5 (RIGHT x4, LEFT+DOWN), tuple 2 x2; the most
    # used tuple is not the first seen
    codes = tuples([3, 5, 2])[::-1]
    actions = np.array([1, 1, -1, 7, 7, 7, 7, 0, 3, 3])[::-1]
    ranking = latent_actions(codes, actions, top=2)
    assert ranking["distinct"] == 3 and ranking["triplets"] == 10 and len(ranking["top"]) == 2
    first, second = ranking["top"]
    assert first["code"] == [[4, 5], [6, 7]] and first["label"] == "4,5/6,7" and first["share"] == 0.5
    assert (first["action"], first["action_name"], first["action_share"]) == (7, "RIGHT", 0.8)
    # the unknown action is left out of the share, not counted against it
    assert second["code"] == [[0, 1], [2, 3]] and second["share"] == 0.3 and second["triplets"] == 3
    assert (second["action_name"], second["action_share"]) == ("LEFT", 1.0)
    assert "action" not in latent_actions(codes, None, 1)["top"][0]


def test_the_code_action_table_counts_known_actions_and_pools_the_rest():
    codes = tuples([4, 3, 2, 1])
    actions = np.array([7, 7, 7, 1, 1, 1, -1, 4, 4, 4])
    table = code_action_table(codes, actions, top=2)
    assert table["actions"] == [1, 4, 7] and table["action_names"] == ["LEFT", "NOOP", "RIGHT"]
    assert table["codes"] == ["0,1/2,3", "4,5/6,7", "other (2 tuples)"]
    assert table["counts"] == [[1, 0, 3], [2, 0, 0], [0, 3, 0]]  # the -1 triplet counts nowhere
    assert code_action_table(codes, actions, top=10)["codes"][-1] == "12,13/14,15"  # no "other" row when none


def test_the_context_sample_is_seeded_spread_over_the_stream_and_of_distinct_episodes():
    def sample(seed: int) -> ContextSample:
        s = ContextSample(12, seed)
        for start in range(0, 1000, 100):  # 10 batches of one episode each; frame value = index // 4
            idx = np.arange(start, start + 100)
            s.add(np.broadcast_to((idx // 4).astype(np.uint8)[:, None, None, None, None], (100, 3, 2, 2, 3)),
                  idx // 100, idx % 15)
        return s

    a, b = sample(0), sample(0)
    taken = a.take(3)
    assert taken["frames"].shape == (3, 3, 2, 2, 3) and taken["action"].shape == (3,)
    np.testing.assert_array_equal(taken["frames"], b.take(3)["frames"])
    index = taken["frames"][:, 0, 0, 0, 0].astype(int) * 4
    assert len({i // 100 for i in index}) == 3  # three episodes
    assert max(int(f[0, 0, 0, 0]) * 4 for f in a.frames) >= 500  # not only the stream's start
    assert not np.array_equal(sample(1).take(3)["frames"], taken["frames"])
    assert ContextSample(4).take(3)["frames"].shape[0] == 0


# --------------------------------------------------------------------------- the model side of the atlas


def test_code_latents_are_what_the_world_model_saw_for_those_codes(run_folder):
    run = load_run(run_folder)
    video = frames(6)
    triplets = torch.from_numpy(np.stack([video[:-2], video[1:-1], video[2:]], axis=1))
    with torch.no_grad():
        out = run.dynamics.idm(stack_frames(frames_to_input(triplets)), update_codebook=False)
        trained_pred = run.dynamics(triplets)["pred"]
    z = run.code_latents(out["codes"].numpy())
    np.testing.assert_array_equal(z, out["latent_q"].numpy())
    expected = ((trained_pred + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(run.predict(video[:-2], video[1:-1], z), expected)
    assert run.stage1_steps == 7
    with pytest.raises(UsageError, match=r"^codes: expected integers in \[0, 16\) of shape \(B, 2, 2\), got int64 "
                                         r"\(3, 2, 3\)$"):
        run.code_latents(np.zeros((3, 2, 3), np.int64))
    with pytest.raises(UsageError, match="in \\[0, 16\\)"):
        run.code_latents(np.full((1, 2, 2), 16))


def test_atlas_rows_apply_each_used_code_tuple_to_the_same_contexts(run_folder, tmp_path):
    run = load_run(run_folder)
    codes = tuples([2, 5, 3])
    contexts = {"frames": np.stack([frames(3, seed=s) for s in range(2)]), "action": np.array([7, -1])}
    atlas = atlas_rows(codes, np.full(10, 4), contexts, run.predict, run.code_latents, rows=2)
    assert [r["label"] for r in atlas["top"]] == ["4,5/6,7", "8,9/10,11"]
    for row in atlas["top"]:
        assert row["predicted"].shape == (2, 64, 64, 3) and row["predicted"].dtype == np.uint8
        z = run.code_latents(np.repeat(np.asarray(row["code"])[None], 2, axis=0))
        o_prev, o_now = contexts["frames"][:, 0], contexts["frames"][:, 1]
        np.testing.assert_array_equal(row["predicted"], run.predict(o_prev, o_now, z))
        assert row["action_name"] == "NOOP" and row["action_share"] == 1.0
    assert not np.array_equal(atlas["top"][0]["predicted"], atlas["top"][1]["predicted"])  # the code matters
    summary = atlas_summary(atlas)
    assert summary["contexts"] == 2 and [r["share"] for r in summary["rows"]] == [0.5, 0.3]
    assert "predicted" not in summary["rows"][0] and json.dumps(summary)
    path = plot_atlas(atlas, str(tmp_path / "plots" / "atlas.png"))
    assert open(path, "rb").read(8) == PNG


# --------------------------------------------------------------------------- the report


def probe_figures(with_actions: bool) -> dict:
    codes = tuples([5, 3, 2])
    figures = {"checkpoint": "/runs/a", "stage1_steps": 400, "corpus": "data/c",
               "source": {"name": "corpus:data/c", "frames": 1000, "episodes": 10, "triplets": 980,
                          "held_out_episodes": 3},
               "held_out_triplets": 10, "codebooks": codebook_usage(codes, 16),
               "atlas": {"distinct": 3, "triplets": 10, "contexts": 3,
                         "rows": latent_actions(codes, np.full(10, 7) if with_actions else None, 2)["top"]}}
    if with_actions:
        figures.update(probe_acc=0.61, floor_untrained_idm=0.3, majority_rate=0.2, ceiling_supervised_idm=0.9,
                       gap_closed=0.52, gap_two_se=0.01, nmi_trained=0.2, ceiling="/runs/a/ceiling/checkpoint_000001",
                       code_action_table=code_action_table(codes, np.arange(10) % 3, 2))
    return figures


def test_the_probe_report_has_its_sections_and_whole_tables():
    text = render_probe_report(probe_figures(True))
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    for image in ("latent_map.png", "code_action.png", "latent_map_codes.png", "atlas.png"):
        assert f"(plots/{image})" in text
    assert "**Share of the floor-to-ceiling gap closed: 0.52**" in text and "/runs/a/ceiling/checkpoint_000001" in text
    rows = table_rows(text)
    codes_header = next(r for r in rows if r[0] == "code tuple")
    assert codes_header == ["code tuple", "LEFT+DOWN", "LEFT", "LEFT+UP"]
    # whole rows: a code tuple's text never splits its cell
    assert ["`0,1/2,3`", "2", "2", "1"] in rows and ["other (1 tuples)", "1", "0", "1"] in rows
    assert ["1", "`0,1/2,3`", "50.0%", "RIGHT (100%)"] in rows
    assert ["0", "16", "6", "10", "5.60", "25.0%"] in rows


def test_the_probe_report_without_actions_says_so_and_keeps_what_holds():
    text = render_probe_report(probe_figures(False))
    assert "The corpus has no true actions" in text
    assert SECTIONS[0] not in text and SECTIONS[1] not in text and SECTIONS[2] in text and SECTIONS[3] in text
    assert "(plots/latent_map.png)" not in text and "(plots/atlas.png)" in text
    assert ["1", "`0,1/2,3`", "50.0%"] in table_rows(text)


# --------------------------------------------------------------------------- bad input: one line, nothing written


@pytest.fixture(scope="module")
def npz_corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("probe-npz") / "npz"
    write_lapo_npz(folder, n_files=1, n=130)
    return str(folder)


def refusal(argv: list[str], out, capsys) -> str:
    """The one line a probe job that must refuse ``argv`` prints; it exits 2 and writes nothing."""
    assert _job("probe").main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(out) or os.listdir(out) == []
    return err[0]


def test_a_folder_that_is_not_a_checkpoint_is_one_line(npz_corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = refusal(["--checkpoint", str(tmp_path / "empty"), "--corpus", npz_corpus], tmp_path / "out", capsys)
    assert line == f"error: --checkpoint {tmp_path / 'empty'}: not a run: no stage1/checkpoint_* and no " \
                   "dynamics.safetensors (an export) in it"
    line = refusal(["--checkpoint", str(tmp_path / "nowhere"), "--corpus", npz_corpus], tmp_path / "out", capsys)
    assert line == f"error: --checkpoint {tmp_path / 'nowhere'}: no such run folder"


def test_a_missing_corpus_and_a_frame_shape_mismatch_are_one_line(run_folder, npz_corpus, tmp_path, capsys):
    line = refusal(["--checkpoint", run_folder, "--corpus", str(tmp_path / "none")], tmp_path / "out", capsys)
    assert line == f"error: {tmp_path / 'none'}: no such directory"
    small = stage1_checkpoint(tmp_path / "small", frame_size=32)
    line = refusal(["--checkpoint", small, "--corpus", npz_corpus], tmp_path / "out", capsys)
    assert "frames are (64, 64, 3) (H, W, C) but the model expects (32, 32, 3)" in line
    assert line.endswith(f"(--model.frame-size 32, --model.channels 3 of the checkpoint {small})")


def test_another_jobs_folder_as_out_and_a_missing_ceiling_are_one_line(run_folder, npz_corpus, tmp_path, capsys):
    before = sorted(os.listdir(run_folder))
    assert _job("probe").main(["--checkpoint", run_folder, "--corpus", npz_corpus, "--out", run_folder]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"error: --out {run_folder}: exists and holds something other than a probe's output; name a "
                    "new folder")
    assert sorted(os.listdir(run_folder)) == before
    line = refusal(["--checkpoint", run_folder, "--corpus", npz_corpus, "--ceiling-from", run_folder], tmp_path / "o",
                   capsys)
    assert line.startswith(f"error: --ceiling-from {run_folder}: no finished ceiling in it")


@pytest.mark.parametrize("argv,needle", [
    (["--corpus", "c"], "--checkpoint is required"),
    (["--checkpoint", "c"], "--corpus is required"),
    (["--checkpoint", "c", "--corpus", "c", "--probe.during-training", "64"], "the probe job trains no stage 1"),
    (["--checkpoint", "c", "--corpus", "c", "--probe.ceiling-from", "r"],
     "reuses a finished ceiling with --ceiling-from"),
    (["--checkpoint", "c", "--corpus", "c", "--atlas-rows", "0"],
     "--atlas-rows and --atlas-contexts must be at least 1"),
])
def test_flag_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        _job("probe").parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and needle in err[0], err


# --------------------------------------------------------------------------- decoding: which k frames get labels


def clusters(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1000 latents in 8 well-separated clusters (centres 100 apart, spread 1), one of them holding
    930 and each other 10, in a seeded random order: a common motion and seven rare ones."""
    rng = np.random.default_rng(seed)
    sizes = [930] + [10] * 7
    label = np.repeat(np.arange(8), sizes)
    centres = 100.0 * np.eye(8, 16)
    order = rng.permutation(len(label))
    x = centres[label] + rng.normal(size=(len(label), 16))
    return x[order], label[order]


def test_coverage_labels_every_cluster_with_k_frames_where_random_misses_the_rare_ones():
    for seed in range(10):
        x, label = clusters(seed)
        picked = k_center_greedy(x, 8, seed)
        assert len(set(picked.tolist())) == 8 and sorted(set(label[picked].tolist())) == list(range(8)), seed
        # random: the first k of the seeded shuffle, as `--decoder.select random` takes them
        assert len(set(label[:8].tolist())) <= 3, seed
    x, _ = clusters(0)
    np.testing.assert_array_equal(k_center_greedy(x, 8, 3), k_center_greedy(x, 8, 3))
    assert len(k_center_greedy(x[:5], 8)) == 5 and len(k_center_greedy(x, 0)) == 0


def test_decoder_select_is_a_flag_and_random_stays_the_default():
    assert DecoderConfig().select == "random"
    cfg, _ = _job("decode").parse_args(["--decoder.select", "coverage", "--decoder.pool", "4096"])
    assert (cfg.decoder.select, cfg.decoder.pool) == ("coverage", 4096)
    with pytest.raises(SystemExit):
        _job("decode").parse_args(["--decoder.select", "nearest"])


# --------------------------------------------------------------------------- the whole job, on Ray


PROBE_FLAGS = ["--probe.triplets", "2000", "--probe.max-epochs", "5", "--probe.patience", "2"]  # the run's (conftest)


def outputs(out) -> dict:
    return {"probe": json.loads(open(os.path.join(out, "probe.json")).read()),
            "report": open(os.path.join(out, "report.md")).read(),
            "plots": sorted(os.listdir(os.path.join(out, "plots")))}


@pytest.mark.slow
def test_a_probe_of_a_run_on_its_own_corpus_repeats_the_runs_probe(pretrained_run, ray_local, tmp_path):
    """With the run's own ceiling reused: the very figures of the run's probe.json, and every
    section and plot; the run itself drew its atlas with the same functions."""
    run = str(pretrained_run["out"])
    out = tmp_path / "probe"
    assert _job("probe").main(["--checkpoint", run, "--corpus", str(pretrained_run["corpus"]), "--ceiling-from", run,
                               "--out", str(out), *PROBE_FLAGS]) == 0
    got, theirs = outputs(out), json.loads(open(os.path.join(run, "probe.json")).read())
    for key in ("probe_acc", "floor_untrained_idm", "ceiling_supervised_idm", "majority_rate", "nmi_trained",
                "info_bits_trained", "n_test", "stage1_steps"):
        assert got["probe"][key] == pytest.approx(theirs[key], abs=1e-9), key
    assert got["probe"]["ceiling"].startswith(os.path.join(run, "ceiling", "checkpoint_"))
    assert got["plots"] == ["atlas.png", "code_action.png", "latent_map.png", "latent_map_codes.png"]
    assert all(s in got["report"] for s in SECTIONS)
    books = got["probe"]["codebooks"]
    assert len(books) == 2 and all(b["used"] + b["dead"] == 16 for b in books)
    assert got["probe"]["atlas"]["rows"] and sum(map(sum, got["probe"]["code_action_table"]["counts"])) == got[
        "probe"]["n_train"] + got["probe"]["n_val"] + got["probe"]["n_test"]
    assert os.path.exists(os.path.join(run, "plots", "atlas.png"))
    assert "## Latent-action atlas" in open(os.path.join(run, "report.md")).read()
    check_the_runs_ceiling(pretrained_run, theirs)
    # A second probe into the same folder replaces the first.
    assert _job("probe").main(["--checkpoint", run, "--corpus", str(pretrained_run["corpus"]), "--out", str(out),
                               "--probe.ceiling", "false", "--atlas-rows", "2"]) == 0
    again = outputs(out)["probe"]
    assert again["ceiling"] is None and "ceiling_supervised_idm" not in again
    assert 1 <= len(again["atlas"]["rows"]) <= 2


def check_the_runs_ceiling(pretrained_run, theirs: dict) -> None:
    """The ceiling the run's probe trained in the shared stage loop: a finished stage of its own at
    stage 1's step count, weights moved from their seeded start, and its own head the probe's
    direct classifier on the probe's test half of the run's labelled validation triplets."""
    from lapo_ray.config import PretrainConfig, config_from_dict
    from lapo_ray.data.sources import open_source
    from lapo_ray.evaluation.probe import majority_rate
    from lapo_ray.evaluation.references import load_probe_set
    from lapo_ray.pipelines.pretrain import split_spec
    from lapo_ray.train.checkpoint import Checkpoint, load_supervised_idm
    from lapo_ray.train.stages import SupervisedIDMTask

    run = str(pretrained_run["out"])
    cfg = config_from_dict(PretrainConfig, json.load(open(os.path.join(run, "config.json"))))
    ceiling = Checkpoint.latest(os.path.join(run, "ceiling"))
    state = json.load(open(os.path.join(ceiling.uri, "state.json")))
    assert (state["stage"], state["step"], state["done"]) == ("ceiling", cfg.stage1.steps, True)
    assert theirs["stage1_steps"] == cfg.stage1.steps and "per_source" not in theirs  # one source
    assert len(theirs["perplexity_trained"]) == cfg.model.vq.num_codebooks
    sup = load_supervised_idm(ceiling.uri)
    torch.manual_seed(cfg.stage1.seed)
    assert not torch.allclose(sup.head.weight, SupervisedIDMTask(cfg.model).build().head.weight)

    src = open_source(str(pretrained_run["corpus"]))
    scan = src.scan()
    spec = split_spec(scan, cfg.data, src)
    held = load_probe_set(src, cfg.data, cfg.probe.triplets, scan.files, spec)
    # Every labelled validation triplet (the corpus holds fewer than the 2,000 asked for).
    assert len(held.actions) == theirs["n_train"] + theirs["n_val"] + theirs["n_test"] < cfg.probe.triplets
    test = held.test_mask
    assert theirs["n_test"] == test.sum() and theirs["majority_rate"] == majority_rate(held.actions, test)
    with torch.no_grad():
        pred = sup(torch.from_numpy(held.frames[test])).argmax(-1).numpy()
    assert theirs["direct_supervised_classifier"] == pytest.approx(float(np.mean(pred == held.actions[test])))


@pytest.mark.slow
def test_a_probe_on_videos_without_actions_and_on_two_sources_training_its_ceiling(pretrained_run, ray_local,
                                                                                  tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        encode_video(videos / f"clip{i}.mp4", np.roll(moving_square_frames(100 + i), -i, axis=0)[:100],
                     "libx264", "yuv420p")
    run = str(pretrained_run["out"])
    assert _job("probe").main(["--checkpoint", run, "--corpus", str(videos), "--out", str(tmp_path / "v"),
                               *PROBE_FLAGS]) == 0
    got = outputs(tmp_path / "v")
    assert "probe_acc" not in got["probe"] and "code_action_table" not in got["probe"]
    assert got["probe"]["held_out_triplets"] == 98 and got["probe"]["atlas"]["rows"]
    assert got["plots"] == ["atlas.png", "latent_map_codes.png"]
    assert "The corpus has no true actions" in got["report"] and SECTIONS[3] in got["report"]
    # npz with actions + videos without: a ceiling trained into <out>/ceiling, the probe per source.
    out = tmp_path / "two"
    corpus = f"{pretrained_run['corpus']},{videos}"
    assert _job("probe").main(["--checkpoint", run, "--corpus", corpus, "--out", str(out), *PROBE_FLAGS]) == 0
    got = outputs(out)
    assert got["probe"]["ceiling"].startswith(str(out / "ceiling" / "checkpoint_"))
    assert got["probe"]["per_source"][str(videos)] == {"skipped": "no actions"}
    assert "ceiling_supervised_idm" in got["probe"] and "## Probe per source" in got["report"]
