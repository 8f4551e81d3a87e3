"""Several corpora in one run (data.mixture): --corpus parsing, per-source splits, the weighted
training stream, per-source counts and probe in the report."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import numpy as np
import pytest

from lapo_ray.config import PipelineConfig
from lapo_ray.data.corpus import Episode, write_corpus
from lapo_ray.data.mixture import (
    SOURCE_BITS,
    CorpusEntry,
    MultiSource,
    open_corpus_sources,
    parse_corpus,
)
from lapo_ray.data.sources import CorpusSource
from lapo_ray.data.splits import SplitSpec
from lapo_ray.data.triplets import iter_batches, iter_segments, triplet_dataset

SHAPE = (8, 8, 3)
EPISODES, LENGTH = 12, 40  # per source: 38 triplets an episode
MARK = {0: 50, 1: 200}  # pixel (0, 1, 0) of every frame names its source ("game")


def game_episode(source: int, eid: int, length: int = LENGTH) -> Episode:
    """Frames that encode (source, episode, step) in pixels."""
    f = np.zeros((length, *SHAPE), np.uint8)
    f[:, 0, 0, 0] = np.arange(length) % 256
    f[:, 0, 0, 1] = np.arange(length) // 256
    f[:, 0, 0, 2] = eid
    f[:, 0, 1, 0] = MARK[source]
    return Episode(eid, f, actions=np.arange(length) % 5)


def write_game(root: str, source: int, game: str, episodes: int = EPISODES) -> str:
    # Two episodes a shard: a file is 76 triplets, the interleaving's unit.
    write_corpus(root, [game_episode(source, i) for i in range(episodes)], game, shard_frames=2 * LENGTH,
                 max_segment_frames=16)
    return root


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    a = write_game(str(tmp_path_factory.mktemp("coinrun")), 0, "coinrun")
    b = write_game(str(tmp_path_factory.mktemp("bigfish")), 1, "bigfish")
    return a, b


PIPE = PipelineConfig(val_fraction=0.2, local_shuffle_buffer=0)


def source_of(frames: np.ndarray) -> np.ndarray:
    """(B,) source index of each triplet, after checking its three frames agree on it."""
    marks = frames[:, :, 0, 1, 0]
    assert (marks == marks[:, :1]).all(), "a triplet mixes sources"
    return np.where(marks[:, 0] == MARK[0], 0, 1)


# --------------------------------------------------------------------------- parsing (no Ray)


def test_corpus_flag_parses_sources_and_weights(tmp_path):
    assert parse_corpus("data/a") == [CorpusEntry("data/a")]
    assert parse_corpus("data/a,data/b") == [CorpusEntry("data/a"), CorpusEntry("data/b")]
    assert parse_corpus(" a=0.7 , b=.3") == [CorpusEntry("a", 0.7), CorpusEntry("b", 0.3)]
    assert parse_corpus("a=7,b=3e0") == [CorpusEntry("a", 7.0), CorpusEntry("b", 3.0)]
    # A URI keeps its colons and its query; only a trailing =<number> is a weight.
    assert parse_corpus("s3://b/c?endpoint_override=host:9000,gs://d/e") == [
        CorpusEntry("s3://b/c?endpoint_override=host:9000"), CorpusEntry("gs://d/e")]
    assert parse_corpus("s3://b/c?x=1=0.5,s3://b/d=0.5") == [
        CorpusEntry("s3://b/c?x=1", 0.5), CorpusEntry("s3://b/d", 0.5)]
    # A path that exists is one source, whatever its name holds.
    odd = tmp_path / "run=1,2"
    odd.mkdir()
    assert parse_corpus(str(odd)) == [CorpusEntry(str(odd))]


@pytest.mark.parametrize("text, msg", [
    ("a=-0.3,b=0.7", r"a has weight -0.3; a weight is a positive number"),
    ("a=0,b=1", r"a has weight 0"),
    ("a=nan,b=1", r"a has weight nan"),
    ("a=0.7,b", r"give every source a weight or none \(b has none\)"),
    ("a,,b", r"an empty entry"),
    ("a,a/", r"a/ is given twice"),
    ("=0.5,b=0.5", r"'=0.5' is a weight without a source"),
])
def test_corpus_flag_nonsense_is_named(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_corpus(text)


def test_an_unknown_folder_and_a_frame_shape_mismatch_are_one_line_errors(games, tmp_path):
    a, _ = games
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such directory"):
        open_corpus_sources(f"{a}=0.5,{tmp_path / 'nowhere'}=0.5")
    other = str(tmp_path / "big")
    f = np.zeros((10, 16, 16, 3), np.uint8)
    write_corpus(other, [Episode(0, f)], "coinrun")
    with pytest.raises(ValueError) as e:
        open_corpus_sources(f"{a},{other}")
    text = str(e.value)
    assert "\n" not in text and f"corpus:{a}" in text and f"corpus:{other}" in text
    assert "(8, 8, 3)" in text and "(16, 16, 3)" in text


def test_one_source_is_the_source_itself(games):
    a, _ = games
    src = open_corpus_sources(a)
    assert type(src) is CorpusSource and src.uri == a


# --------------------------------------------------------------------------- splits and the stream (no Ray)


def multi(games, weights=None) -> MultiSource:
    src = open_corpus_sources(",".join(g if weights is None else f"{g}={w}" for g, w in zip(games, weights or games)),
                              frame_size=SHAPE[:2])
    assert isinstance(src, MultiSource)
    return src


def test_each_source_is_split_on_its_own_with_the_single_source_rule(games):
    src = multi(games)
    scan = src.scan()
    assert scan.episodes == 2 * EPISODES and scan.triplets == 2 * EPISODES * (LENGTH - 2)
    assert len(set(scan.episode_ids)) == 2 * EPISODES  # both sources' ids 0..11, moved apart
    spec = src.split(scan, PIPE.val_fraction, PIPE.split_seed)
    for i, g in enumerate(games):
        alone = SplitSpec.for_episodes(CorpusSource(g).scan().episode_ids, PIPE.val_fraction, PIPE.split_seed)
        # The very episodes the source would validate on alone, round(0.2 * 12) = 2 of them.
        assert src.part_spec(i, spec).val_episodes == alone.val_episodes and len(alone.val_episodes) == 2
        assert all((e >> SOURCE_BITS) == i for e in spec.val_episodes[2 * i: 2 * i + 2])
    counts = src.source_counts(spec)
    assert [(c["source"], c["episodes"], c["val_episodes"], c["train_triplets"], c["val_triplets"])
            for c in counts] == [(g, EPISODES, 2, 10 * 38, 2 * 38) for g in games]
    # Each part as the probe per source reads it: its own files, names and split.
    parts = src.source_parts(scan.files, spec)
    assert [p.label for p in parts] == list(games)
    for i, (p, g) in enumerate(zip(parts, games)):
        alone = CorpusSource(g)
        assert p.files == alone.scan_files() and len(p.files) == EPISODES // 2
        assert p.spec == alone.split(alone.scan(), PIPE.val_fraction, PIPE.split_seed)
        assert p.source is src.parts[i]


def test_one_source_splits_and_orders_itself_and_has_no_parts(games):
    src = CorpusSource(games[0])
    scan = src.scan()
    spec = src.split(scan, PIPE.val_fraction, PIPE.split_seed)
    assert spec == SplitSpec.for_episodes(scan.episode_ids, PIPE.val_fraction, PIPE.split_seed)
    assert len(spec.val_episodes) == 2
    assert src.source_parts(scan.files, spec) == [] and src.source_counts(spec) == []
    # No seed: the files as given; a seed: a seeded order of each file once, weighted or not.
    assert src.stream_files(scan.files, spec, "train", None) == scan.files
    order = src.stream_files(scan.files, spec, "train", 3, weighted=True)
    assert order == [scan.files[i] for i in np.random.default_rng(3).permutation(EPISODES // 2)]
    assert order != scan.files and sorted(order) == sorted(scan.files)


def train_triplets_per_source(src: MultiSource, files, spec) -> Counter:
    """Exact training triplets each scheduled file holds, per source."""
    val = set(spec.val_episodes)
    count: Counter = Counter()
    for f in files:
        i = src._files[f][0]
        for table in src.file_segments(f):
            for seg in iter_segments(table, SHAPE):
                if seg.episode_id not in val:
                    count[i] += len(seg.frames) - 2
    return count


@pytest.mark.parametrize("weights, want", [
    (None, (0.5, 0.5)),  # by size: each file once
    ((3, 1), (0.75, 0.25)),  # the first source three times over
    ((0.3, 0.7), (0.3, 0.7)),  # a partial last pass
])
def test_the_training_stream_holds_the_sources_in_their_weights(games, weights, want):
    src = multi(games, weights)
    scan = src.scan()
    spec = src.split(scan, PIPE.val_fraction, PIPE.split_seed)
    files = src.stream_files(scan.files, spec, "train", seed=0, weighted=True)
    got = train_triplets_per_source(src, files, spec)
    total = sum(got.values())
    # Whole passes are exact; a partial pass ends within half a file (76 triplets) of its quota.
    for i in (0, 1):
        assert abs(got[i] - want[i] * total) <= 76, (got, want)
    # Every source read whole at least once.
    assert set(scan.files) <= set(files)
    # Interleaved: in every prefix the sources keep their shares, to within a file of each.
    share = np.cumsum([1 if src._files[f][0] == 0 else 0 for f in files])
    assert np.abs(share - want[0] * np.arange(1, len(files) + 1)).max() <= 2
    # Seeded: the same order again, another for another seed.
    assert src.stream_files(scan.files, spec, "train", seed=0, weighted=True) == files
    assert src.stream_files(scan.files, spec, "train", seed=1, weighted=True) != files
    # Validation, probe and labelling read each file once.
    assert sorted(src.stream_files(scan.files, spec, "val", seed=None)) == sorted(scan.files)


def test_a_file_is_read_as_its_source_with_its_ids_moved(games):
    src = multi(games)
    for f in src.scan().files:
        i = src._files[f][0]
        for table in src.file_segments(f):
            for seg in iter_segments(table, SHAPE):
                assert seg.episode_id >> SOURCE_BITS == i
                assert (seg.frames[:, 0, 1, 0] == MARK[i]).all()
                assert (seg.frames[:, 0, 0, 2] == seg.episode_id & 0xFF).all()
    assert all(f.endswith(("#0", "#1")) for f in src.scan_files())


def test_the_report_gives_counts_and_probe_per_source():
    from lapo_ray.evaluation.reports import render_pretrain_report

    sources = [{"source": "data/coinrun", "weight": 0.7, "episodes": 12, "val_episodes": 2, "train_triplets": 380,
                "val_triplets": 76}, {"source": "data/bigfish", "weight": 0.3, "episodes": 12, "val_episodes": 2,
                                      "train_triplets": 380, "val_triplets": 76}]
    probe = {"probe_acc": 0.4, "floor_untrained_idm": 0.2, "majority_rate": 0.1, "n_test": 100,
             "per_source": {"data/coinrun": {"probe_acc": 0.5, "floor_untrained_idm": 0.2, "majority_rate": 0.1,
                                             "n_test": 50}, "data/bigfish": {"skipped": "no actions"}}}
    text = render_pretrain_report({"source": {"name": "multi:x", "frames": 1, "episodes": 24, "triplets": 912},
                                   "sources": sources, "probe": probe}, [])
    assert "| `data/coinrun` | 0.7 | 12 (2) | 380 | 76 |" in text
    assert "| `data/coinrun` | 0.500 | 0.200 | 0.100 | n/a | n/a | 50 |" in text
    assert "| `data/bigfish` | skipped: no actions |" in text


# --------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_both_games_are_read_in_the_stated_proportions_and_never_mixed(games, ray_local):
    src = multi(games, (0.75, 0.25))
    scan = src.scan()
    spec = src.split(scan, PIPE.val_fraction, PIPE.split_seed)
    cfg = dataclasses.replace(PIPE, local_shuffle_buffer=64)
    ds = triplet_dataset(src, "train", cfg, scan.files, spec, weighted=True)
    per_batch, seen = [], Counter()
    for b in iter_batches(ds, SHAPE, 32, cfg):
        s = source_of(b["frames"])
        # Each triplet is three frames in a row of one episode of its own source.
        steps = b["frames"][:, :, 0, 0, 0].astype(int) + 256 * b["frames"][:, :, 0, 0, 1].astype(int)
        assert (steps == b["step"][:, None] + np.array([-1, 0, 1])).all()
        assert ((b["episode_id"] >> SOURCE_BITS) == s).all()
        assert not spec.is_val(b["episode_id"]).any()
        per_batch.append(np.bincount(s, minlength=2))
        seen.update(zip(s.tolist(), b["episode_id"].tolist()))
    counts = np.array(per_batch)
    total = counts.sum(0)
    # One epoch: the first game's 380 training triplets three times over, the second's once.
    assert total.tolist() == [3 * 380, 380]
    assert len({e for _, e in seen}) == 2 * (EPISODES - 2)
    # Over the first half of the epoch (23 batches, 736 triplets) the share is 0.75 to within
    # what the stream's order allows: the files interleave by share, so a prefix is at most one
    # file (76 triplets) off per source, plus what the 64-triplet shuffle buffer holds back.
    half = counts[: len(counts) // 2].sum(0)
    assert abs(half[0] - 0.75 * half.sum()) <= 76 + 64, half
    # Validation: each source's own held-out episodes, each triplet once.
    val = Counter()
    for b in iter_batches(triplet_dataset(src, "val", dataclasses.replace(PIPE, global_shuffle="none"),
                                          scan.files, spec), SHAPE, 64, PIPE):
        assert spec.is_val(b["episode_id"]).all()
        val.update(source_of(b["frames"]).tolist())
    assert val == {0: 2 * 38, 1: 2 * 38}


def square_game_episode(eid: int, length: int, rng, colour) -> Episode:
    frames = np.full((length, 64, 64, 3), 30, np.uint8)
    moves = {0: (0, -4), 1: (0, 4), 2: (-4, 0), 3: (4, 0), 4: (0, 0)}
    actions = rng.integers(0, 5, length)
    y, x = 24, 24
    for t in range(length):
        frames[t, y: y + 12, x: x + 12] = colour
        dy, dx = moves[int(actions[t])]
        y, x = int(np.clip(y + dy, 0, 52)), int(np.clip(x + dx, 0, 52))
    return Episode(eid, frames, actions=actions.astype(np.int64))


@pytest.mark.slow
def test_pretraining_on_two_games_reports_counts_and_probe_per_source(tmp_path, ray_local):
    from lapo_ray.config import PRETRAIN_PRESETS
    from lapo_ray.pipelines.pretrain import run_pretrain

    rng = np.random.default_rng(0)
    roots = []
    for g, colour in (("coinrun", (220, 180, 40)), ("bigfish", (40, 120, 220))):
        root = str(tmp_path / g)
        write_corpus(root, [square_game_episode(i, 60, rng, colour) for i in range(12)], g, shard_frames=300)
        roots.append(root)
    cfg = PRETRAIN_PRESETS["cpu"]()
    stage = dataclasses.replace(cfg.stage1, batch_size=16, steps=4, report_every=2, checkpoint_every=4,
                                val_batches=1, precision="fp32")
    cfg = dataclasses.replace(
        cfg, out=str(tmp_path / "run"), corpus=f"{roots[0]}=0.6,{roots[1]}=0.4", stages="stage1", stage1=stage,
        data=PipelineConfig(val_fraction=0.25, local_shuffle_buffer=0),
        probe=dataclasses.replace(cfg.probe, triplets=2000, during_training=0, max_epochs=5, patience=2,
                                  ceiling=False))
    summary = run_pretrain(cfg)
    assert [(s["source"], s["weight"], s["val_episodes"], s["train_triplets"], s["val_triplets"])
            for s in summary["sources"]] == [(roots[0], 0.6, 3, 9 * 58, 3 * 58), (roots[1], 0.4, 3, 9 * 58, 3 * 58)]
    probe = json.load(open(os.path.join(cfg.out, "probe.json")))
    assert set(probe["per_source"]) == set(roots)
    for p in probe["per_source"].values():
        assert 0.0 <= p["probe_acc"] <= 1.0 and p["n_train"] + p["n_val"] + p["n_test"] == 3 * 58
    scan = json.load(open(os.path.join(cfg.out, "source_scan.json")))
    assert [s["train_triplets"] for s in scan["sources"]] == [9 * 58, 9 * 58]
    split = json.load(open(os.path.join(cfg.out, "split.json")))
    assert Counter(e >> SOURCE_BITS for e in split["val_episodes"]) == {0: 3, 1: 3}
    report = open(os.path.join(cfg.out, "report.md")).read()
    assert "## Sources" in report and "## Probe per source" in report
    assert f"| `{roots[1]}` | 0.4 | 12 (3) | 522 | 174 |" in report
