"""faiss exhaustive search with faiss's default GEMM blocks vs kmim's small ones, by shape, top-1 and top-2.

The search is the one kmim runs in a k-means fit (``kmim/tokenizers/assign.py``: ``_scores_faiss`` with
``threads=2``): a ``faiss.IndexFlatL2`` over K centroids, the queries in mini-batches of 8192 rows, each mini-batch
split into 2 halves searched concurrently by a 2-thread pool, each half a one-thread faiss search
(``_search_part``: ``faiss.omp_set_num_threads(1)`` on the worker). Block settings (query rows x centroids,
``faiss.cvar.distance_compute_blas_query_bs`` / ``..._database_bs``): ``default``, faiss's 4096 x 1024, and
``small``, kmim's (``BLAS_BLOCKS``). Shapes (d, K, queries): (48, 1024,
131072), (48, 8192, 65536), (384, 1024, 32768), (768, 8192, 16384); random float32 data (numpy default_rng(0)).

Rounds alternate the two settings; each setting's best round counts. Prints seconds per pass (all queries once)
per shape, top-n and setting, the ratio default / small (> 1: the small blocks are faster), the machine line and
the load average. faiss's block settings are restored at the end.

    .venv/bin/python benchmarks/search_blocks.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import emit, machine

from kmim.tokenizers.assign import BLAS_BLOCKS, BLAS_ROWS, _faiss, _search_part

SHAPES = ((48, 1024, 131072), (48, 8192, 65536), (384, 1024, 32768), (768, 8192, 16384))
BATCH = 8192
THREADS = 2
SETTINGS = {"default": (4096, 1024), "small": BLAS_BLOCKS}  # faiss's defaults, kmim's


def one_pass(index, queries: np.ndarray, n: int, pool: ThreadPoolExecutor) -> float:
    """Seconds to search all ``queries`` (top-``n``) as kmim's fit does: mini-batches of BATCH rows, each split
    over THREADS one-thread searches."""
    t = time.perf_counter()
    for start in range(0, queries.shape[0], BATCH):
        parts = np.array_split(queries[start:start + BATCH], THREADS)
        list(pool.map(lambda part: _search_part(index, part, n), parts))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    faiss = _faiss()  # sets OPENBLAS_CORETYPE first where that helps
    saved = faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_threshold = BLAS_ROWS  # as kmim's searches run: every part by the GEMM
    rng = np.random.default_rng(0)
    summary = {}
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for d, k, nq in SHAPES:
                centroids = rng.standard_normal((k, d), dtype=np.float32)
                queries = rng.standard_normal((nq, d), dtype=np.float32)
                index = faiss.IndexFlatL2(d)
                index.add(centroids)
                for n in (1, 2):
                    best = dict.fromkeys(SETTINGS, float("inf"))
                    one_pass(index, queries[:BATCH], n, pool)  # warm-up (threads, BLAS buffers)
                    for _ in range(args.rounds):
                        for name, (qbs, dbs) in SETTINGS.items():
                            faiss.cvar.distance_compute_blas_query_bs = qbs
                            faiss.cvar.distance_compute_blas_database_bs = dbs
                            best[name] = min(best[name], one_pass(index, queries, n, pool))
                    ratio = round(best["default"] / best["small"], 2)
                    for name, (qbs, dbs) in SETTINGS.items():
                        emit(bench="search_blocks", d=d, k=k, queries=nq, top=n, blocks=name, query_bs=qbs,
                             database_bs=dbs, seconds_per_pass=round(best[name], 4))
                    emit(bench="search_blocks", d=d, k=k, queries=nq, top=n, default_over_small=ratio)
                    summary[f"d{d}_k{k}_top{n}_default_over_small"] = ratio
    finally:
        faiss.cvar.distance_compute_blas_query_bs, faiss.cvar.distance_compute_blas_database_bs = saved
    emit(bench="search_blocks", summary=True, batch=BATCH, threads=THREADS, rounds=args.rounds,
         **summary, machine=machine(), load_average=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
