"""The probe of the paper-scale command (``benchmarks.paper``), at regular steps of training.

The pipeline's probe (``evaluation.probe``, ``evaluation.references``) on the validation episodes'
labelled triplets, held on the device: the floor (the untrained IDM stage 1 starts from), the
ceiling (the supervised IDM at the same step), the trained IDM, the gap closed, the bits the
latent tells about the action, and the codes' NMI. Encoding happens at the step, on the device;
the probe MLPs are fitted in a background thread on the host, so training goes on meanwhile.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lapo_ray.config import ProbeConfig
from lapo_ray.data.resident import ResidentTriplets
from lapo_ray.evaluation.probe import majority_rate, probe_accuracy, probe_halves
from lapo_ray.evaluation.references import idm_encoder, probe_figures, supervised_encoder

# The figures of each probe row, in the order the report shows them.
ROW_FIGURES = ("step", "ceiling_step", "probe_acc", "floor_untrained_idm", "ceiling_supervised_idm", "gap_closed",
               "info_bits_trained", "info_bits_untrained", "info_bits_supervised", "nmi_trained", "nmi_untrained",
               "majority_rate", "direct_supervised_classifier", "n_test")


@dataclass
class ProbeData:
    """Labelled validation triplets on the device, and the probe's test half by episode."""

    frames: torch.Tensor  # uint8 (N, 3, H, W, C)
    actions: np.ndarray
    episode_ids: np.ndarray
    test: np.ndarray


def probe_data(val: ResidentTriplets, n: int) -> ProbeData | None:
    """Up to ``n`` labelled triplets of the held validation split, in source order (the
    pipeline's probe reads the same ones); None with fewer than 32."""
    keep = torch.nonzero(val.action >= 0).squeeze(1)[:n]
    if len(keep) < 32:
        return None
    batch = val.take(keep)
    episodes = batch["episode_id"].cpu().numpy()
    return ProbeData(batch["frames"].contiguous(), batch["action"].cpu().numpy(), episodes, probe_halves(episodes))


@torch.no_grad()
def encode(data: ProbeData, encoder: Callable[[torch.Tensor], dict[str, torch.Tensor]],
           batch_size: int = 1024) -> dict[str, np.ndarray]:
    """What ``encoder`` gives on the probe's triplets, in fp32 as the pipeline's probe reads it."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(data.frames), batch_size):
        with torch.autocast(data.frames.device.type, enabled=False):
            for key, value in encoder(data.frames[i : i + batch_size]).items():
                parts.setdefault(key, []).append(value.float().cpu().numpy() if value.is_floating_point()
                                                 else value.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


class ProbeBook:
    """The probe rows of one run: ``floor`` once, then ``record`` each model at each probe step;
    a row is fitted as soon as its models are in (the ceiling may come later, or never)."""

    def __init__(self, data: ProbeData, cfg: ProbeConfig, with_codes: bool, with_ceiling: bool):
        self.data, self.cfg, self.with_codes, self.with_ceiling = data, cfg, with_codes, with_ceiling
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        self.majority = majority_rate(data.actions, data.test)
        self.floor: Future | None = None
        self.encoded: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self.rows: dict[int, Future] = {}

    def record_floor(self, model: torch.nn.Module) -> None:
        enc = _eval_encode(self.data, model, idm_encoder)
        self.floor = self.pool.submit(self._fit_floor, enc)

    def record(self, name: str, step: int, model: torch.nn.Module) -> None:
        """``name`` ("trained" or "supervised") at ``step``."""
        enc = _eval_encode(self.data, model, idm_encoder if name == "trained" else supervised_encoder)
        self.encoded.setdefault(step, {})[name] = enc
        if "trained" in self.encoded[step] and ("supervised" in self.encoded[step] or not self.with_ceiling):
            self._submit(step)

    def _submit(self, step: int) -> None:
        if step not in self.rows:
            self.rows[step] = self.pool.submit(self._fit_row, step, self.encoded.pop(step))

    def finish(self) -> list[dict[str, Any]]:
        """Every row, those still without a ceiling fitted without one, in step order."""
        for step in list(self.encoded):
            if "trained" in self.encoded[step]:
                self._submit(step)
        rows = [self.rows[s].result() for s in sorted(self.rows)]
        self.pool.shutdown()
        return rows

    def done_rows(self) -> list[dict[str, Any]]:
        return [self.rows[s].result() for s in sorted(self.rows) if self.rows[s].done()]

    def _fit_floor(self, enc: dict[str, np.ndarray]) -> dict[str, Any]:
        """The floor's probe, and how long one probe takes (what the run keeps time for)."""
        d, t0 = self.data, time.perf_counter()
        acc = probe_accuracy(enc["latent"], d.actions, d.test, self.cfg, episode_ids=d.episode_ids)
        return {"acc": acc, "codes": enc["codes"], "seconds": time.perf_counter() - t0}

    def _fit_row(self, step: int, encs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        d, floor = self.data, self.floor.result()
        enc = {"action": d.actions, "episode_id": d.episode_ids, "untrained/codes": floor["codes"],
               **{f"{name}/{key}": value for name, e in encs.items() for key, value in e.items()}}
        report = probe_figures(enc, self.cfg, ("trained", "untrained") if self.with_codes else (),
                               fitted={"untrained": floor["acc"]})
        return {**dict.fromkeys(ROW_FIGURES), "step": step, "ceiling_step": step if "supervised" in encs else None,
                **{k: v for k, v in report.items() if not isinstance(v, (dict, list))}}


def _eval_encode(data: ProbeData, model: torch.nn.Module, make: Callable) -> dict[str, np.ndarray]:
    was = model.training
    model.eval()
    try:
        return encode(data, make(model))
    finally:
        model.train(was)
