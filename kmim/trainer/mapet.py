"""MaPeT's permutations and two-stream attention mask (the objective is :class:`kmim.trainer.objectives.MaPeT`).

MaPeT: masked and permuted pre-training with two-stream attention, predicting stored tokens.

Per sample, a random permutation z of the N patch positions and a cutting point c (the same for the batch):
ranks 0..c-1 are the context, the N - c positions z_c..z_{N-1} are the targets, predicted autoregressively in
permuted order. ``rank[i]`` is the place of patch i in z. Sequence layout of one pass (T = N - c):

    [CLS (if the encoder has one)] [C_0 .. C_{N-1}] [P_c .. P_{N-1}] [Q_c .. Q_{N-1}]

- C_i: the content of patch i (its embedding + position), in patch order;
- P_t: a position token of target rank t, ``M + pos(z_t)`` (one learnable M), appended to the content stream
  (MPNet's position compensation: every prediction knows where all targets sit);
- Q_t: the query stream of target rank t, also ``M + pos(z_t)`` at the input.

One boolean mask over that sequence (True = may attend) makes it two-stream with shared weights (every block,
LayerNorm and MLP are per token; nobody attends to a Q):

- C at rank a sees C at ranks <= a and the P of targets from rank a on (a <= c: all of them), M_{z>=t};
- Q at rank t sees C at ranks < t and the P of targets from rank t on;
- P tokens (the paper leaves their view open; chosen here) see the context C (ranks < c), every P and the CLS:
  they carry positions and context only, never a target's content;
- CLS sees what a P sees; everyone sees the CLS.

Invariant (tested): Q_t's output depends on the contents of ranks < t only, through any layer: C at rank < t
sees ranks < t only, P and CLS see the context only. The loss is the cross-entropy over K of the final-normed
Q_t outputs against the stored token of patch z_t. Fine-tuning and probing use the content stream alone: the
plain encoder. With MTO the layers' patch-order states are C for context patches and Q for targets (the
targets are the masked tokens, the context the visible ones).
"""

from __future__ import annotations

import torch

DEFAULT_RECONSTRUCTION_RATIO = 0.7


def cut_point(num_patches: int, cut: int | None = None, reconstruction_ratio: float | None = None) -> int:
    """The cutting point c in [1, N - 1]: ``cut``, else ``round((1 - ratio) * N)`` (default ratio 0.7; the paper
    uses c = 50 of 196 patches for ViT-T/S)."""
    if num_patches < 2:
        raise ValueError(f"MaPeT needs at least 2 patches, got {num_patches}")
    if cut is not None:
        if not 1 <= cut < num_patches:
            raise ValueError(f"field 'cut': {cut} is not in [1, {num_patches - 1}] for {num_patches} patches")
        return cut
    ratio = DEFAULT_RECONSTRUCTION_RATIO if reconstruction_ratio is None else reconstruction_ratio
    return min(max(round((1.0 - ratio) * num_patches), 1), num_patches - 1)


def permutations(batch: int, n: int, generator: torch.Generator | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random permutations: (z [B, N], rank [B, N]) int64 on ``device``, z[b, t] = the patch at place t,
    rank[b, z[b, t]] = t. Drawn on the CPU from ``generator``, so they do not depend on the device."""
    z = torch.rand(batch, n, generator=generator).argsort(dim=1).to(device)
    return z, z.argsort(dim=1)


def two_stream_mask(rank: torch.Tensor, cut: int, prefix: int = 0) -> torch.Tensor:
    """bool [B, L, L] over the module docstring's layout (L = prefix + N + 2 T), True = row may attend to column;
    ``rank`` [B, N] int64, ``prefix`` 1 with a CLS token."""
    b, n = rank.shape
    t = n - cut
    dev = rank.device
    targets = torch.arange(cut, n, device=dev)  # ranks of the P and Q tokens, [T]
    context = (rank < cut)[:, None, :]  # [B, 1, N]
    c_rows = torch.cat([rank[:, None, :] <= rank[:, :, None], (targets[None, None, :] >= rank[:, :, None])
                        .expand(b, n, t)], dim=2)  # [B, N, N + T]
    p_rows = torch.cat([context.expand(b, t, n), torch.ones(b, t, t, dtype=torch.bool, device=dev)], dim=2)
    q_rows = torch.cat([rank[:, None, :] < targets[None, :, None], (targets[None, None, :] >= targets[None, :, None])
                        .expand(b, t, t)], dim=2)  # [B, T, N + T]
    rows = torch.cat([c_rows, p_rows, q_rows], dim=1)  # [B, N + 2T, N + T]
    if prefix:  # everyone sees the CLS column; the CLS row sees itself, the context and every P
        cls_row = torch.cat([context, torch.ones(b, 1, t, dtype=torch.bool, device=dev)], dim=2)
        rows = torch.cat([cls_row, rows], dim=1)
        rows = torch.cat([torch.ones(b, rows.shape[1], 1, dtype=torch.bool, device=dev), rows], dim=2)
    no_query = torch.zeros(b, rows.shape[1], t, dtype=torch.bool, device=dev)
    return torch.cat([rows, no_query], dim=2)
