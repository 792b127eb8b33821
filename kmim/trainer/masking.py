"""Patch masking: MAE per-sample random masking and BEiT block-wise masking.

Masks are boolean [B, L] over row-major patches with True = masked. Both take an optional
``torch.Generator`` so a seeded generator reproduces the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RandomMask:
    """ids_keep [B, L_keep]: visible patch indices in shuffled order (what the encoder sees);
    ids_restore [B, L]: argsort of the shuffle, to put [visible, mask tokens] back in patch order;
    mask [B, L] bool, True = masked."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def random_masking(batch: int, length: int, mask_ratio: float, *, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> RandomMask:
    """MAE masking: every sample keeps exactly int(length * (1 - mask_ratio)) patches, chosen uniformly."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(length * (1 - mask_ratio))
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, length, generator=generator, device=noise_device).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = ids_restore >= len_keep
    return RandomMask(ids_keep=ids_shuffle[:, :len_keep], ids_restore=ids_restore, mask=mask)


def block_masking(batch: int, grid_h: int, grid_w: int, num_masked: int, *, min_block: int = 16,
                  min_aspect: float = 0.3, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """BEiT block-wise masking -> bool [B, grid_h * grid_w].

    Per sample, rectangles of area uniform between min_block and the remaining count, and log-uniform
    aspect ratio in [min_aspect, 1/min_aspect], are added until num_masked patches are masked; a
    rectangle that would overshoot is redrawn (10 tries), so a sample may end slightly below num_masked,
    never above.
    """
    if not 0 < num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked must be in [1, {grid_h * grid_w}], got {num_masked}")
    # A numpy stream seeded from the torch generator: the draws are scalars, and numpy's are cheap.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=getattr(generator, "device", None)))
    rng = np.random.default_rng(seed)
    min_block = min(min_block, num_masked)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masks = np.zeros((batch, grid_h, grid_w), dtype=bool)
    for m in masks:
        count = 0
        while count < num_masked:
            delta = _add_block(m, rng, min_block, num_masked - count, log_aspect)
            if delta == 0:
                break
            count += delta
    return torch.from_numpy(masks.reshape(batch, -1)).to(device)


def _add_block(mask: np.ndarray, rng: np.random.Generator, min_block: int, max_new: int,
               log_aspect: tuple[float, float]) -> int:
    """Mask one random rectangle adding 1..max_new new patches in place; returns how many were added."""
    grid_h, grid_w = mask.shape
    for _ in range(10):
        area = min_block + (max_new - min_block) * rng.random()  # as BEiT: also when max_new < min_block
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if 0 < h < grid_h and 0 < w < grid_w:
            top = int(rng.integers(0, grid_h - h + 1))
            left = int(rng.integers(0, grid_w - w + 1))
            block = mask[top:top + h, left:left + w]
            new = int(h * w - block.sum())
            if 0 < new <= max_new:
                block[...] = True
                return new
    return 0
