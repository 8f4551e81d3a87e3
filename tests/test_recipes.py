"""Stage-1 recipe options (docs/recipes.md): labels, change weight, shift, no VQ."""

import dataclasses

import numpy as np
import pytest
import torch

from lapo_ray.config import Stage1Config
from lapo_ray.config.models import model_preset
from lapo_ray.envs import NUM_ACTIONS
from lapo_ray.models import LatentDynamics
from lapo_ray.models.idm import IDM
from lapo_ray.train.recipes import camera_shifts, change_weights, random_shift, shift_frames, triplet_hash_np
from lapo_ray.train.stages import ActionLabelSet, Stage1Task


def _batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "frames": torch.randint(0, 256, (b, 3, 64, 64, 3), dtype=torch.uint8, generator=g),
        "episode_id": torch.arange(b, dtype=torch.int64) * 7 + 3,
        "step": torch.arange(b, dtype=torch.int64) % 5 + 1,
        "action": torch.randint(0, 15, (b,), generator=g),
    }


def test_hash_is_fixed_and_sized():
    ep, st = np.array([0, 1, 2, 123456789, 2**40]), np.array([1, 1, 7, 300, 5])
    h = triplet_hash_np(ep, st)
    np.testing.assert_array_equal(h, triplet_hash_np(ep.copy(), st.copy()))
    assert ((h >= 0) & (h < 1)).all() and len(np.unique(h)) == 5
    # About the asked share of a large set is labelled.
    eps, steps = np.repeat(np.arange(2000), 50), np.tile(np.arange(1, 51), 2000)
    assert abs((triplet_hash_np(eps, steps) < 0.01).mean() - 0.01) < 0.002


def _action_label_set(n=6, seed=0):
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (n, 3, 64, 64, 3), dtype=torch.uint8, generator=g).numpy()
    return ActionLabelSet(frames, np.arange(n, dtype=np.int64) % 15, seed=seed)


def test_label_loss_is_the_cross_entropy_of_a_drawn_labelled_batch():
    cfg = model_preset("cpu")
    recipe = dataclasses.replace(Stage1Config(), action_labels=8, action_label_weight=0.5, action_label_batch=4)
    labels = _action_label_set()
    torch.manual_seed(0)
    task = Stage1Task(cfg, recipe=recipe, action_label_set=labels)
    model = task.build().eval()  # no codebook update, so the world-model loss can be recomputed
    b = _batch()
    loss, metrics = task.loss(model, b)
    # The same draw, by hand: 4 of the labelled triplets (the set's own generator, seeded by the
    # set's seed and rank 0), the head on the quantised latent.
    seed = int(np.random.SeedSequence([labels.seed, 0]).generate_state(1)[0])
    idx = torch.randint(6, (4,), generator=torch.Generator().manual_seed(seed))
    frames, actions = torch.from_numpy(labels.frames)[idx], torch.from_numpy(labels.actions)[idx]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model.action_logits(frames), actions)
        wm = model(b["frames"])["loss"]
    torch.testing.assert_close(metrics["label_loss"].detach(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), wm + 0.5 * ce, rtol=1e-5, atol=1e-6)
    # The labels reach the IDM (the head reads its latent) and the head itself.
    model.zero_grad()
    loss.backward()
    assert float(model.action_head.weight.grad.abs().sum()) > 0
    assert float(model.idm.head.weight.grad.abs().sum()) > 0


def test_label_draws_differ_by_seed_and_survive_pickling():
    import pickle

    labels = _action_label_set(n=50)
    a = labels.draw(16, torch.device("cpu"))[1]
    b = _action_label_set(n=50, seed=1).draw(16, torch.device("cpu"))[1]
    c = pickle.loads(pickle.dumps(labels)).draw(16, torch.device("cpu"))[1]
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, c)  # a travelled copy starts its generator afresh
    assert a.dtype == torch.int64 and ((a >= 0) & (a < 15)).all()


def test_label_head_leaves_the_codebook_alone():
    cfg = model_preset("cpu")
    model = LatentDynamics(cfg, num_actions=NUM_ACTIONS).train()
    before = model.idm.vq.embeddings.clone(), model.idm.vq.num_updates.clone()
    model.action_logits(torch.from_numpy(_action_label_set().frames))
    assert torch.equal(model.idm.vq.embeddings, before[0]) and torch.equal(model.idm.vq.num_updates, before[1])


def test_labels_without_a_labelled_set_or_batch_are_refused():
    cfg = model_preset("cpu")
    recipe = dataclasses.replace(Stage1Config(), action_labels=8)
    task = Stage1Task(cfg, recipe=recipe)
    with pytest.raises(ValueError, match="no labelled triplets"):
        task.loss(task.build(), _batch())
    with pytest.raises(ValueError, match="action_label_batch must be positive"):
        dataclasses.replace(recipe, action_label_batch=0).validate("stage1")
    with pytest.raises(ValueError, match="3 triplets and 2 actions"):
        ActionLabelSet(np.zeros((3, 3, 64, 64, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(RuntimeError, match="without an action head"):
        LatentDynamics(cfg).action_logits(torch.from_numpy(_action_label_set().frames))


def test_change_weight_mean_one_and_larger_where_frames_change():
    x = torch.zeros(2, 3, 3, 8, 8) - 0.5
    x[:, 2, :, :4, :4] = 0.5  # o[t+1] differs from o[t] in one quarter
    w = change_weights(x, alpha=4.0)
    assert w.shape == (2, 1, 8, 8)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    # changed pixels weigh 1 + 4 = 5 times the unchanged ones: 5 / 2 and 1 / 2 after the mean of 2
    torch.testing.assert_close(w[0, 0, 0, 0], torch.tensor(2.5))
    torch.testing.assert_close(w[0, 0, 7, 7], torch.tensor(0.5))


def _camera_scene(seed=0):
    """o[t] a textured scene; o[t+1] the same scene seen by a camera that moved by a known
    shift per sample, with a 3x3 'sprite' at the centre that changed on its own."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 3, 32, 32, generator=g) - 0.5
    dx, dy = torch.tensor([0, 3, -2, 5]), torch.tensor([0, -1, 4, 2])
    b = shift_frames(a, dx, dy).clone()
    b[:, :, 15:18, 15:18] = 0.5 - b[:, :, 15:18, 15:18]
    return a, b, dx, dy


def test_camera_shifts_recover_the_shift_the_frames_were_moved_by():
    a, b, dx, dy = _camera_scene()
    got_dx, got_dy = camera_shifts(a, b)
    assert got_dx.tolist() == dx.tolist() and got_dy.tolist() == dy.tolist()
    # out[i, j] = a[i + dy, j + dx], edges repeated
    torch.testing.assert_close(shift_frames(a, dx, dy)[1, :, 5, 5], a[1, :, 5 + (-1), 5 + 3])
    torch.testing.assert_close(shift_frames(a, dx, dy)[3, :, 31, 31], a[3, :, 31, 31])


def test_camera_baseline_puts_the_weight_on_what_the_camera_does_not_explain():
    a, b, _, _ = _camera_scene()
    x = torch.stack([a, a, b], 1)  # (B, 3, C, H, W)
    sprite = torch.zeros(32, 32, dtype=torch.bool)
    sprite[15:18, 15:18] = True
    camera, last = change_weights(x, 20.0, "camera")[:, 0], change_weights(x, 20.0, "last")[:, 0]
    torch.testing.assert_close(camera.mean(dim=(1, 2)), torch.ones(4))
    # Where the camera moved (samples 1-3) plain change weighting spreads over the whole frame,
    # the camera baseline gives the sprite most of it; with a still camera (sample 0) they agree.
    ratio = lambda w: (w[:, sprite].mean(1) / w[:, ~sprite].mean(1))  # noqa: E731
    assert (ratio(camera)[1:] > 10).all() and (ratio(last)[1:] < 3).all()
    torch.testing.assert_close(camera[0], last[0])
    with pytest.raises(ValueError, match="change baseline 'previous'"):
        change_weights(x, 1.0, "previous")


def test_camera_baseline_without_change_weight_is_refused():
    stage = Stage1Config(change_baseline="camera")
    with pytest.raises(ValueError, match=r"stage1: change_baseline 'camera' has no effect without change_weight"):
        stage.validate("stage1")
    dataclasses.replace(stage, change_weight=5.0).validate("stage1")


def test_shift_moves_all_three_frames_by_one_offset():
    b = _batch(b=32, seed=1)
    g = torch.Generator().manual_seed(0)
    out = random_shift(b["frames"], 4, generator=g)
    assert out.shape == b["frames"].shape and out.dtype == torch.uint8
    moved = 0
    for i in range(32):
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(out[i, 0, 8:56, 8:56], b["frames"][i, 0, 8 + dy:56 + dy, 8 + dx:56 + dx])]
        assert len(found) == 1
        dy, dx = found[0]
        for f in (1, 2):
            assert torch.equal(out[i, f, 8:56, 8:56], b["frames"][i, f, 8 + dy:56 + dy, 8 + dx:56 + dx])
        moved += (dy, dx) != (0, 0)
    assert moved >= 28  # 80 of 81 offsets move


def test_no_vq_passes_latent_through():
    cfg = model_preset("cpu")
    cfg = dataclasses.replace(cfg, vq=dataclasses.replace(cfg.vq, enabled=False))
    torch.manual_seed(0)
    idm = IDM(cfg.idm, cfg.vq, in_channels=9, frame_size=64)
    x = torch.randn(4, 9, 64, 64)
    out = idm(x)
    head = idm.head(idm.encoder(x))
    torch.testing.assert_close(out["latent_q"], head)
    torch.testing.assert_close(out["latent"], head)
    assert float(out["vq_loss"]) == 0.0 and int(out["codes"].abs().sum()) == 0
    before = idm.vq.embeddings.clone()
    idm.train()(x)
    assert torch.equal(before, idm.vq.embeddings)  # the codebook is never touched
    # The world model's gradient reaches the IDM through the unquantised latent.
    dyn = LatentDynamics(cfg)
    dyn(_batch(4)["frames"])["loss"].backward()
    assert float(dyn.idm.head.weight.grad.abs().sum()) > 0


def test_recipes_off_by_default_and_in_paper_preset():
    from lapo_ray.config import PRETRAIN_PRESETS

    for name in ("paper", "cpu"):
        c = PRETRAIN_PRESETS[name]()
        assert c.stage1.action_labels == 0 and c.stage1.change_weight == 0.0 and c.stage1.augment == "none"
    assert PRETRAIN_PRESETS["paper"]().model.vq.enabled


def test_an_action_label_set_too_large_for_worker_memory_is_refused_before_reading():
    from types import SimpleNamespace

    from lapo_ray.config import cpu_pretrain
    from lapo_ray.train.stage1 import stage1_task

    cfg = cpu_pretrain()
    cfg.stage1.action_labels = 100_000  # 100k triplets of 3 x 64x64x3 bytes: 3.4 GiB
    # Nothing may be read: a source whose reads fail proves the check comes first.
    source = SimpleNamespace(frame_shape=(64, 64, 3), has_actions=True, name="corpus:x")
    message = r"--stage1.action-labels 100000: .* take 3\.4 GiB in every training worker's memory \(at most 2 GiB\)"
    with pytest.raises(ValueError, match=message):
        stage1_task(cfg, source, SimpleNamespace(episode_ids=[1, 2], triplets=10**6),
                    SimpleNamespace(val_episodes=[1]), None)
