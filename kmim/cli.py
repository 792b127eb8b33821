"""The ``kmim`` command line: run | verify | eval tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kmim.config import ConfigError, load_config
from kmim.storage import redact_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a tokenizer or a trained model.")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True, soft_wrap=True)


_STORAGE_HELP = ("key=value option of the fsspec filesystem, repeatable (e.g. endpoint_url=URL, profile=NAME, "
                 "anon=true); true/false become booleans. Default: the filesystem's usual environment and config")


def _storage_options(items: list[str] | None) -> dict[str, str | bool] | None:
    """``--storage-option key=value`` flags as a dict. Values may be credentials: no message ever shows one."""
    if not items:
        return None
    options: dict[str, str | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter("expected key=value", param_hint="'--storage-option'")
        options[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _report_table(report: dict, title: str) -> Table:
    table = Table(title=escape(title), show_header=False)
    for key, value in report.items():
        text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(escape(key), escape(redact_text(text)))
    return table


def _say(label: str, message: object, sep: str = ": ") -> None:
    """Print ``label: message`` to stderr: URLs redacted, text never taken as rich markup (paths may hold [...])."""
    console.print(f"[red]{label}[/red]", escape(redact_text(str(message))), sep=sep)


@contextmanager
def _reported(*errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` and any storage-service error (unreachable endpoint, no credentials) into one redacted
    ``error: ...`` line and exit status 1, instead of a traceback."""
    from kmim.storage import SERVICE_ERRORS

    try:
        yield
    except SERVICE_ERRORS as e:
        _say("error", f"object store: {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    except errors as e:
        _say("error", e)
        raise typer.Exit(1) from None


@app.command()
def run(
    out: str | None = typer.Option(None, help="output dataset directory or URL: s3://bucket/prefix, gs://..., "
                                   "any fsspec URL (required here or in --config)"),
    input: str | None = typer.Option(None, help="ImageFolder dir, tar shard(s)/brace pattern, Parquet; "
                                        "default: built-in digits sample"),
    config: Path | None = typer.Option(None, "--config", help="YAML file with the same settings"),
    storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP),
    staging: str | None = typer.Option(None, help="local working directory for a remote --out (codebook, shards "
                                       "before upload) \\[~/.cache/kmim/staging/<digest of the URL>]"),
    extractor: str | None = typer.Option(None, help="pixel | dino | clip \\[pixel]"),
    model: str | None = typer.Option(None, help="dino: timm model name (vit_small_patch16_224.dino); "
                                     "clip: open_clip model name (ViT-B-16, RN50x64)"),
    model_kwargs: str | None = typer.Option(None, help="JSON object of architecture overrides: timm create_model "
                                            "kwargs (dino), merged into the open_clip model config (clip)"),
    weights: str | None = typer.Option(None, help="weights file (.safetensors/.pth), a local timm/open_clip/"
                                       "Hugging Face cache directory, or an open_clip pretrained tag; never "
                                       "downloaded \\[the default local caches]"),
    layer: int | None = typer.Option(None, help="ViT block (negative = from the end) or ResNet CLIP stage "
                                     "(0 stem, 1..4) whose features are used \\[last]"),
    resample: str | None = typer.Option(None, help="align to the patch grid: input (resize the image to "
                                        "model_patch * grid) | bilinear | area (resample the feature map) \\[input]"),
    dtype: str | None = typer.Option(None, help="auto | fp32 | bf16 (autocast) \\[auto: bf16 when the job runs on "
                                     "CUDA, fp32 on CPU; resolved once on the driver]"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda[:N] (cuda:N with --runner local only) \\[auto: "
                                      "CUDA if the machine or the Ray cluster has GPUs]"),
    k: int | None = typer.Option(None, "--k", help="codebook size [50]"),
    image_size: int | None = typer.Option(None, help="resize shorter side + center crop [224]"),
    patch_size: int | None = typer.Option(None, help="patch size in pixels [16]"),
    seed: int | None = typer.Option(None, help="[0]"),
    normalize: str | None = typer.Option(None, help="pixel: imagenet | none \\[imagenet]; dino/clip features: "
                                         "none | l2 \\[none]"),
    norm_pix: bool | None = typer.Option(None, "--norm-pix/--no-norm-pix", help="per-patch normalization"),
    kmeans_epochs: int | None = typer.Option(None, help="[20]"),
    kmeans_batch_size: int | None = typer.Option(None, help="[8192]"),
    kmeans_workers: int | None = typer.Option(None, help="Ray actors sampling and holding the k-means fit "
                                              "sample (runner ray) \\[GPUs in the cluster, else CPUs up to 16]"),
    fit_images: int | None = typer.Option(None, help="images sampled for the fit [10000]"),
    fit_patches: int | None = typer.Option(None, help="patches sampled for the fit [200000]"),
    assign: str | None = typer.Option(None, help="auto | faiss | torch \\[auto]"),
    feature_cache: str | None = typer.Option(None, help="directory caching sampled fit features (fp16), "
                                             "so repeated k-means experiments skip extraction"),
    shard_size: int | None = typer.Option(None, help="samples per shard [1000]"),
    batch_size: int | None = typer.Option(None, help="images per extraction batch [64]"),
    decode_threads: int | None = typer.Option(None, help="decoding threads per worker [the CPUs it holds]"),
    runner: str | None = typer.Option(None, help="ray | local [ray]"),
    gpu_wait_s: float | None = typer.Option(None, help="with --device cuda on Ray: seconds to wait for a GPU "
                                            "worker to join before failing [600]"),
    ray_address: str | None = typer.Option(None, help="join a Ray cluster (default: embedded, or RAY_ADDRESS)"),
    max_in_flight: int | None = typer.Option(None, help="shard tasks in flight [2 x CPUs; GPU actors: 2 each]"),
    task_retries: int | None = typer.Option(None, help="retries of a shard after a transient failure (worker, "
                                            "actor or node death, I/O error) \\[2]"),
    image_column: str | None = typer.Option(None, help="Parquet image-bytes column [image]"),
    label_column: str | None = typer.Option(None, help="Parquet label column [label]"),
    min_image_size: int | None = typer.Option(None, help="skip images with a shorter side below this [8]"),
    max_image_pixels: int | None = typer.Option(None, help="skip larger images as decompression bombs"),
    max_image_bytes: int | None = typer.Option(None, help="skip input images of more bytes, unread "
                                               "[67108864 = 64 MiB]"),
) -> None:
    """Fit a codebook and tokenize a dataset into verified WebDataset shards (resumes if interrupted)."""
    overrides = {name: value for name, value in locals().items() if name not in ("config", "storage_option")}
    overrides["storage_options"] = _storage_options(storage_option)
    from kmim.pipeline.job import JobError, run_job
    from kmim.pipeline.lock import LockError
    from kmim.storage import UploadError

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _say("config error", e, sep="\n")
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console.print(escape(redact_text(f"kmim run: input={cfg.input or 'built-in digits sample'} out={cfg.out} "
                                     f"extractor={cfg.extractor} K={cfg.k} image={cfg.image_size} "
                                     f"patch={cfg.patch_size} runner={cfg.runner}")))
    with _reported(ConfigError, JobError, LockError, UploadError, ValueError, OSError):
        summary = run_job(cfg)
    report = summary.pop("report")
    summary["skipped"] = summary["skipped"] or "none"
    timing = summary.pop("timing")
    summary["time_shares"] = ", ".join(f"{k} {v:.1f}s" for k, v in timing.items())
    console.print(_report_table(summary, "job summary"))
    console.print(_report_table(report, "tokenizer report"))


@app.command()
def verify(root: str = typer.Argument(..., help="dataset directory or URL (s3://bucket/prefix, any fsspec URL)"),
           storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP)) -> None:
    """Re-read every shard: sha256, sample counts, token dtype/shape/range, index consistency. Exit 0 iff intact."""
    from kmim.datasets.verify import verify_dataset

    with _reported(OSError, ValueError):
        problems = verify_dataset(root, storage_options=_storage_options(storage_option))
    for p in problems:
        console.print("[red]FAIL[/red]", escape(redact_text(p)))
    if problems:
        console.print(escape(f"{redact_text(root)}: {len(problems)} problem(s)"))
        raise typer.Exit(1)
    console.print(escape(f"{redact_text(root)}: OK"))


@app.command()
def publish(src: Path = typer.Argument(..., help="committed local dataset directory"),
            url: str = typer.Argument(..., help="destination: s3://bucket/prefix, gs://..., any fsspec URL or "
                                      "a directory"),
            storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP),
            workers: int = typer.Option(8, min=1, help="parallel uploads")) -> None:
    """Copy a finished dataset: parallel, resumable, every file checked (size + sha256), the manifest last."""
    from kmim.pipeline.publish import PublishError
    from kmim.pipeline.publish import publish as publish_dataset
    from kmim.storage import UploadError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with _reported(PublishError, UploadError, OSError):
        summary = publish_dataset(src, url, _storage_options(storage_option), workers=workers)
    console.print(_report_table(summary, "publish summary"))


@eval_app.command("tokenizer")
def eval_tokenizer(root: str = typer.Argument(..., help="dataset directory or URL (any fsspec URL)"),
                   as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                   storage_option: list[str] | None = typer.Option(None, "--storage-option",
                                                                   help=_STORAGE_HELP)) -> None:
    """TCAS (null without labels), codebook utilization, token perplexity, K, samples."""
    from kmim.storage import open_url
    from kmim.tokenizers.metrics import dataset_report

    with _reported(OSError, ValueError):
        fs, path = open_url(root, _storage_options(storage_option))
        report = dataset_report(path, fs)
    if as_json:
        print(json.dumps(report))
    else:
        Console().print(_report_table(report, f"tokenizer report: {root}"))



@app.command("train")
def train_command(
    data: str | None = typer.Option(None, help="dataset directory or URL (required here or in --config)"),
    out: str | None = typer.Option(None, help="run directory (required here or in --config)"),
    config: Path | None = typer.Option(None, "--config", help="YAML file with the same settings"),
    objective: str | None = typer.Option(None, help="kmim | mae | beit \\[kmim]"),
    mto: bool | None = typer.Option(None, "--mto/--no-mto", help="add the MTO losses \\[off]"),
    mto_w_spa: float | None = typer.Option(None, help="MTO sparsity weight \\[0.01]"),
    mto_w_e: float | None = typer.Option(None, help="MTO 1/H(0) weight \\[1.0]"),
    mto_w_r: float | None = typer.Option(None, help="MTO heterogeneity-ranking weight \\[1.0]"),
    mto_eps: float | None = typer.Option(None, help="MTO eps in 1/(H(0)+eps) \\[0.1]"),
    mto_scale: bool | None = typer.Option(None, "--mto-scale/--no-mto-scale",
                                          help="MTO dot products / sqrt(width) (off: the paper's formula) \\[off]"),
    model: str | None = typer.Option(None, help="tiny | small | base \\[tiny]"),
    model_dim: int | None = typer.Option(None, help="encoder width override"),
    model_depth: int | None = typer.Option(None, help="encoder blocks override"),
    model_heads: int | None = typer.Option(None, help="encoder heads override"),
    decoder_dim: int | None = typer.Option(None, help="decoder width override (kmim, mae)"),
    decoder_depth: int | None = typer.Option(None, help="decoder blocks override (kmim, mae)"),
    decoder_heads: int | None = typer.Option(None, help="decoder heads override (kmim, mae)"),
    mask_ratio: float | None = typer.Option(None, help="\\[0.75 kmim/mae, 0.4 beit]"),
    epochs: int | None = typer.Option(None, help="schedule length \\[1]"),
    max_steps: int | None = typer.Option(None, help="stop at this step; the schedule still spans --epochs"),
    batch_size: int | None = typer.Option(None, help="images per micro-batch per rank \\[64]"),
    accum_steps: int | None = typer.Option(None, help="micro-batches per optimizer step \\[1]"),
    lr: float | None = typer.Option(None, help="peak learning rate \\[1.5e-3]"),
    min_lr: float | None = typer.Option(None, help="final learning rate of the cosine decay \\[0]"),
    warmup_steps: int | None = typer.Option(None, help="linear warmup steps \\[0]"),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay \\[0.05]"),
    grad_clip: float | None = typer.Option(None, help="max gradient norm, 0 = off \\[1.0]"),
    seed: int | None = typer.Option(None, help="\\[0]"),
    workers: int | None = typer.Option(None, help="DataLoader workers per rank \\[0]"),
    shuffle_window: int | None = typer.Option(None, help="samples shuffled together \\[4096]"),
    hflip: bool | None = typer.Option(None, "--hflip/--no-hflip", help="mirror image + token grid \\[off]"),
    verify: bool | None = typer.Option(None, "--verify/--no-verify", help="sha256 of each shard on read \\[on]"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda \\[auto]"),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA \\[on]"),
    log_every: int | None = typer.Option(None, help="steps between metrics lines \\[10]"),
    checkpoint_every: int | None = typer.Option(None, help="steps between checkpoints \\[one epoch]"),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", help="continue from the latest checkpoint"),
    sample_log: bool | None = typer.Option(None, "--sample-log/--no-sample-log",
                                           help="write the sample ids each rank trained on"),
) -> None:
    """Train a MIM model on a kmim dataset (single process, or DDP under `torchrun --no-python kmim train`)."""
    overrides = {name: value for name, value in locals().items() if name != "config"}
    import os

    from kmim.trainer.config import load_train_config
    from kmim.trainer.engine import TrainError, train

    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as e:
        _say("config error", e, sep="\n")
        raise typer.Exit(2) from None
    main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    with _reported(TrainError, ValueError, OSError):
        summary = train(cfg)
    if main:
        console.print(_report_table(summary, "training summary"))


@eval_app.command("linprobe")
def eval_linprobe(
    checkpoint: Path = typer.Option(..., help="run directory (its latest checkpoint is evaluated)"),
    data: str = typer.Option(..., help="labelled dataset with the run's image size"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    train_fraction: float = typer.Option(0.8, help="share of samples (by key hash) in the probe's train split"),
    split_seed: int = typer.Option(0, help="salt of the key hash"),
    epochs: int = typer.Option(90, help="linear head epochs"),
    batch_size: int = typer.Option(256, help="feature extraction and head batch size"),
    lr: float = typer.Option(0.1, help="head learning rate per 256 samples (SGD, cosine)"),
    knn_k: int = typer.Option(20, help="neighbours of the k-NN vote"),
    knn_temperature: float = typer.Option(0.07, help="k-NN vote weight exp(cosine / temperature)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0, help="DataLoader workers"),
) -> None:
    """Frozen-encoder linear probe and weighted k-NN top-1 on a held-out split by key hash."""
    from kmim.trainer.engine import TrainError
    from kmim.trainer.linprobe import ProbeConfig, linear_probe

    with _reported(TrainError, ValueError, OSError):
        cfg = ProbeConfig(train_fraction, split_seed, epochs, batch_size, lr, knn_k, knn_temperature)
        report = linear_probe(checkpoint, data, cfg, device=device, workers=workers)
    if as_json:
        print(json.dumps(report))
    else:
        Console().print(_report_table(report, f"linear probe: {checkpoint}"))


if __name__ == "__main__":
    app()
