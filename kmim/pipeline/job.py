"""The ``kmim run`` job: plan -> fit codebook -> tokenize missing shards -> manifest -> report.

Resumable by construction: a finished shard (its tar exists) is never redone, the codebook is reused
when present, and the manifest is rebuilt from the shards' index stats, so a resumed job commits the
same manifest as an uninterrupted one. A shard is finished only if its index also records the codebook's
tokenizer_id: one whose index is missing, unreadable or from another tokenizer (e.g. copied in from another job)
is deleted and redone.

One run at a time per output: the job holds :func:`kmim.pipeline.lock.hold_output` from before it reads the
output until it ends, so a second run on the same output fails at once, naming the first.

The output is a directory or any fsspec URL. A remote output is written through local staging directories
(the codebook and k-means state on the driver, each shard on the worker that makes it), every upload is
checked before it counts, and the manifest goes up last, once every shard landed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fsspec import AbstractFileSystem

from kmim.config import ConfigError, JobConfig, material_settings
from kmim.datasets.codebook import Codebook, load_codebook, save_codebook
from kmim.datasets.manifest import (
    CODEBOOK,
    FIT_REPORT,
    JOB_FILE,
    MANIFEST,
    TokenCounts,
    build_manifest,
    index_name,
    index_stats,
    read_manifest,
    shard_name,
    write_manifest,
)
from kmim.files import TMP_GLOB, atomic_write_bytes
from kmim.pipeline.checks import check_codebook_extractor, check_extractor, with_codebook
from kmim.pipeline.compute import Compute, resolve_compute
from kmim.pipeline.decoding import keep_decoded
from kmim.pipeline.fit import FitError, fit_sample_kmeans
from kmim.pipeline.lock import hold_output
from kmim.pipeline.runners import map_shards
from kmim.pipeline.sources import InputShard, plan_inputs
from kmim.pipeline.specs import (
    extract_size,
    extractor_spec,
    fit_sample,
    fit_spec,
    source_spec,
    tokenize_stage,
    view_spec,
)
from kmim.pipeline.stages import TokenizeStage, json_digest, token_dtype
from kmim.storage import (
    get_file,
    is_local,
    join,
    list_sizes,
    open_url,
    put_bytes,
    put_verified,
    redact,
    redact_text,
    staging_dir,
    url_of,
)
from kmim.tokenizers.extractors import build_extractor
from kmim.tokenizers.metrics import counts_report

log = logging.getLogger("kmim")
# What a local job keeps of the images its fit sample decoded, for its tokenization (the CIFAR subset: 27 MiB).
LOCAL_KEEP_BYTES = 1 << 30


class JobError(RuntimeError):
    """The job ran but did not commit a dataset (some shards failed)."""


def _check_job_file(fs: AbstractFileSystem, root: str, cfg: JobConfig, shards: list[InputShard]) -> None:
    """Record the job's material settings (:func:`kmim.config.material_settings`); refuse to resume a directory
    written with other settings."""
    # URLs are stored redacted (no passwords, no presigned signatures): rotating a credential is not a new job.
    # As stored: through JSON, so that tuples compare equal to the lists read back.
    settings = json.loads(json.dumps({**material_settings(cfg), "input": cfg.input and redact(cfg.input)}))
    job = {"settings": settings, "inputs": json_digest([redact_text(repr(s)) for s in shards])}
    out = redact(cfg.out)
    try:
        old = json.loads(fs.cat_file(join(root, JOB_FILE)))
    except FileNotFoundError:
        put_bytes(fs, join(root, JOB_FILE), json.dumps(job, indent=2, sort_keys=True).encode())
        return
    changed = [k for k in job["settings"] if old.get("settings", {}).get(k) != job["settings"][k]]
    if changed:
        f = changed[0]
        raise ConfigError(f"{out} holds a job with other settings: field '{f}' was "
                          f"{old['settings'].get(f)!r}, now {job['settings'][f]!r} (use another --out)")
    if old.get("inputs") != job["inputs"]:
        raise ConfigError(f"{out} holds a job over different input files (field 'input'); use another --out")


def _outputs(fs: AbstractFileSystem, root: str, work: Path) -> set[str]:
    """Names of the files in the output after deleting leftovers of a killed run (hidden temporary files, never
    visible as outputs) there and in the local working directory."""
    if not is_local(fs):
        for stale in work.glob(TMP_GLOB):
            stale.unlink()
    names = set(list_sizes(fs, root))
    for stale in fnmatch.filter(names, TMP_GLOB):
        fs.rm_file(join(root, stale))
    return {n for n in names if not fnmatch.fnmatch(n, TMP_GLOB)}


def _finished(fs: AbstractFileSystem, root: str, names: list[str], tokenizer_id: str) -> dict[str, dict]:
    """The index stats of those of the present shards ``names`` made with the codebook ``tokenizer_id``; the others
    (index missing, unreadable, or recording another tokenizer_id) are logged with why and deleted, to be redone."""
    finished = {}
    for name, stats in index_stats(root, names, fs).items():
        if isinstance(stats, FileNotFoundError):
            why = "its index is missing"
        elif isinstance(stats, Exception):
            why = f"its index is unreadable ({type(stats).__name__}: {stats})"
        elif stats.get("tokenizer_id") != tokenizer_id:
            why = f"its tokenizer_id is {stats.get('tokenizer_id')!r}, not the codebook's {tokenizer_id!r}"
        else:
            finished[name] = stats
            continue
        log.warning("%s: %s; redoing it", url_of(fs, join(root, name)), why)
        for file in (name, index_name(name)):  # the tar first: a shard without its tar is unfinished
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(join(root, file))
    return finished


def _check_codebook_settings(book: Codebook, cfg: JobConfig, where: str) -> None:
    """Refuse a codebook in the output that these settings did not fit (e.g. copied in from another job)."""
    meta, kmeans = book.metadata, book.metadata.get("kmeans") or {}
    expected = {"k": (book.k, meta.get("k")), "image_size": (meta.get("image_size"),),
                "seed": (kmeans.get("seed"),), "kmeans_epochs": (kmeans.get("epochs"),),
                "kmeans_batch_size": (kmeans.get("batch_size"),), "fit_exact": ("fast_assign" not in kmeans,)}
    for field, found in expected.items():
        if any(v != getattr(cfg, field) for v in found):
            raise ConfigError(f"{where} was not fitted with these settings: field '{field}' is {found[-1]!r} there, "
                              f"{getattr(cfg, field)!r} here (remove it to refit, or use another --out)")


@dataclass(frozen=True)
class _Setup:
    """A job checked, planned and its compute resolved, with its output opened: everything before it holds the
    output. ``given``: the existing codebook (``--codebook``) it tokenizes with and that file's bytes, or None."""

    compute: Compute
    shards: list[InputShard]
    labels: list[str] | None
    fs: AbstractFileSystem
    root: str
    work: Path
    given: tuple[Codebook, bytes] | None


def _driver_extractor(cfg: JobConfig) -> dict:
    """The metadata of the extractor of the resolved settings ``cfg``, built on the driver: on a Ray driver (often
    without a GPU) on the CPU, with the resolved dtype, so it records what the workers' features really are."""
    return build_extractor(extractor_spec(cfg if cfg.runner == "local"
                                          else cfg.model_copy(update={"device": "cpu"}))).metadata()


def _setup(cfg: JobConfig) -> _Setup:
    """Check, plan and resolve a job (the full one or a fit-only one) and open its output, before any work; with
    ``cfg.codebook``, the settings that codebook fixes come from it (:func:`with_codebook`)."""
    given = None
    if cfg.codebook is not None:
        cfg, data, book = with_codebook(cfg)
        given = (book, data)
    check_extractor(cfg)
    shards, labels = plan_inputs(source_spec(cfg))
    compute = resolve_compute(cfg)
    if given is not None:
        check_codebook_extractor(given[0].metadata, _driver_extractor(compute.cfg), redact(cfg.codebook))
    fs, root = open_url(cfg.out, cfg.storage_options)
    work = Path(root) if is_local(fs) else staging_dir(cfg.out, cfg.staging)
    work.mkdir(parents=True, exist_ok=True)
    return _Setup(compute, shards, labels, fs, root, work, given)


def _codebook(setup: _Setup, present: set[str]) -> tuple[Codebook, list[dict] | None]:
    """(codebook, the k-means history when it was fitted now, else None): the output's if it has one, else the
    given one copied in, else fitted in the working directory; uploaded when the output is remote."""
    cfg, fs, root, path = setup.compute.cfg, setup.fs, setup.root, setup.work / CODEBOOK
    where = url_of(fs, join(root, CODEBOOK))
    if CODEBOOK in present:
        if not is_local(fs):
            get_file(fs, join(root, CODEBOOK), path)
        book = load_codebook(path, where)
        if setup.given is None:
            _check_codebook_settings(book, cfg, where)
        elif book.tokenizer_id != setup.given[0].tokenizer_id:
            raise ConfigError(f"field 'codebook': {where} holds another codebook (tokenizer_id {book.tokenizer_id}, "
                              f"not {setup.given[0].tokenizer_id}); use another --out")
        return book, None
    if setup.given is not None:
        book, history = setup.given[0], None
        atomic_write_bytes(path, setup.given[1])  # the file as given: the dataset stays self-contained
    else:
        history = []
        book = _fit_codebook(cfg, setup.shards, path, setup.compute.gpus, history)
    if not is_local(fs):
        put_verified(path, fs, join(root, CODEBOOK))
    return book, history


def _fit_codebook(cfg: JobConfig, shards: list[InputShard], path: Path, gpus: int,
                  history: list[dict] | None = None) -> Codebook:
    """Fit the codebook of the job's resolved settings ``cfg`` on ``shards`` and save it at ``path``; ``history``,
    when given, receives the k-means history (per epoch: inertia per point, utilization)."""
    extractor = _driver_extractor(cfg)  # metadata and metric only
    sample = fit_sample(cfg, shards)
    checkpoint = path.parent / "kmeans-checkpoint"  # epochs done survive a crash; removed with the codebook
    t0 = time.perf_counter()
    try:
        fit = fit_sample_kmeans(fit_spec(cfg), sample, metric=extractor["metric"], dim=extractor["dim"],
                                checkpoint=checkpoint, gpus=gpus,
                                log=lambda s: log.info("k-means epoch %(epoch)d: inertia/point %(inertia).4f, "
                                                       "utilization %(utilization).3f", s))
    except FitError as e:
        raise JobError(str(e)) from e
    result = fit.result
    # The same for both runners (one algorithm, one fit sample), so equal centroids give an equal tokenizer_id;
    # the inertia is rounded because its float64 sum depends on how the points were split over actors.
    inertia = float(f"{result.inertia:.10g}")
    meta = {**extractor, "image_size": cfg.image_size, "k": cfg.k,
            "kmeans": {"algorithm": "minibatch", "init": "k-means++", "epochs": cfg.kmeans_epochs,
                       "batch_size": cfg.kmeans_batch_size, "seed": cfg.seed, "fit_points": fit.points,
                       **_fit_assign(result.assign)},
            "fit_sample_digest": fit.digest,
            "fit_feature_dtype": "float16" if sample.cache is not None else "float32",
            "inertia": inertia, "inertia_per_point": float(f"{inertia / fit.points:.10g}"),
            "utilization": result.utilization, **_view_metadata(cfg)}
    # Wall time stays out of the metadata: it would change the tokenizer_id from run to run.
    log.info("k-means fit: %d points x %d dims -> K=%d in %.1fs", fit.points, fit.dim, cfg.k,
             time.perf_counter() - t0)
    book = Codebook(result.centroids, meta)
    save_codebook(path, book)
    shutil.rmtree(checkpoint, ignore_errors=True)
    if history is not None:
        history.extend(result.history)
    return book


def _fit_assign(assign: str) -> dict:
    """What the codebook's k-means metadata records of the fit's assignment: nothing for the exact one (as every
    codebook did before there was another), else ``fast_assign``, the float32 top-1's backend."""
    return {} if assign == "exact" else {"fast_assign": assign}


def _view_metadata(cfg: JobConfig) -> dict:
    """What the codebook and manifest record of the views beyond a single center view at image_size: the view
    distribution when V > 1, the extractor's render size when it differs (nothing otherwise)."""
    meta = {"views": view_spec(cfg).describe()} if cfg.views > 1 else {}
    if extract_size(cfg) != cfg.image_size:
        meta["tokenizer_image_size"] = extract_size(cfg)
    return meta


def _dataset_fields(cfg: JobConfig, book: Codebook, stage: TokenizeStage, labels: list[str] | None) -> dict:
    """The manifest's dataset-level fields: tokenizer, codebook, token grid ([h, w], or [V, h, w] with V views),
    preprocessing, labels and :func:`_view_metadata`."""
    shape = [cfg.grid, cfg.grid] if cfg.views == 1 else [cfg.views, cfg.grid, cfg.grid]
    return {"tokenizer_id": book.tokenizer_id, "codebook": {"path": CODEBOOK, "k": book.k, "metadata": book.metadata},
            "token_grid": {"shape": shape, "dtype": token_dtype(book.k).name, "patch_size": cfg.patch_size},
            "preprocess": stage.decode.preprocess.describe(), "labels": labels, **_view_metadata(cfg)}


def _report(k: int, names: list[str], stats_of: dict[str, dict], samples: int) -> dict:
    """The tokenizer report of the committed dataset, from its shards' stats in hand."""
    counted = TokenCounts(k)
    for name in names:
        counted.add_columns(stats_of[name]["token_counts"], name)
    return counts_report(counted, samples)


def _committed(root: str, fs: AbstractFileSystem) -> dict | None:
    """The output's manifest, or None when it does not hold (it is then rewritten)."""
    try:
        return read_manifest(root, fs)
    except ValueError:
        return None


def run_job(cfg: JobConfig) -> dict:
    """Run (or resume) a job; returns a summary with the tokenizer report. Raises JobError on failures, LockError
    when another run holds the output."""
    t_start = time.perf_counter()
    setup = _setup(cfg)
    with hold_output(setup.fs, setup.root) as confirm, keep_decoded(LOCAL_KEEP_BYTES if cfg.runner == "local" else 0):
        return _run(setup, t_start, confirm)


def _prepare_output(setup: _Setup) -> tuple[set[str], Codebook, list[dict] | None]:
    """What a job (full or fit-only) does first once it holds the output: check or record ``job.json``, clear
    leftovers, and get the codebook (:func:`_codebook`). Returns the output's files and the codebook's pair."""
    _check_job_file(setup.fs, setup.root, setup.compute.cfg, setup.shards)
    present = _outputs(setup.fs, setup.root, setup.work)
    return (present, *_codebook(setup, present))


def fit_job(cfg: JobConfig) -> dict:
    """Fit (or resume fitting) only the codebook of ``cfg`` into ``cfg.out``, with the job's fit code path, and
    write the fit report (:data:`FIT_REPORT`: the inertia curve per epoch); a rerun after it finished does no
    work. Returns a summary. Raises JobError when the fit fails, LockError when another run holds the output."""
    if cfg.codebook is not None:
        raise ConfigError("field 'codebook': kmim fit fits a codebook; use --codebook with kmim run")
    t_start = time.perf_counter()
    setup = _setup(cfg)
    with hold_output(setup.fs, setup.root) as confirm:
        _, book, history = _prepare_output(setup)
        if history is not None:
            meta = book.metadata
            report = {"tokenizer_id": book.tokenizer_id, "k": book.k, "inertia": meta["inertia"],
                      "inertia_per_point": meta["inertia_per_point"], "utilization": meta["utilization"],
                      "fit_assign": meta["kmeans"].get("fast_assign", "exact"), "history": history}
            confirm()
            put_bytes(setup.fs, join(setup.root, FIT_REPORT), json.dumps(report, indent=2).encode())
    return {"out": redact(cfg.out), "codebook": redact(join(cfg.out, CODEBOOK)), "tokenizer_id": book.tokenizer_id,
            "k": book.k, "codebook_fitted": history is not None, "seconds": time.perf_counter() - t_start}


def _run(setup: _Setup, t_start: float, confirm: Callable[[], None]) -> dict:
    """:func:`run_job` once it holds the output; ``confirm`` raises unless it still holds it, just before the
    commit."""
    cfg, fs, root, work, shards = setup.compute.cfg, setup.fs, setup.root, setup.work, setup.shards
    present, book, history = _prepare_output(setup)
    book_ref, out_ref = (str(work / CODEBOOK), str(work)) if is_local(fs) else (join(cfg.out, CODEBOOK), cfg.out)
    names = [shard_name(s.index) for s in shards]
    stats_of = _finished(fs, root, [n for n in names if n in present], book.tokenizer_id)
    todo = [s for s, name in zip(shards, names, strict=True) if name not in stats_of]
    stage = tokenize_stage(cfg, book_ref, out_ref)
    failures, timing = [], {"decode": 0.0, "extract": 0.0, "assign": 0.0, "write": 0.0}
    for shard, stats, error in map_shards(stage, todo, runner=cfg.runner, desc="tokenize", address=cfg.ray_address,
                                          max_in_flight=cfg.max_in_flight, gpus=setup.compute.gpus,
                                          retries=cfg.task_retries):
        if error is not None:
            failures.append(f"{shard.describe()}: {error}")  # error says what, why, after how many attempts
        else:
            stats_of[stats["shard"]] = stats  # what its index records, so the commit reads no index again
            for phase, seconds in stats["timing"].items():
                timing[phase] = timing.get(phase, 0.0) + seconds  # a remote output adds "upload"
    if failures:
        raise JobError(f"{len(failures)} of {len(shards)} shards failed; no manifest written "
                       "(rerun to retry them):\n  " + "\n  ".join(failures))
    dataset = _dataset_fields(cfg, book, stage, setup.labels)
    manifest = build_manifest(root, names, dataset=dataset, fs=fs, known=stats_of)
    if MANIFEST not in present or _committed(root, fs) != manifest:
        confirm()
        write_manifest(root, manifest, fs)
    return {"out": redact(cfg.out), "samples": manifest["samples"], "inputs": manifest["inputs"],
            "skipped": manifest["skipped"], "shards": len(shards), "shards_written": len(todo),
            "codebook_fitted": history is not None, "tokenizer_id": book.tokenizer_id,
            "seconds": time.perf_counter() - t_start,
            "timing": timing, "report": _report(book.k, names, stats_of, manifest["samples"])}
