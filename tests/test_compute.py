"""Device and dtype resolved once on the driver; out-of-memory batches run in halves (CPU only here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job_overrides
from test_learned_extractors import VIT16, save_tiny

from kmim.config import ConfigError, load_config
from kmim.datasets.preprocess import View
from kmim.pipeline.compute import resolve_compute
from kmim.pipeline.stages import on_halves
from kmim.tokenizers.learned import LOGICAL_GPUS_ENV, torch_device


def dino(tmp_path: Path, **kw) -> dict:
    weights = save_tiny(tmp_path / "vit.safetensors", VIT16)
    return job_overrides(out=str(tmp_path / "out"), extractor="dino", model=VIT16[1],
                         model_kwargs=json.dumps(VIT16[2]), weights=str(weights), patch_size=16, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only resolution")
def test_local_runner_resolves_auto_to_the_cpu_and_refuses_missing_cuda(tmp_path: Path) -> None:
    resolved = resolve_compute(load_config(None, dino(tmp_path))).cfg
    assert (resolved.device, resolved.dtype) == ("cpu", "fp32")
    resolved = resolve_compute(load_config(None, dino(tmp_path, dtype="bf16"))).cfg
    assert (resolved.device, resolved.dtype) == ("cpu", "bf16")
    with pytest.raises(ConfigError, match="field 'device': cuda requested but CUDA is not available"):
        resolve_compute(load_config(None, dino(tmp_path, device="cuda")))


def test_ray_refuses_a_machine_local_gpu_ordinal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="field 'device': cuda:1 names one GPU of this machine"):
        load_config(None, dino(tmp_path, device="cuda:1", runner="ray"))


def test_pixel_jobs_have_no_device(tmp_path: Path) -> None:
    compute = resolve_compute(load_config(None, job_overrides(out=str(tmp_path))))
    assert compute.gpus == 0 and compute.cfg.device is None and compute.cfg.dtype is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_worker_without_cuda_fails_loudly_unless_gpus_are_logical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOGICAL_GPUS_ENV, raising=False)
    with pytest.raises(ValueError, match="cuda requested but CUDA is not available on this machine"):
        torch_device("cuda")
    monkeypatch.setenv(LOGICAL_GPUS_ENV, "cpu")
    assert torch_device("cuda") == torch.device("cpu")


def test_out_of_memory_batches_run_in_halves(caplog: pytest.LogCaptureFixture) -> None:
    views = [View(np.full((4, 4, 3), i, np.uint8), {}, b"", "png") for i in range(7)]
    sizes = []

    def fn(batch: list[View]) -> torch.Tensor:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.tensor([int(v.pixels[0, 0, 0]) for v in batch])

    assert on_halves(fn, views).tolist() == list(range(7))
    assert sizes == [7, 3, 1, 2, 4, 2, 2] and "running it in halves" in caplog.text

    def always(batch: list[View]) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        on_halves(always, views[:2])
