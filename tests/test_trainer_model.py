"""ViT, masking and the three MIM objectives on tiny CPU models."""

from __future__ import annotations

import pytest
import torch

from kmim.trainer.masking import block_masking, random_masking
from kmim.trainer.mto import MTOConfig
from kmim.trainer.objectives import build_objective
from kmim.trainer.vit import Transformer, ViT, ViTConfig, patchify, sincos_pos_embed, vit_config

TINY = ViTConfig(dim=64, depth=2, heads=2)
DECODER = ViTConfig(dim=64, depth=1, heads=2)


def test_vit_config_sizes_and_overrides() -> None:
    assert vit_config("tiny") == ViTConfig(192, 12, 3)
    assert vit_config("small") == ViTConfig(384, 12, 6)
    assert vit_config("base") == ViTConfig(768, 12, 12)
    assert vit_config("tiny", depth=2, dim=64, heads=2) == TINY
    with pytest.raises(ValueError, match="unknown model size"):
        vit_config("huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        ViTConfig(dim=64, depth=2, heads=3)


def test_patchify_order() -> None:
    p, gh, gw = 4, 3, 5
    imgs = torch.zeros(2, 3, gh * p, gw * p)
    for r in range(gh):
        for c in range(gw):
            imgs[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = r * gw + c
    # Within a patch: (row in patch, column in patch, channel).
    imgs[1, 2, 1 * p + 3, 2 * p + 1] = -1.0
    x = patchify(imgs, p)
    assert x.shape == (2, gh * gw, p * p * 3)
    assert torch.equal(x[0], torch.arange(gh * gw, dtype=torch.float32)[:, None].expand(-1, p * p * 3))
    assert x[1, 1 * gw + 2, (3 * p + 1) * 3 + 2] == -1.0
    assert (x[1] == -1).sum() == 1


def test_patch_embedding_is_row_major() -> None:
    vit = ViT(TINY, image_size=32, patch_size=8)
    imgs = torch.zeros(1, 3, 32, 32)
    base = vit.embed_patches(imgs)
    imgs[:, :, 8:16, 24:32] = 1.0  # row 1, column 3
    changed = (vit.embed_patches(imgs) - base).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 3]


def test_sincos_pos_embed_layout() -> None:
    pe = sincos_pos_embed(16, 3, 5).reshape(3, 5, 16)
    # First half depends on the column only, second half on the row only.
    assert torch.allclose(pe[0, :, :8], pe[2, :, :8]) and torch.allclose(pe[:, 0, 8:], pe[:, 4, 8:])
    assert torch.allclose(pe[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert torch.unique(pe.reshape(15, 16), dim=0).shape[0] == 15


def test_sdpa_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    blocks = Transformer(ViTConfig(dim=32, depth=3, heads=4)).eval()
    x = torch.randn(2, 10, 32)
    fast = blocks(x)
    explicit = blocks.forward_states(x, return_attn=True)
    assert torch.allclose(fast, explicit.out, atol=1e-5)
    assert len(explicit.hidden) == 4 and len(explicit.attn) == 3
    assert explicit.attn[0].shape == (2, 4, 10, 10)
    assert torch.allclose(explicit.attn[1].sum(-1), torch.ones(2, 4, 10), atol=1e-5)
    assert torch.allclose(blocks.forward_states(x).out, fast)


def test_random_masking() -> None:
    m = random_masking(4, 20, 0.75, generator=torch.Generator().manual_seed(0))
    assert m.ids_keep.shape == (4, 5) and m.ids_restore.shape == (4, 20) and m.mask.shape == (4, 20)
    assert m.mask.dtype == torch.bool and (m.mask.sum(1) == 15).all()
    assert not m.mask.gather(1, m.ids_keep).any()
    # ids_restore inverts the shuffle: [kept, masked] put back in patch order marks exactly the masked ones.
    order = torch.cat([torch.zeros(4, 5), torch.ones(4, 15)], dim=1).gather(1, m.ids_restore).bool()
    assert torch.equal(order, m.mask)
    again = random_masking(4, 20, 0.75, generator=torch.Generator().manual_seed(0))
    other = random_masking(4, 20, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.mask, m.mask) and not torch.equal(other.mask, m.mask)


def test_block_masking() -> None:
    mask = block_masking(16, 14, 14, 75, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (16, 196) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert (counts <= 75).all() and counts.float().mean() > 60
    again = block_masking(16, 14, 14, 75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, block_masking(16, 14, 14, 75, generator=torch.Generator().manual_seed(1)))


def tiny_dataset(n: int = 16, k: int = 8, size: int = 32, p: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images built from k fixed random 4x4 patch prototypes; the token of a patch is its prototype.
    token = quadrant (0..3) + 4 * (a per-image bit), so a masked token follows from its position and any
    visible patch."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(k, 3, p, p, generator=g)
    grid = size // p
    rows = torch.arange(grid).view(1, grid, 1)
    cols = torch.arange(grid).view(1, 1, grid)
    bit = torch.randint(0, 2, (n, 1, 1), generator=g)
    tokens = (rows >= grid // 2) * 2 + (cols >= grid // 2) + 4 * bit
    imgs = protos[tokens].permute(0, 3, 1, 4, 2, 5).reshape(n, 3, size, size)
    return imgs, tokens


@pytest.mark.parametrize("mto", [None, MTOConfig()], ids=["plain", "mto"])
@pytest.mark.parametrize("name", ["kmim", "mae", "beit"])
def test_objective_loss_falls(name: str, mto: MTOConfig | None) -> None:
    torch.manual_seed(0)
    imgs, tokens = tiny_dataset()
    obj = build_objective(name, image_size=32, patch_size=4, k=8, mto=mto, encoder=TINY, decoder=DECODER)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        out = obj(imgs, tokens, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out.get("loss_main", out["loss"]).item())
    assert losses[-1] < 0.7 * losses[0], losses
    if name != "mae":
        # Below log 2: the model uses the visible patches, not just the masked patch's position.
        assert losses[-1] < 0.5 and out["acc"] > 0.9, losses


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("name", ["kmim", "mae", "beit"])
def test_objective_outputs(name: str, cls_token: bool) -> None:
    imgs, tokens = tiny_dataset(n=4)
    obj = build_objective(name, image_size=32, patch_size=4, k=8, mto=MTOConfig(), encoder=TINY,
                          decoder=DECODER, cls_token=cls_token)
    out = obj(imgs, tokens)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert ("acc" in out) == (name != "mae")
    assert {"loss_main", "mto_loss", "mto_spa", "mto_e", "mto_r", "mto_h"} <= out.keys()
    layers = TINY.depth if name == "beit" else DECODER.depth
    assert len(out["mto_h"]) == layers + 1
    assert torch.allclose(out["loss"].detach(), out["loss_main"] + out["mto_loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in obj.parameters())
    assert obj.encoder_features(imgs).shape == (4, TINY.dim)
    plain = build_objective(name, image_size=32, patch_size=4, k=8, encoder=TINY, decoder=DECODER)
    assert set(plain(imgs, tokens)) == ({"loss"} if name == "mae" else {"loss", "acc"})


def test_objective_errors() -> None:
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("simmim", k=8)
    with pytest.raises(ValueError, match="needs k"):
        build_objective("kmim", encoder=TINY, image_size=32, patch_size=4)
    obj = build_objective("kmim", image_size=32, patch_size=4, k=8, encoder=TINY, decoder=DECODER)
    imgs, tokens = tiny_dataset(n=2)
    with pytest.raises(ValueError, match="token grid shape"):
        obj(imgs, tokens[:, :4])
    with pytest.raises(ValueError, match="needs token grids"):
        obj(imgs, None)
    with pytest.raises(ValueError, match="32x32"):
        obj(torch.zeros(2, 3, 48, 48), tokens)
