"""Masked Token Optimization (MTO) losses ("Masked Token Optimization", added to the layers that see mask tokens).

Inputs are the token representations of the layers that see mask tokens (the decoder for K-MIM/MAE, the
encoder for BEiT), patch tokens only (no CLS), in row-major patch order:

- X(0) is the input of the first such layer (embeddings with mask tokens and positions added);
- X(l), l = 1..n, is the residual-stream output of block l (before the final LayerNorm).

With M the masked and V the visible patches of a sample:

- H(l) = -(1/|M|) sum_{i in M} sum_{j in V} A_ij log A_ij, A = softmax over j in V of X_M X_V^T,
  averaged over the batch;
- L_spa = -sum_{i in V} sum_{j in all} p_ij log p_ij, p = row-softmax(X(0) X(0)^T) (j includes i itself),
  summed over V as printed and averaged over the batch, so it grows with |V|: w_spa defaults small;
- L_e = 1 / (H(0) + eps): eps also bounds L_e and its gradient while H(0) is near 0;
- L_r = sum_{l=1..n} softplus(H(l) - H(l-1)), which asks heterogeneity to fall with depth. (The printed Eq. 5
  has the difference the other way round; the paper's text, its Fig. 1 and its ablation, where L_r alone drives
  H to zero, all call for heterogeneity falling with depth, which is what this form asks.)

Dot products are raw, as in the formulas; ``scale=True`` divides them by sqrt(D). Everything is computed in
float32 outside autocast: entropies of near one-hot bf16 softmaxes are too coarse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MTOConfig:
    w_spa: float = 0.01
    w_e: float = 1.0
    w_r: float = 1.0
    eps: float = 0.1
    scale: bool = False

    def __post_init__(self) -> None:
        if min(self.w_spa, self.w_e, self.w_r) < 0 or self.eps <= 0:
            raise ValueError(f"MTOConfig: weights must be >= 0 and eps > 0, got {self}")


@dataclass
class MTOTerms:
    """loss: w_spa * spa + w_e * e + w_r * r (differentiable); h: H(0..n), detached, for logging."""

    loss: torch.Tensor
    spa: torch.Tensor
    e: torch.Tensor
    r: torch.Tensor
    h: list[torch.Tensor]


def _similarity(x: torch.Tensor, scale: bool) -> torch.Tensor:
    """[B, L, D] -> float32 dot products [B, L, L]."""
    x = x.float()
    s = x @ x.transpose(1, 2)
    return s * x.shape[-1] ** -0.5 if scale else s


def _row_entropy(scores: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy [B, L] of each row's softmax over the columns where cols [B, L] is True (all when None)."""
    if cols is None:
        logp = scores.log_softmax(dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)
    allowed = cols[:, None, :]
    logp = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    # Excluded columns have p = 0 and log p = -inf; zeroing log p there keeps value and gradient finite.
    return -(logp.exp() * logp.masked_fill(~allowed, 0.0)).sum(dim=-1)


def heterogeneity(x: torch.Tensor, mask: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """H of one layer: x [B, L, D], mask [B, L] bool (True = masked) -> scalar."""
    with torch.autocast(x.device.type, enabled=False):
        ent = _row_entropy(_similarity(x, scale), ~mask)
        m = mask.float()
        return ((ent * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()


def sparsity_loss(x: torch.Tensor, mask: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """L_spa on the input embedding: x [B, L, D], mask [B, L] bool (True = masked) -> scalar."""
    with torch.autocast(x.device.type, enabled=False):
        ent = _row_entropy(_similarity(x, scale))
        return (ent * (~mask).float()).sum(dim=1).mean()


def mto_losses(hidden: list[torch.Tensor], mask: torch.Tensor, cfg: MTOConfig) -> MTOTerms:
    """hidden: [X(0), ..., X(n)], each [B, L, D] over patch tokens; mask [B, L] bool (True = masked)."""
    if len(hidden) < 2:
        raise ValueError("MTO needs the input and at least one block output")
    h = [heterogeneity(x, mask, cfg.scale) for x in hidden]
    spa = sparsity_loss(hidden[0], mask, cfg.scale)
    e = 1.0 / (h[0] + cfg.eps)
    r = torch.stack([F.softplus(h[i] - h[i - 1]) for i in range(1, len(h))]).sum()
    loss = cfg.w_spa * spa + cfg.w_e * e + cfg.w_r * r
    return MTOTerms(loss=loss, spa=spa, e=e, r=r, h=[v.detach() for v in h])
