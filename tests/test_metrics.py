"""TCAS, utilization and perplexity against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from kmim.tokenizers.metrics import perplexity, tcas, token_report


def test_label_tokenizer_scores_zero() -> None:
    # one token per class: token i occurs only in images of class i
    counts = np.array([[5, 0, 0], [0, 7, 0], [0, 0, 2]])
    assert tcas(counts) == pytest.approx(0.0, abs=1e-12)
    # two tokens sharing a class are penalized by the off-diagonal term: (1/K^2) * 2 * 1
    assert tcas(np.vstack([counts, [3, 0, 0]])) == pytest.approx(2 / 16)


def test_single_token_codebook_scores_the_maximum() -> None:
    counts = np.array([[10, 10, 10, 10]])  # one token, four equally frequent classes
    assert tcas(counts) == pytest.approx((1 - 1 / 4) ** 2)  # the paper's reference value (1 - 1/C)^2
    hundred = np.full((1, 100), 7)  # with 100 classes the C_ii form reaches 0.98 (the paper reports dVAE at 0.86)
    assert tcas(hundred) == pytest.approx(0.99**2) and tcas(hundred) > 0.86
    partial = np.array([[10, 10, 0, 0], [0, 0, 10, 10]])  # halves the classes: better aligned
    assert tcas(partial) < tcas(counts)
    assert tcas(np.array([[20, 0, 0, 0], [0, 20, 0, 0], [0, 0, 20, 0], [0, 0, 0, 20]])) < tcas(partial)


def test_tcas_small_example_by_hand() -> None:
    counts = np.array([[3, 1], [0, 4]])  # R1 = (.75, .25), R2 = (0, 1)
    r1 = np.array([0.75, 0.25])
    first = ((1 - r1 @ r1) ** 2 + 0.0) / 2  # C_11 = |R1|^2 = 0.625; C_22 = 1
    second = 2 * (r1 @ np.array([0.0, 1.0])) ** 2 / 4
    assert tcas(counts) == pytest.approx(first + second)
    # unused tokens do not count toward K
    assert tcas(np.vstack([counts, [0, 0]])) == pytest.approx(tcas(counts))


def test_perplexity_and_report() -> None:
    assert perplexity(np.array([5, 5, 5, 5, 0])) == pytest.approx(4.0)
    assert perplexity(np.array([9, 0])) == pytest.approx(1.0)
    rep = token_report(np.array([[4, 0], [0, 4], [0, 0], [0, 0]]), k=4, samples=2, labeled=True)
    assert rep["utilization"] == 0.5 and rep["tcas"] == pytest.approx(0.0) and rep["perplexity"] == pytest.approx(2)
    assert token_report(np.array([[4], [4]]), k=2, samples=2, labeled=False)["tcas"] is None
