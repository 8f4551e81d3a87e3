"""Stage-1 recipe options (docs/recipes.md): labels, change weight, shift, no VQ."""

import dataclasses

import numpy as np
import torch

from lapo_ray.config import StageConfig
from lapo_ray.config.models import model_preset
from lapo_ray.models import LatentDynamics
from lapo_ray.models.idm import IDM
from lapo_ray.train.recipes import (
    change_weights,
    labelled_mask,
    random_shift,
    triplet_hash,
    triplet_hash_np,
)
from lapo_ray.train.stages import Stage1Task


def _batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "frames": torch.randint(0, 256, (b, 3, 64, 64, 3), dtype=torch.uint8, generator=g),
        "episode_id": torch.arange(b, dtype=torch.int64) * 7 + 3,
        "step": torch.arange(b, dtype=torch.int64) % 5 + 1,
        "action": torch.randint(0, 15, (b,), generator=g),
    }


def test_hash_is_fixed_and_matches_numpy():
    ep, st = np.array([0, 1, 2, 123456789, 2**40]), np.array([1, 1, 7, 300, 5])
    h = triplet_hash(torch.as_tensor(ep), torch.as_tensor(st)).numpy()
    np.testing.assert_array_equal(h, triplet_hash_np(ep, st))
    assert ((h >= 0) & (h < 1)).all()
    # About the asked share of a large set is labelled.
    eps, steps = np.repeat(np.arange(2000), 50), np.tile(np.arange(1, 51), 2000)
    assert abs((triplet_hash_np(eps, steps) < 0.01).mean() - 0.01) < 0.002


def test_label_head_gets_gradient_only_from_labelled_rows():
    cfg = model_preset("cpu")
    recipe = dataclasses.replace(StageConfig(), action_labels=8, action_label_weight=1.0)
    b = _batch()
    b["action"][3] = -1
    mask = labelled_mask(b, 0.5)
    assert 0 < int(mask.sum()) < 16 and not bool(mask[3])
    torch.manual_seed(0)
    task = Stage1Task(cfg, recipe=recipe, label_fraction=0.5)
    model = task.build()
    loss, metrics = task.loss(model, b)
    assert float(metrics["labelled_rows"]) == float(mask.sum())
    # The head's gradient equals the one from a loss over the labelled rows alone.
    model.zero_grad()
    loss.backward()
    got = model.action_head.weight.grad.clone()
    model.zero_grad()
    out = model(b["frames"])
    ce = torch.nn.functional.cross_entropy(out["action_logits"][mask], b["action"][mask])
    ce.backward()
    torch.testing.assert_close(got, model.action_head.weight.grad, rtol=1e-4, atol=1e-6)
    # With no labelled row, the head gets exactly zero gradient.
    model.zero_grad()
    task0 = Stage1Task(cfg, recipe=recipe, label_fraction=0.0)
    task0.loss(model, b)[0].backward()
    assert float(model.action_head.weight.grad.abs().sum()) == 0.0


def test_change_weight_mean_one_and_larger_where_frames_change():
    x = torch.zeros(2, 3, 3, 8, 8) - 0.5
    x[:, 2, :, :4, :4] = 0.5  # o[t+1] differs from o[t] in one quarter
    w = change_weights(x, alpha=4.0)
    assert w.shape == (2, 1, 8, 8)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    # changed pixels weigh 1 + 4 = 5 times the unchanged ones: 5 / 2 and 1 / 2 after the mean of 2
    torch.testing.assert_close(w[0, 0, 0, 0], torch.tensor(2.5))
    torch.testing.assert_close(w[0, 0, 7, 7], torch.tensor(0.5))


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
