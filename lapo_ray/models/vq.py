"""Vector quantisation with EMA codebook updates (van den Oord et al. 2017, appendix), with
several codebooks and several discrete latents per codebook, as in LAPO.

The codebook is not trained by gradients: each training forward pass accumulates, per code,
how many vectors were assigned to it and their sum, and moves exponential moving averages of
both; the code is their ratio. Under data parallelism those per-batch counts and sums are summed
across ranks first (`_reduce`), so every rank applies the same update, the one a single worker
would apply to the concatenated global batch, and the codebooks never drift apart.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lapo_ray.config.models import VQConfig


class VQEmbeddingEMA(nn.Module):
    """Quantises a (B, latent_dim) vector as num_codebooks x num_discrete_latents vectors of emb_dim.

    Buffers (all fp32, none trained by gradient):
      embeddings        (num_codebooks, num_embs, emb_dim)  the codes
      ema_cluster_size  (num_codebooks, num_embs)           EMA of assignments per code
      ema_w             (num_codebooks, num_embs, emb_dim)  EMA of the sum of vectors per code
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        n, m, d = cfg.num_codebooks, cfg.num_embs, cfg.emb_dim
        # Same init as the official code: codes uniform in +-5/M, counts at zero and the sums at
        # the codes themselves. The mix is not self-consistent (sum / count is not the code): after
        # the first update a used code sits at decay/(1-decay) * init / count + its inputs' mean
        # and an unused one at ~init / eps, far from the data, until the init term decays away
        # (a few times 1/(1-decay) steps). Kept for fidelity to the paper's training dynamics.
        embeddings = torch.empty(n, m, d).uniform_(-5.0 / m, 5.0 / m)
        self.register_buffer("embeddings", embeddings)
        self.register_buffer("ema_cluster_size", torch.zeros(n, m))
        self.register_buffer("ema_w", embeddings.clone())
        # Counts EMA updates. Not persistent, so checkpoints keep the official buffer layout (and
        # so the split noise is seeded from the counts, which checkpoints hold).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64), persistent=False)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the batch statistics over data-parallel ranks (identity when not distributed).

        This is a collective: with `sync_ema` on, every rank of the process group must run the
        same number of updating forward passes (training mode), or they block each other.
        Non-updating passes (eval mode, `encode`) never communicate.
        """
        if self.cfg.sync_ema and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def forward(
        self, z: torch.Tensor, update: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z: (B, latent_dim). `update` defaults to `self.training`.

        Returns (z_q straight-through (B, latent_dim) fp32, z as fp32 (B, latent_dim),
        codes (B, num_codebooks, num_discrete_latents) int64, dict with `loss` (commitment term,
        already weighted), `perplexity` (num_codebooks,), `usage` (num_codebooks,): the fraction
        of codes used in the batch). When the update is synced across ranks, perplexity and usage
        describe the global batch; otherwise the local one.
        """
        update = self.training if update is None else update
        cfg = self.cfg
        n, m, d, L = cfg.num_codebooks, cfg.num_embs, cfg.emb_dim, cfg.num_discrete_latents
        b = z.shape[0]

        # Nearest-code search and the EMA must stay fp32: bf16 distances misassign codes and bf16
        # running sums lose the (1 - decay) increments entirely.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            # The latent is laid out as (codebook, emb_dim, latent), the official layout, so the
            # modules here compute exactly the official function given the same weights.
            x = z.reshape(b, n, d, L).permute(1, 0, 3, 2).reshape(n, b * L, d)
            flat = x.detach()
            dist_sq = torch.baddbmm(
                (flat**2).sum(-1, keepdim=True) + (self.embeddings**2).sum(-1).unsqueeze(1),
                flat,
                self.embeddings.transpose(1, 2),
                alpha=-2.0,
            )  # (n, b*L, m)
            idx = dist_sq.argmin(-1)  # (n, b*L)
            quantized = torch.gather(self.embeddings, 1, idx.unsqueeze(-1).expand(-1, -1, d))
            onehot = F.one_hot(idx, m).float()  # (n, b*L, m)

            # Counts and sums travel together so one all-reduce carries both.
            stats = torch.cat([onehot.sum(1).unsqueeze(-1), torch.bmm(onehot.transpose(1, 2), flat)], -1)
            if update:
                stats = self._reduce(stats)
                self._ema_update(counts=stats[..., 0], sums=stats[..., 1:])
            counts = stats[..., 0]

            commitment = F.mse_loss(x, quantized.detach())
            z_q = quantized + (x - x.detach())  # straight-through: value of the code, gradient of x
            z_q = z_q.view(n, b, L, d).permute(1, 0, 3, 2).reshape(b, n * d * L)

            probs = counts / counts.sum(-1, keepdim=True)
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum(-1))
            usage = (counts > 0).float().mean(-1)

        codes = idx.view(n, b, L).transpose(0, 1)
        stats_out = {"loss": cfg.commitment_cost * commitment, "perplexity": perplexity, "usage": usage}
        return z_q, z, codes, stats_out

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        # In place throughout: DDP keeps references to module buffers, so reassigning them
        # would leave DDP (and any optimiser-side copy) holding stale tensors.
        decay, eps, m = self.cfg.decay, self.cfg.eps, self.cfg.num_embs
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        # Laplace smoothing keeps unused codes at a small positive count (no division by zero)
        # while preserving the total count.
        total = self.ema_cluster_size.sum(-1, keepdim=True)
        self.ema_cluster_size.add_(eps).div_(total + m * eps).mul_(total)
        self.ema_w.mul_(decay).add_(sums, alpha=1 - decay)
        self.embeddings.copy_(self.ema_w / self.ema_cluster_size.unsqueeze(-1))
        self.num_updates.add_(1)
        if self.cfg.dead_code_threshold > 0:
            self._split_into_dead_codes()

    # Data-dependent control flow (which codes are dead) that reads values back to the host: it
    # runs eagerly under torch.compile (``keep_dead_code_split_eager``), and only when
    # dead_code_threshold > 0 (the cpu preset).
    @torch.no_grad()
    def _split_into_dead_codes(self) -> None:
        """Move each dead code next to the most used code of its codebook and split that code's
        count between the two, so both start with real inputs; totals are preserved.

        Deterministic given the checkpointed buffers (noise from a generator seeded by a hash of
        the EMA counts), so data-parallel ranks, which hold identical buffers, make identical
        splits, and a run resumed from a checkpoint makes the splits the uninterrupted run made
        (seeded by the update count, which checkpoints leave out, it drew other noise).
        """
        sizes, m = self.ema_cluster_size, self.cfg.num_embs
        dead = sizes < self.cfg.dead_code_threshold * sizes.sum(-1, keepdim=True) / m
        if not dead.any():
            return
        digest = hashlib.blake2b(sizes.detach().cpu().numpy().tobytes(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        for c, j in dead.nonzero().tolist():
            parent = int(sizes[c].argmax())
            alive = ~dead[c]
            spread = self.embeddings[c, alive].std(0).mean() if alive.sum() > 1 else self.embeddings[c, parent].abs().mean()
            # Drawn on the CPU generator, then moved: the same noise on every device.
            delta = torch.randn(self.cfg.emb_dim, generator=gen).to(sizes.device) * 0.1 * (spread + 1e-6)
            half = sizes[c, parent] / 2
            centre = self.embeddings[c, parent].clone()
            for code, sign in ((parent, -1.0), (j, 1.0)):
                self.embeddings[c, code] = centre + sign * delta
                sizes[c, code] = half
                self.ema_w[c, code] = self.embeddings[c, code] * half
            dead[c, j] = False

    @torch.no_grad()
    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, num_codebooks, num_discrete_latents) -> quantised latent (B, latent_dim)."""
        b = codes.shape[0]
        n, d = self.cfg.num_codebooks, self.cfg.emb_dim
        flat = codes.transpose(0, 1).reshape(n, -1)
        q = torch.gather(self.embeddings, 1, flat.unsqueeze(-1).expand(-1, -1, d))
        return q.view(n, b, -1, d).permute(1, 0, 3, 2).reshape(b, -1)


def keep_dead_code_split_eager() -> None:
    """Have torch.compile leave the dead-code split eager (a graph break around it). Called by
    ``train.step.compile_model`` before it compiles, not applied at import: ``torch.compiler.disable``
    imports torch._dynamo, which cost every process that imports the models 1.5 s (measured with
    ``python -X importtime``, 2026-12-07), Ray Train workers and labelling actors included."""
    split = VQEmbeddingEMA._split_into_dead_codes
    if not getattr(split, "_lapo_eager", False):
        eager = torch.compiler.disable(split)
        eager._lapo_eager = True
        VQEmbeddingEMA._split_into_dead_codes = eager
