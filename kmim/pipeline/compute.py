"""Where the job computes, decided once on the driver and shipped to every worker.

A learned extractor's ``device`` and ``dtype`` settings may say ``auto``; left to each process, a CPU-only
driver would resolve fp32 while GPU actors resolved bf16, and the codebook fitted from one would refuse the
tokens of the other. :func:`resolve_compute` turns them into concrete values from the settings and the
machine (local runner) or the Ray cluster's GPU resources (Ray runner), waiting up to ``gpu_wait_s`` for GPU
workers when the job asks for CUDA and none has joined yet, and returns the settings every stage then uses:

- ``device``: ``cpu``, or ``cuda`` (a GPU actor's is the GPU Ray assigned it; in-process it is the current
  CUDA device, or the ``cuda:N`` given). A worker that cannot honour it fails loudly
  (:func:`kmim.tokenizers.learned.torch_device`).
- ``dtype``: ``bf16`` (autocast) with CUDA, else ``fp32``, unless given.

The pixel extractor has no device or dtype: it always runs on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kmim.config import ConfigError, JobConfig

log = logging.getLogger("kmim")
POLL_S = 2.0


@dataclass(frozen=True)
class Compute:
    """The resolved job settings and the number of GPU actors that run its stages (0: CPU tasks)."""

    cfg: JobConfig
    gpus: int


def _cluster_gpus(cfg: JobConfig, wait: bool) -> int:
    """Whole GPUs in the Ray cluster; with ``wait``, polls until one has joined or ``gpu_wait_s`` passed."""
    import ray

    from kmim.pipeline.runners import ensure_ray

    ensure_ray(cfg.ray_address)
    deadline = time.monotonic() + cfg.gpu_wait_s
    announced = False
    while True:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus or not wait or time.monotonic() >= deadline:
            return gpus
        if not announced:
            log.info("waiting up to %.0fs for GPU workers to join the Ray cluster", cfg.gpu_wait_s)
            announced = True
        time.sleep(POLL_S)


def resolve_compute(cfg: JobConfig) -> Compute:
    """Concrete ``device`` / ``dtype`` for ``cfg`` and the GPU actors to use; raises ConfigError (naming the field)
    when CUDA is asked for and none is there (after waiting ``gpu_wait_s`` on a Ray cluster)."""
    if cfg.extractor == "pixel":
        return Compute(cfg, 0)
    asked = cfg.device or "auto"
    if cfg.runner == "local":
        if asked.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"field 'device': {asked} requested but CUDA is not available on this machine")
        device = asked if asked != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        gpus = 0
    elif asked == "cpu":
        device, gpus = "cpu", 0
    else:
        gpus = _cluster_gpus(cfg, wait=asked == "cuda")
        if asked == "cuda" and not gpus:
            raise ConfigError(f"field 'device': cuda requested but no GPU joined the Ray cluster within "
                              f"{cfg.gpu_wait_s:.0f}s (field 'gpu_wait_s'); start or scale up GPU workers")
        device = "cuda" if gpus else "cpu"
        if not gpus:
            log.info("no GPUs in the Ray cluster: extracting on CPU tasks (--device cuda waits for GPU workers)")
    dtype = cfg.dtype if cfg.dtype not in (None, "auto") else "bf16" if device.startswith("cuda") else "fp32"
    resolved = cfg.model_copy(update={"device": device, "dtype": dtype})
    _check_kmeans_workers(resolved, gpus)
    return Compute(resolved, gpus)


def _check_kmeans_workers(cfg: JobConfig, gpus: int) -> None:
    """k-means actors on GPUs hold one whole GPU each: more actors than GPUs would split them (and fractional
    GPUs that do not add up per node leave actors pending forever)."""
    if gpus and cfg.kmeans_workers is not None and cfg.kmeans_workers > gpus:
        raise ConfigError(f"field 'kmeans_workers': {cfg.kmeans_workers} actors would split the cluster's {gpus} "
                          f"GPU(s); each k-means actor holds one whole GPU, so use at most {gpus}")
