"""MaPeT: the two-stream mask against a loop-based construction, the no-leak invariant (perturbation and gradient),
the loss falling on tiny data, and a 2-process gloo DDP run."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY, dataset, free_port, rows  # noqa: F401  (dataset is a fixture)

from kmim.trainer.config import TrainConfig
from kmim.trainer.engine import train
from kmim.trainer.mapet import cut_point, permutations, two_stream_mask
from kmim.trainer.objectives import MaPeT, build_objective
from kmim.trainer.vit import ViT, vit_config

BIN = Path(sys.executable).parent


def loop_mask(z: list[int], c: int, prefix: int) -> torch.Tensor:
    """The mask spelled out token by token from the module docstring's rules."""
    n = len(z)
    rank = {p: t for t, p in enumerate(z)}
    tokens = [("cls", None)] * prefix + [("C", rank[i]) for i in range(n)] + [("P", t) for t in range(c, n)] + \
        [("Q", t) for t in range(c, n)]

    def sees(row: tuple, col: tuple) -> bool:
        (rk, r), (ck, k) = row, col
        if ck == "Q":
            return False
        if ck == "cls":
            return True
        if rk in ("cls", "P"):
            return ck == "P" or k < c
        if rk == "C":
            return k <= r if ck == "C" else k >= r
        return k < r if ck == "C" else k >= r  # Q

    return torch.tensor([[sees(r, k) for k in tokens] for r in tokens])


@pytest.mark.parametrize(("n", "c"), [(6, 1), (6, 3), (6, 5), (9, 4)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_mask_equals_the_loop_construction(n: int, c: int, prefix: int) -> None:
    z, rank = permutations(3, n, torch.Generator().manual_seed(n * 10 + c), torch.device("cpu"))
    mask = two_stream_mask(rank, c, prefix)
    assert mask.shape == (3, prefix + n + 2 * (n - c), prefix + n + 2 * (n - c))
    for b in range(3):
        assert torch.equal(mask[b], loop_mask(z[b].tolist(), c, prefix)), (b, z[b])
        assert bool(mask[b].any(dim=1).all())  # every row attends somewhere (no NaN rows in SDPA)


def test_cut_point() -> None:
    assert cut_point(196, cut=50) == 50
    assert cut_point(196) == round(0.3 * 196) and cut_point(64, reconstruction_ratio=0.75) == 16
    assert cut_point(4, reconstruction_ratio=0.99) == 1 and cut_point(4, reconstruction_ratio=0.01) == 3
    with pytest.raises(ValueError, match="field 'cut'"):
        cut_point(16, cut=16)


def tiny_mapet(cls_token: bool, cut: int) -> MaPeT:
    torch.manual_seed(0)
    vit = ViT(vit_config("tiny", dim=32, depth=3, heads=2), image_size=16, patch_size=4, cls_token=cls_token)
    return MaPeT(vit, k=11, cut=cut, amp=False).eval()


def patch_slice(patch: int) -> tuple:
    r, c = divmod(patch, 4)
    return (slice(None), slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("cut", [1, 5, 15])
def test_a_target_never_sees_its_own_content(cls_token: bool, cut: int) -> None:
    model = tiny_mapet(cls_token, cut)
    images = torch.randn(2, 3, 16, 16)
    logits, z, _ = model.predict(images, torch.Generator().manual_seed(1))
    for t in range(cut, 16):
        target = int(z[0, t])
        changed = images.clone()
        changed[0][patch_slice(target)[1:]] += 5.0
        out, z2, _ = model.predict(changed, torch.Generator().manual_seed(1))
        assert torch.equal(z, z2)
        u = t - cut
        # Its own and every earlier target's prediction ignore its content; later ones see it.
        assert torch.allclose(out[0, :u + 1], logits[0, :u + 1], atol=1e-6), (t, target)
        if u + 1 < 16 - cut:
            assert not torch.allclose(out[0, u + 1:], logits[0, u + 1:], atol=1e-4)
        assert torch.equal(out[1], logits[1])  # the other sample is untouched
    # The gradient of a target's logits w.r.t. its own pixels is exactly zero, not w.r.t. an earlier patch.
    x = images.clone().requires_grad_(True)
    logits, z, _ = model.predict(x, torch.Generator().manual_seed(1))
    last = 15 - cut
    logits[0, last].sum().backward()
    assert x.grad[0][patch_slice(int(z[0, 15]))[1:]].abs().max() == 0
    assert x.grad[0][patch_slice(int(z[0, 14]))[1:]].abs().max() > 0


def test_objective_outputs_and_mto() -> None:
    model = build_objective("mapet", "tiny", 16, 4, k=11, encoder=vit_config("tiny", dim=32, depth=2, heads=2),
                            mto=None, amp=False)
    tokens = torch.randint(0, 11, (2, 4, 4))
    out = model(torch.randn(2, 3, 16, 16), tokens, generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and 0 <= float(out["acc"]) <= 1 and model.cut == round(0.3 * 16)
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.encoder.patch_embed.weight.grad is not None
    from kmim.trainer.mto import MTOConfig

    with_mto = build_objective("mapet", "tiny", 16, 4, k=11, encoder=vit_config("tiny", dim=32, depth=2, heads=2),
                               mto=MTOConfig(), amp=False)
    out = with_mto(torch.randn(2, 3, 16, 16), tokens, generator=torch.Generator().manual_seed(0))
    assert len(out["mto_h"]) == 3 and torch.isfinite(out["loss"])


def test_config_refusals() -> None:
    with pytest.raises(ValueError, match="reconstruction_ratio or cut"):
        TrainConfig(data="d", out="o", objective="mapet", mask_ratio=0.5)
    with pytest.raises(ValueError, match="only used with objective mapet"):
        TrainConfig(data="d", out="o", objective="kmim", cut=10)
    with pytest.raises(ValueError, match="no decoder"):
        TrainConfig(data="d", out="o", objective="mapet", decoder_dim=64)


def test_loss_falls(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    train(TrainConfig(data=str(dataset), out=str(tmp_path / "run"), objective="mapet", batch_size=16, lr=1e-3,
                      log_every=1, epochs=4, cls_token=True, **TINY))
    losses = [r["loss"] for r in rows(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses


def test_ddp_two_gloo_processes(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(BIN / "kmim"), "train", "--data", str(dataset),
           "--out", str(run), "--objective", "mapet", "--cut", "20", "--batch-size", "8", "--accum-steps", "2",
           "--max-steps", "3", "--log-every", "1", "--mto", "--device", "cpu",
           *itertools.chain.from_iterable((f"--{k.replace('_', '-')}", str(v)) for k, v in TINY.items())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = rows(run / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3] and all("mto_h" in r and "acc" in r for r in logged)
    assert json.loads((run / "config.json").read_text())["config"]["cut"] == 20
