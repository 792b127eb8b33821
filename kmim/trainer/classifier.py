"""The fine-tuning model: a pre-trained ViT encoder with a linear classification head, and its optimizer groups.

``Classifier(images [B, 3, S, S]) -> logits [B, classes]``. Features are the CLS token's output (``pool="cls"``)
or the mean of the patch tokens' outputs followed by a LayerNorm (``"mean"``, MAE's global pool with its
``fc_norm``; the encoder's own final norm is kept, as in BEiT). The head starts at N(0, 2e-5) weights and zero
bias (MAE). Layer-wise lr decay (BEiT): the patch embedding and the CLS token are layer 0, block i is layer
i + 1, the final norm, ``fc_norm`` and the head are layer n + 1 (n blocks); layer l learns at
``decay ** (n + 1 - l)`` times the peak lr.
"""

from __future__ import annotations

import torch
from torch import nn

from kmim.trainer.objectives import bf16_autocast
from kmim.trainer.vit import ViT


class Classifier(nn.Module):
    """A :class:`ViT` encoder, pooled, and a linear head over ``classes``."""

    def __init__(self, encoder: ViT, classes: int, pool: str, amp: bool = True) -> None:
        super().__init__()
        if pool not in ("cls", "mean") or (pool == "cls" and encoder.cls_token is None):
            raise ValueError(f"field 'pool': {pool!r} is not available (CLS token: {encoder.cls_token is not None})")
        self.encoder, self.pool, self.amp = encoder, pool, amp
        self.fc_norm = nn.LayerNorm(encoder.cfg.dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(encoder.cfg.dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalized images -> float32 logits [B, classes] (bf16 autocast on CUDA with ``amp``)."""
        with bf16_autocast(images, self.amp):
            return self.head(self.fc_norm(self.encoder.features(images, self.pool))).float()


def layer_id(name: str, depth: int) -> int:
    """The lr-decay layer of parameter ``name`` of a :class:`Classifier` with ``depth`` blocks."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
        return 0
    if name.startswith("encoder.blocks.blocks."):
        return int(name.split(".")[3]) + 1
    return depth + 1


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, one per (layer, decayed or not), in a fixed order; each carries ``lr_scale``. Biases, norm
    weights and tokens (parameters with < 2 dims) get no weight decay."""
    depth = model.encoder.cfg.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        layer, decay = layer_id(name, depth), p.ndim >= 2
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer), "layer": layer})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]
