"""A compact pre-norm Vision Transformer with fixed 2-D sin-cos position embeddings (MAE style).

Shapes: B batch, L = (H/p) * (W/p) patches in row-major order (index = row * grid_w + col), D width,
T = L + 1 when a CLS token is used (it sits at index 0 and gets no position embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


@dataclass(frozen=True)
class ViTConfig:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.depth <= 0 or self.heads <= 0:
            raise ValueError(f"ViTConfig: dim, depth and heads must be positive, got {self}")
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % 4:
            raise ValueError(f"ViTConfig: dim {self.dim} must be a multiple of 4 for 2-D sin-cos positions")


def vit_config(name: str, *, dim: int | None = None, depth: int | None = None, heads: int | None = None,
               mlp_ratio: float | None = None) -> ViTConfig:
    """The named size ("tiny", "small", "base") with optional overrides (e.g. a 2-block model for tests)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; expected one of {sorted(_SIZES)}")
    cfg = ViTConfig(*_SIZES[name])
    overrides = {"dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [grid_h * grid_w, dim], row-major; first half encodes the column, second
    half the row, each as [sin, cos] over dim/4 frequencies (the MAE layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, p*p*3]: patches row-major, each flattened as (row in patch, column in patch,
    channel), MAE's 'nchpwq->nhwpqc'."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, D] -> (out [B, N, D], attention [B, heads, N, N] or None). SDPA unless return_attn.
        ``attn_mask``: bool [B or 1, 1, N, N], True where query row i may attend to key column j (every row needs
        one True)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = None
        if return_attn:
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            attn = logits.float().softmax(dim=-1).to(v.dtype)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), attn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch x [B, ...]: zero whole samples with probability ``p`` and scale the
    rest by 1 / (1 - p) while training (draws from torch's global RNG); the identity otherwise."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); each branch dropped per sample with
    probability ``drop_path`` while training (stochastic depth, for fine-tuning)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, return_attn: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn = self.attn(self.norm1(x), return_attn, attn_mask)
        x = x + drop_path(a, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training), attn


@dataclass
class TransformerStates:
    """out: final-normed output [B, N, D]; hidden: [input, block 1 output, ..., block depth output], each
    [B, N, D] (the residual stream, before the final norm); attn: per block [B, heads, N, N] when asked."""

    out: torch.Tensor
    hidden: list[torch.Tensor]
    attn: list[torch.Tensor] = field(default_factory=list)


class Transformer(nn.Module):
    """A stack of pre-norm blocks followed by a final LayerNorm; block i drops its branches with probability
    ``drop_path * i / (depth - 1)`` (the linear rule of DeiT / MAE fine-tuning)."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D] via SDPA (``attn_mask`` as :meth:`Attention.forward`)."""
        for blk in self.blocks:
            x, _ = blk(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward_states(self, x: torch.Tensor, return_attn: bool = False,
                       attn_mask: torch.Tensor | None = None) -> TransformerStates:
        """As forward, keeping each block's input and output; return_attn takes the explicit-softmax path."""
        states = TransformerStates(out=x, hidden=[x])
        for blk in self.blocks:
            x, attn = blk(x, return_attn, attn_mask)
            states.hidden.append(x)
            if attn is not None:
                states.attn.append(attn)
        states.out = self.norm(x)
        return states


class ViT(nn.Module):
    """Conv patch embedding + fixed sin-cos positions + optional CLS + Transformer."""

    def __init__(self, cfg: ViTConfig, image_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 cls_token: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.cfg = cfg
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.patch_embed = nn.Conv2d(in_chans, cfg.dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cls_token else None
        # Fixed, so not saved: checkpoints stay valid if the formula's dtype/device handling changes.
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.dim, *self.grid)[None], persistent=False)
        self.blocks = Transformer(cfg, drop_path)
        init_weights(self)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix(self) -> int:
        """Tokens in front of the patches (1 with a CLS token)."""
        return 0 if self.cls_token is None else 1

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch embeddings [B, L, D], row-major, without positions."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            size = self.image_size
            raise ValueError(f"expected {size}x{size} images, got {tuple(images.shape[-2:])}")
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, num_prefix + N, D]."""
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoding: [B, C, H, W] -> [B, T, D]."""
        return self.blocks(self.prepend_cls(self.embed_patches(images) + self.pos_embed))

    def features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Image features [B, D]: the CLS token's output (``pool="cls"``, models with one) or the mean of the
        patch tokens' outputs (``"mean"``, CLS excluded)."""
        out = self.forward(images)
        if pool == "cls":
            if self.cls_token is None:
                raise ValueError("pool 'cls': this model has no CLS token (trained without --cls-token)")
            return out[:, 0]
        if pool != "mean":
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        return out[:, self.num_prefix:].mean(dim=1)


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (and the patch conv, viewed as a linear), zero biases,
    unit LayerNorms, N(0, 0.02) for CLS/mask tokens (any parameter named *_token)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("_token"):
            nn.init.normal_(p, std=0.02)
