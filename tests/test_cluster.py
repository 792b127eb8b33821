"""Ray on a real multi-node cluster on one machine (``ray.cluster_utils.Cluster``, every node on 127.0.0.1).

Two nodes of 1 CPU + 1 logical GPU each, and a driver without GPUs: the topology ``deploy/`` recommends. There is
no CUDA here, so GPU actors run their ``cuda`` device on the CPU (``KMIM_LOGICAL_GPUS=cpu``), but Ray schedules
by the logical GPUs: a learned-extractor job resolves device ``cuda`` and dtype bf16 on the driver and takes the
GPU actor-pool path (one actor per GPU, hence one per node), a pixel job the CPU-task path. Faults are real: a
SIGKILL of the worker process running a shard task or of a GPU actor mid-job, a CUDA error in an actor, and input
shards that cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import class_image, job_overrides, make_image_folder, png_bytes, reset_ray_auth
from PIL import Image
from ray.cluster_utils import Cluster
from test_learned_extractors import VIT16, save_tiny
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import load_config
from kmim.datasets.codebook import load_codebook
from kmim.datasets.manifest import CODEBOOK, read_index, read_manifest
from kmim.datasets.shards import ShardWriter, iter_tar
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import run_job
from kmim.pipeline.runners import ensure_ray, map_shards
from kmim.tokenizers.learned import LOGICAL_GPUS_ENV

NODE = {"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node with their own token auth and ``RAY_TMPDIR``, so ``auto`` finds this cluster
    only. Nodes and drivers share the token through the environment (Ray's default, a token in ~/.ray, is
    picked up by drivers but not by ``Cluster`` nodes)."""
    ray.shutdown()  # a driver left connected elsewhere would be reused instead of joining this cluster
    ray_tmp = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.setenv(LOGICAL_GPUS_ENV, "cpu")  # inherited by the nodes' workers
        reset_ray_auth()
        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        try:
            c.add_node(**NODE)
            c.wait_for_nodes()
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    reset_ray_auth()


@pytest.fixture
def driver(cluster) -> str:
    """This process as a driver of ``cluster``, kept between tests so Ray reuses its warm worker processes."""
    ensure_ray(cluster.address)
    assert ray.get_runtime_context().gcs_address == cluster.address
    return cluster.address


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """36 small images plus, in each class, one 4000 x 4000 PNG (valid, ~0.3 s to decode) so shard tasks last
    long enough to be killed mid-way; and the tiny ViT's weights next to them."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "images")
    yy, xx = np.mgrid[0:4000, 0:4000]
    big = np.stack([xx * 255 // 4000, yy * 255 // 4000, (xx + yy) % 256], -1).astype(np.uint8)
    for c in range(3):
        Image.fromarray(np.roll(big, c, axis=2)).save(root / f"class_{c}" / "img_big.png")
    save_tiny(root.parent / "vit.safetensors", VIT16)
    return root


def settings(data: Path, out: Path, extractor: str, **kw) -> dict:
    extra = {}
    if extractor == "dino":
        # fp32, so the GPU actors (bf16 by default) compute what the in-process CPU reference does
        extra = {"extractor": "dino", "model": VIT16[1], "model_kwargs": json.dumps(VIT16[2]),
                 "weights": str(data.parent / "vit.safetensors"), "patch_size": 16, "k": 6, "dtype": "fp32"}
    return job_overrides(out=str(out), input=str(data), **extra, **kw)


@pytest.fixture(scope="module")
def local(data: Path, tmp_path_factory) -> dict[str, Path]:
    """The in-process runner's dataset of each job: the reference every cluster run must reproduce."""
    base = tmp_path_factory.mktemp("local")
    for extractor in ("pixel", "dino"):
        run_job(load_config(None, settings(data, base / extractor, extractor)))
    return {"pixel": base / "pixel", "dino": base / "dino"}


def inputs_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_each_input_once(out: Path, inputs: list[str]) -> None:
    """Every input is in exactly one index row; the shards hold each decodable one exactly once."""
    manifest = read_manifest(out)
    sources, keys = [], []
    for entry in manifest["shards"]:
        index = read_index(out / entry["index"]).to_pydict()
        sources += index["source"]
        with open(out / entry["path"], "rb") as f:
            shard_keys = [s["__key__"] for s in iter_tar(f)]
        assert len(shard_keys) == entry["samples"] == index["status"].count("ok")
        keys += shard_keys
    assert sorted(sources) == inputs
    assert len(set(keys)) == len(keys) == manifest["samples"]
    assert manifest["samples"] + sum(manifest["skipped"].values()) == len(inputs)
    assert verify_dataset(out) == []


def ray_pids(title: str, ray_tmp: str) -> list[int]:
    """PIDs of this cluster's processes titled ``title`` (Ray titles a worker ``ray::<task>`` while it runs one)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            ours = f"RAY_TMPDIR={ray_tmp}".encode() in (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if cmdline.startswith(title) and ours:
            pids.append(int(proc.name))
    return pids


def killed_mid_job(cfg: dict, title: str, timeout: float = 120.0) -> dict:
    """Run the job in a thread of this process (the driver); SIGKILL the first process of this cluster titled
    ``title`` as soon as one runs; return the job's summary."""
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_job, load_config(None, cfg))
        deadline = time.monotonic() + timeout
        while not (pids := ray_pids(title, os.environ["RAY_TMPDIR"])):
            assert time.monotonic() < deadline and not job.done(), f"no process titled {title!r} ran"
            time.sleep(0.01)
        os.kill(pids[0], signal.SIGKILL)
        return job.result(timeout=timeout)


def with_codebook_of(reference: Path, out: Path) -> None:
    """Start ``out`` with the reference's codebook, so the job only tokenizes (the stage under fault here)."""
    out.mkdir()
    shutil.copy(reference / CODEBOOK, out / CODEBOOK)


def test_auto_and_ray_address_join_the_cluster(cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    for address, env in (("auto", None), (None, cluster.address)):
        ray.shutdown()
        if env is not None:
            monkeypatch.setenv("RAY_ADDRESS", env)
        ensure_ray(address)
        assert ray.get_runtime_context().gcs_address == cluster.address
        assert ray.cluster_resources()["GPU"] == 2
    ray.shutdown()


def test_job_over_two_nodes_gives_the_local_manifest(data: Path, tmp_path: Path, driver: str,
                                                     local: dict[str, Path]) -> None:
    """A DINO job: the k-means fit, then one GPU actor per node tokenizing; the in-process runner's dataset."""
    summary = run_job(load_config(None, settings(data, tmp_path / "out", "dino", runner="ray", ray_address=driver)))
    assert summary["codebook_fitted"] and summary["shards_written"] == 4
    assert read_manifest(tmp_path / "out") == read_manifest(local["dino"])


def test_multi_view_job_on_gpu_actors_gives_the_local_dataset(data: Path, tmp_path: Path, driver: str) -> None:
    """``--views`` and ``--tokenizer-image-size`` need nothing of the GPU actor path: the same shards as in-process."""
    views = {"views": 3, "tokenizer_image_size": 64}
    run_job(load_config(None, settings(data, tmp_path / "local", "dino", **views)))
    summary = run_job(load_config(None, settings(data, tmp_path / "out", "dino", runner="ray", ray_address=driver,
                                                 **views)))
    assert summary["shards_written"] == 4 and verify_dataset(tmp_path / "out") == []
    assert read_manifest(tmp_path / "out") == read_manifest(tmp_path / "local")


def test_driver_without_gpus_resolves_what_the_gpu_workers_compute(data: Path, tmp_path: Path, driver: str,
                                                                   local: dict[str, Path]) -> None:
    """dtype auto on a cluster with GPUs is bf16 for the driver's codebook metadata and every worker alike (the
    workers refused every shard when the CPU-only driver resolved fp32 on its own)."""
    cfg = settings(data, tmp_path / "out", "dino", runner="ray", ray_address=driver)
    del cfg["dtype"]
    summary = run_job(load_config(None, cfg))
    assert summary["shards_written"] == 4 and verify_dataset(tmp_path / "out") == []
    book = load_codebook(tmp_path / "out" / CODEBOOK)
    assert book.metadata["dtype"] == "bf16" and load_codebook(local["dino"] / CODEBOOK).metadata["dtype"] == "fp32"
    assert read_manifest(tmp_path / "out")["codebook"]["metadata"] == book.metadata


def test_kmeans_workers_that_would_split_gpus_are_refused(data: Path, tmp_path: Path, driver: str) -> None:
    cfg = settings(data, tmp_path / "out", "dino", runner="ray", ray_address=driver, kmeans_workers=3)
    res = CliRunner().invoke(app, ["run", *[a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    assert res.exit_code == 1 and "field 'kmeans_workers': 3 actors would split the cluster's 2 GPU(s)" in \
        " ".join(res.output.split())
    assert not (tmp_path / "out" / CODEBOOK).exists()


def test_an_actor_with_a_cuda_error_is_replaced_and_its_item_retried(tmp_path: Path, driver: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def fail_once_with_a_cuda_error(item: int, marks: str) -> int:  # nested: Ray ships it by value
        """The first call anywhere raises what a broken CUDA context raises; every call returns its process id."""
        import torch

        mark = Path(marks) / "failed"
        if not mark.exists():
            mark.write_text(f"{item} {os.getpid()}")
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return os.getpid()

    with caplog.at_level(logging.WARNING, logger="kmim"):
        results = list(map_shards(fail_once_with_a_cuda_error, [0, 1, 2, 3], str(tmp_path), runner="ray",
                                  desc="t", gpus=2, retries=1))
    assert [error for _, _, error in results] == [None] * 4
    assert "hit a CUDA error" in caplog.text and "starting a replacement" in caplog.text
    item, broken = map(int, (tmp_path / "failed").read_text().split())
    assert dict((i, pid) for i, pid, _ in results)[item] != broken  # retried on another process


@pytest.mark.parametrize(("extractor", "victim", "logged"), [
    # The worker process running a pixel shard task is SIGKILLed mid-job; the task runs again elsewhere.
    ("pixel", "ray::TokenizeStage", ("WorkerCrashedError", "retrying (attempt 2 of 3)")),
    # A GPU actor is SIGKILLed while it tokenizes: a new one takes its items.
    ("dino", "ray::_StageActor.run", ("starting a replacement",)),
], ids=["task-worker", "gpu-actor"])
def test_killed_worker_and_every_input_lands_once(data: Path, tmp_path: Path, driver: str, local: dict[str, Path],
                                                  caplog: pytest.LogCaptureFixture, extractor: str, victim: str,
                                                  logged: tuple[str, ...]) -> None:
    """A process doing shard work is killed mid-job; the job finishes with the same dataset as the local run."""
    out = tmp_path / "out"
    with_codebook_of(local[extractor], out)
    with caplog.at_level(logging.WARNING, logger="kmim"):
        summary = killed_mid_job(settings(data, out, extractor, runner="ray", ray_address=driver), victim)
    assert all(text in caplog.text for text in logged)
    assert summary["shards_written"] == 4
    assert_each_input_once(out, inputs_of(data))
    assert read_manifest(out) == read_manifest(local[extractor])


def test_failing_shards_are_reported_with_reason_and_attempts(tmp_path: Path, driver: str) -> None:
    """A shard that cannot be read (a directory: an I/O error that a retry only repeats) and one that breaks the
    tar contract (deterministic) fail the job without retries; the CLI reports each, and no manifest is written."""
    tars = tmp_path / "tars"
    tars.mkdir()
    rng = np.random.default_rng(0)
    w = ShardWriter(tars / "a.tar")
    for i in range(16):
        w.write({"__key__": f"s{i}", "png": png_bytes(class_image(rng, i % 3, (32, 32)))})
    w.finish()
    w.commit()
    (tars / "b.tar").mkdir()  # listed as an input shard, unreadable as a file
    with tarfile.open(tars / "c.tar", "w") as tar:  # a symlink member breaks the tar contract
        link = tarfile.TarInfo("s0.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    cfg = job_overrides(out=str(tmp_path / "out"), input=str(tars / "{a,b,c}.tar"), runner="ray",
                        ray_address=driver, task_retries=1, fit_images=16, fit_patches=100)
    res = CliRunner().invoke(app, ["run", *[a for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    assert res.exit_code == 1, res.output
    report = " ".join(res.output.split())  # undo the console's line wrapping
    assert "error: 2 of 3 shards failed; no manifest written" in report
    assert "b.tar: IsADirectoryError" in report and "(failed after 1 attempt, not retried" in report
    assert "c.tar: ShardError" in report and "(failed after 1 attempt, not retried: deterministic error)" in report
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / "shard-00000.tar").exists()
