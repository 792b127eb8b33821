"""MTO losses against a direct loop-based transcription of the formulas in DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch

from kmim.trainer.mto import MTOConfig, heterogeneity, mto_losses, sparsity_loss


def _softmax_entropy(scores: list[float]) -> float:
    top = max(scores)
    z = sum(math.exp(s - top) for s in scores)
    probs = [math.exp(s - top) / z for s in scores]
    return -sum(p * math.log(p) for p in probs if p > 0)


def _dot(x: torch.Tensor, b: int, i: int, j: int, scale: bool) -> float:
    d = x.shape[-1]
    s = sum(float(x[b, i, c]) * float(x[b, j, c]) for c in range(d))
    return s / math.sqrt(d) if scale else s


def ref_h(x: torch.Tensor, mask: torch.Tensor, scale: bool) -> float:
    per_sample = []
    for b in range(x.shape[0]):
        masked = [i for i in range(x.shape[1]) if mask[b, i]]
        visible = [j for j in range(x.shape[1]) if not mask[b, j]]
        total = sum(_softmax_entropy([_dot(x, b, i, j, scale) for j in visible]) for i in masked)
        per_sample.append(total / len(masked))
    return sum(per_sample) / len(per_sample)


def ref_spa(x: torch.Tensor, mask: torch.Tensor, scale: bool) -> float:
    per_sample = []
    for b in range(x.shape[0]):
        visible = [i for i in range(x.shape[1]) if not mask[b, i]]
        per_sample.append(sum(_softmax_entropy([_dot(x, b, i, j, scale) for j in range(x.shape[1])])
                              for i in visible))
    return sum(per_sample) / len(per_sample)


def _inputs(seed: int = 0, layers: int = 4, b: int = 3, length: int = 7, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(b, length, d, generator=g) * 0.7 for _ in range(layers)]
    # Masked counts differ per sample (as with block masking).
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1],
                         [0, 1, 0, 0, 0, 1, 0],
                         [1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    return hidden, mask


@pytest.mark.parametrize("scale", [False, True])
def test_heterogeneity_and_sparsity_match_loops(scale: bool) -> None:
    hidden, mask = _inputs()
    for x in hidden:
        assert heterogeneity(x, mask, scale).item() == pytest.approx(ref_h(x, mask, scale), rel=1e-5)
    x0 = hidden[0]
    assert sparsity_loss(x0, mask, scale).item() == pytest.approx(ref_spa(x0, mask, scale), rel=1e-5)


@pytest.mark.parametrize("scale", [False, True])
def test_mto_losses_match_loops(scale: bool) -> None:
    hidden, mask = _inputs(seed=1)
    cfg = MTOConfig(w_spa=0.3, w_e=0.7, w_r=1.3, eps=0.05, scale=scale)
    terms = mto_losses(hidden, mask, cfg)
    h = [ref_h(x, mask, scale) for x in hidden]
    spa = ref_spa(hidden[0], mask, scale)
    e = 1.0 / (h[0] + cfg.eps)
    r = sum(math.log1p(math.exp(h[i] - h[i - 1])) for i in range(1, len(h)))
    assert [v.item() for v in terms.h] == pytest.approx(h, rel=1e-5)
    assert terms.spa.item() == pytest.approx(spa, rel=1e-5)
    assert terms.e.item() == pytest.approx(e, rel=1e-5)
    assert terms.r.item() == pytest.approx(r, rel=1e-5)
    assert terms.loss.item() == pytest.approx(0.3 * spa + 0.7 * e + 1.3 * r, rel=1e-5)
    assert all(not v.requires_grad for v in terms.h)


def test_identical_tokens_give_uniform_attention() -> None:
    # All-equal scores: A is uniform over V, so H = log |V| per masked row.
    x = torch.ones(2, 6, 4)
    mask = torch.tensor([[1, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = (math.log(3) + math.log(5)) / 2
    assert heterogeneity(x, mask).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_are_finite_with_one_hot_attention() -> None:
    # Large dot products make the softmax one-hot; excluded columns must not turn 0 * log 0 into NaN.
    hidden, mask = _inputs(seed=2)
    hidden = [(x * 30).requires_grad_() for x in hidden]
    mto_losses(hidden, mask, MTOConfig()).loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in hidden)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="eps"):
        MTOConfig(eps=0.0)
    with pytest.raises(ValueError, match="weights"):
        MTOConfig(w_r=-1.0)
    hidden, mask = _inputs()
    with pytest.raises(ValueError, match="at least one block"):
        mto_losses(hidden[:1], mask, MTOConfig())
