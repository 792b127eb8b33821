"""The GPU paths, made correct on the CPU: IEEE float32 assignment whatever the global matmul precision,
bounded (chunked) exact refinement, thread-count-independent k-means++, and the GPU check script's logic.
Tests marked ``cuda`` also compare the device with the CPU where a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmim.tokenizers import assign, kmeanspp
from kmim.tokenizers.assign import _precision_switches, nearest
from kmim.tokenizers.kmeans import fit_kmeans
from kmim.tokenizers.kmeanspp import kmeans_plus_plus

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def brute_force(x: torch.Tensor, c: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    x64, c64 = x.double()[:, None, :], c.double()[None]
    if metric == "ip":
        return (-(x64 * c64).sum(-1)).argmin(1)
    return ((x64 - c64) ** 2).sum(-1).argmin(1)


def near_ties(metric: str, seed: int = 0, k: int = 64, d: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, d], c [k + 3, d]): random points, points (nearly) halfway between two centroids (within float32
    rounding of their norm), points equal to a centroid, and three duplicated centroids. A large common offset
    makes the float32 GEMM expansion lose digits; for "ip" the centroids are unit vectors (spherical k-means),
    where halfway points tie in inner product too."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g) * 3 + 10
    if metric == "ip":
        c = c / c.norm(dim=1, keepdim=True)
    scale = float(c.norm(dim=1).mean())
    x = (torch.randn(2000, d, generator=g) * 3 + 10) * scale / 70
    a, b = c[torch.randint(k, (600,), generator=g)], c[torch.randint(k, (600,), generator=g)]
    mid = (a + b) / 2 + torch.randn(600, d, generator=g) * 1.5e-7 * scale
    return torch.cat([x, mid, c[:20]]), torch.cat([c, c[:3]])


def precision_state() -> dict:
    """Every reading of torch's float32 matmul precision settings ("raises" where torch refuses a mixed state)."""
    state: dict = {"switches": [s.fp32_precision for s in _precision_switches()]}
    for name, read in (("legacy", torch.get_float32_matmul_precision),
                       ("allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)):
        try:
            state[name] = read()
        except RuntimeError:
            state[name] = "raises"
    return state


@pytest.fixture
def global_precision():
    """Restores the process's matmul precision settings after the test (ieee_fp32 saves and restores them)."""
    with assign.ieee_fp32():
        yield


def _allow_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # what kmim train does on CUDA


def _switches_tf32() -> None:
    for s in _precision_switches():  # torch >= 2.9's per-backend settings alone: a state torch calls mixed
        s.fp32_precision = "tf32"


def _onednn_bf16() -> None:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"


SETTINGS = {"high": lambda: torch.set_float32_matmul_precision("high"),
            "medium": lambda: torch.set_float32_matmul_precision("medium"),
            "allow_tf32": _allow_tf32, "switches_tf32": _switches_tf32, "onednn_bf16": _onednn_bf16}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_nearest_is_exact_under_reduced_global_matmul_precision(global_precision, setting: str, metric: str) -> None:
    """'medium' lets oneDNN use bfloat16 for float32 matmuls on CPUs with AMX / AVX512-BF16 (hundreds of wrong
    tokens here without the override); TF32 ('high', allow_tf32) is the CUDA counterpart."""
    if setting in ("switches_tf32", "onednn_bf16") and len(_precision_switches()) < 2:
        pytest.skip("torch < 2.9 has no per-backend fp32_precision")
    x, c = near_ties(metric)
    ref = brute_force(x, c, metric)
    SETTINGS[setting]()
    before = precision_state()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for method in ("torch", "auto"):
            idx, _ = nearest(x.to(device), c.to(device), metric=metric, method=method)
            assert torch.equal(idx.cpu(), ref), (device, method)
    assert precision_state() == before  # the override is scoped to the call


def test_precision_override_is_scoped_and_consistent(global_precision) -> None:
    torch.set_float32_matmul_precision("medium")
    before = precision_state()
    with assign.ieee_fp32():
        inside = precision_state()
    assert inside["legacy"] == "highest" and inside["allow_tf32"] is False
    assert all(v == "ieee" for v in inside["switches"])
    assert precision_state() == before


def small_chunks(monkeypatch: pytest.MonkeyPatch, k: int, d: int) -> None:
    """Chunk constants that cut the refinement into blocks of 7 rows and the direct recompute into blocks of
    3 rows x 5 centroids, so duplicated centroids land in different blocks."""
    monkeypatch.setattr(assign, "_GEMM_ELEMS", 11 * k)
    monkeypatch.setattr(assign, "_REFINE_ELEMS", 7 * k)
    monkeypatch.setattr(assign, "_EXACT_ELEMS", 15 * d)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_chunked_refinement_equals_unchunked(monkeypatch: pytest.MonkeyPatch, metric: str) -> None:
    x, c = near_ties(metric, seed=1)
    x = torch.cat([x, c[-3:]])  # exact ties between a centroid and its duplicate: the direct recompute decides
    exact_rows = []
    real_exact = assign._exact
    monkeypatch.setattr(assign, "_exact", lambda xs, cs, m: exact_rows.append(len(xs)) or real_exact(xs, cs, m))
    score, best = assign._refine(x, c, metric)
    whole = sum(exact_rows)
    small_chunks(monkeypatch, *c.shape)
    chunked_score, chunked_best = assign._refine(x, c, metric)
    assert whole > 20 and sum(exact_rows) == 2 * whole  # the same rows reached the direct recompute
    assert torch.equal(chunked_best, best) and torch.equal(best, brute_force(x, c, metric))
    torch.testing.assert_close(chunked_score, score, rtol=1e-6, atol=1e-6)
    idx, _ = nearest(x, c, metric=metric, method="torch")  # the whole search with the small chunks
    assert torch.equal(idx, best)


def test_direct_recompute_blocks_keep_lowest_index_on_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    c = torch.randn(12, 8)
    c = torch.cat([c, c])  # every centroid twice, 12 apart
    x = torch.cat([c[:12], torch.randn(50, 8)])
    score, best = assign._exact(x, c, "l2")
    small_chunks(monkeypatch, *c.shape)
    chunked_score, chunked_best = assign._exact(x, c, "l2")
    assert torch.equal(chunked_best, best) and torch.equal(chunked_score, score)
    assert torch.equal(best, brute_force(x, c)) and bool((best[:12] == torch.arange(12)).all())


def blobs(n: int = 3000, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [n, d], the 40 centers [40, d] they scatter around with unit variance)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, d, generator=g) * 5
    return centers[torch.randint(40, (n,), generator=g)] + torch.randn(n, d, generator=g), centers


@pytest.fixture
def parallel_kpp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every sample to the float64 chunked k-means++ loop, in chunks of 128 points."""
    monkeypatch.setattr(kmeanspp, "SERIAL_ELEMS", 0)
    monkeypatch.setattr(kmeanspp, "CHUNK_ELEMS", 128 * 16)


def test_kmeans_plus_plus_does_not_depend_on_thread_count(parallel_kpp) -> None:
    x, centers = blobs()
    threads = torch.get_num_threads()
    picks = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            picks.append(kmeans_plus_plus(x, 40, torch.Generator().manual_seed(0)))
            assert torch.get_num_threads() == n  # restored after the call
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, picks[0]) for p in picks)
    assert len(torch.unique(torch.cdist(picks[0], centers).argmin(1))) >= 35  # seeds spread over the blobs


def test_kmeans_plus_plus_chunks_agree_with_one_block(parallel_kpp, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA runs the float64 loop as one block; on the CPU that block gives the chunked loop's picks."""
    x, _ = blobs()
    chunked = kmeans_plus_plus(x, 40, torch.Generator().manual_seed(1))
    monkeypatch.setattr(kmeanspp, "CHUNK_ELEMS", x.numel())
    assert torch.equal(kmeans_plus_plus(x, 40, torch.Generator().manual_seed(1)), chunked)


def test_kmeans_plus_plus_fills_with_random_points_when_too_few_distinct(parallel_kpp) -> None:
    x = torch.cat([torch.zeros(300, 16), torch.ones(300, 16)])
    c = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(0))
    assert c.shape == (5, 16) and len(torch.unique(c, dim=0)) == 2


@cuda
def test_kmeans_plus_plus_on_cuda_equals_cpu(parallel_kpp) -> None:
    x, _ = blobs()
    cpu = kmeans_plus_plus(x, 40, torch.Generator().manual_seed(0))
    gpu = kmeans_plus_plus(x.cuda(), 40, torch.Generator().manual_seed(0))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)  # equal up to float64 rounding: equal on this data


@cuda
def test_fit_on_cuda_equals_cpu_fit() -> None:
    x, _ = blobs(4000, 8)
    cpu = fit_kmeans(x, 12, epochs=3, batch_size=512, seed=0, device="cpu")
    gpu = fit_kmeans(x, 12, epochs=3, batch_size=512, seed=0, device="cuda")
    assert torch.equal(gpu.centroids, cpu.centroids) and gpu.history == cpu.history


def test_gpu_check_tiny_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--tiny", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] is True and r["tiny"] is True and r["wall_s"] < 60
    gpu = torch.cuda.is_available()
    for name in ("pixel", "dino"):
        check = r["tokens"][name]
        assert check["ok"] and check["same_features_tokens_equal"] and check["faiss_tokens_equal"]
        assert check["unexplained_mismatches"] == 0 and check["patches"] > 0
        assert ("vs cpu" in check["compared"]) and (gpu or check["compared"].startswith("no GPU"))
    tok = r["tokenize"]
    assert tok["images_per_s"] > 0 and set(tok["shares"]) == {"decode", "extract", "assign"}
    assert abs(sum(tok["shares"].values()) - 1) < 0.01
    km = r["kmeans"]
    assert km["kmim"]["seconds"] > 0 and km["faiss"]["seconds"] >= 0 and km["faiss"]["inertia_per_point"] > 0
    assert km["faiss"]["gpu"] is False or gpu
    kpp = km["kmeans_plus_plus"]
    assert kpp["threads_agree"] is True and set(kpp["seconds"]) >= {"cpu_all_threads", "cpu_1_thread"}
    assert (kpp["cuda_equals_cpu"] is None) == (not gpu)
    tr = r["trainer"]
    assert tr["samples_per_s"] > 0 and tr["model_tflops_per_step"] > 0
    if gpu:
        assert tr["precision"] == "bf16 autocast"
    else:
        assert tr["mfu"] is None and tr["mfu_reason"].startswith("no GPU")
    assert r["machine"]["device"] == ("cuda" if gpu else "cpu")
