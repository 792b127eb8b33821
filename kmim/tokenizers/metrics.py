"""Tokenizer quality before training: TCAS, codebook utilization and token perplexity.

All metrics start from a token-by-class count matrix ``R[i, j]`` = number of patches with token ``i``
in images of class ``j``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from fsspec import AbstractFileSystem

from kmim.datasets.manifest import TokenCounts, dataset_counts, read_manifest


def tcas(counts: np.ndarray) -> float:
    """Token-Class Alignment Similarity (ClusterMIM), lower is better. counts [K, C] patch counts.

    Rows are normalized to sum 1 (R-bar: each token's class distribution), C = R-bar R-bar^T, and only tokens
    that occur count toward K (the report gives utilization beside it), as in the K-MIM paper's tables:
    TCAS = (1/K) sum_i (1 - C_ii)^2 + (1/K^2) sum_{i != i'} C_ii'^2. (The paper's second rendering of Eq. 8
    has (1 - |R-bar_i|_2)^2 in the first term; with 100 classes that form cannot exceed 0.81, yet the paper
    reports 0.86 for dVAE.) A tokenizer whose every token lives in one class scores 0; a single token shared
    by C equally frequent classes scores (1 - 1/C)^2.
    """
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts.sum(1) > 0]
    if counts.shape[0] == 0:
        raise ValueError("TCAS of an empty token histogram")
    r = counts / counts.sum(1, keepdims=True)
    k = r.shape[0]
    gram = r @ r.T
    diag = np.diag(gram)
    off = (gram**2).sum() - (diag**2).sum()
    return float(((1 - diag) ** 2).sum() / k + off / k**2)


def perplexity(hist: np.ndarray) -> float:
    """exp(entropy) of a token histogram [K]: the effective number of codes in use."""
    p = np.asarray(hist, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def token_report(counts: np.ndarray, k: int, samples: int, labeled: bool) -> dict:
    """The tokenizer report: counts [K, C] (C = 1 and ``labeled=False`` when there are no labels)."""
    hist = counts.sum(1)
    empty = hist.sum() == 0
    used = int((hist > 0).sum())
    return {"tcas": tcas(counts) if labeled and not empty else None, "utilization": used / k,
            "perplexity": 0.0 if empty else perplexity(hist), "k": k, "used_codes": used, "samples": samples,
            "patches": int(hist.sum()), "classes": int(counts.shape[1]) if labeled else None}


def dataset_report(root: str | Path, fs: AbstractFileSystem | None = None) -> dict:
    """Tokenizer report of a committed dataset, from the token counts in its shard indexes.

    ``root`` is a directory, or a path inside the fsspec filesystem ``fs`` when given.
    """
    manifest = read_manifest(root, fs)
    return counts_report(dataset_counts(root, manifest, fs), manifest["samples"])


def counts_report(counted: TokenCounts, samples: int) -> dict:
    """The tokenizer report of token-by-label counts (label -1 anywhere: unlabeled, no TCAS) over ``samples``."""
    k = counted.k
    by_label = counted.by_label
    labels = sorted(by_label)
    labeled = bool(labels) and -1 not in labels
    counts = np.stack([by_label[lab] for lab in labels], axis=1) if labels else np.zeros((k, 1), np.int64)
    if not labeled:
        counts = counts.sum(1, keepdims=True)
    return token_report(counts, k, samples, labeled)
