"""The ``kmim`` command line: run | fit | verify | report | publish | serve | eval | train."""

from __future__ import annotations

import inspect
import json
import logging
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kmim.config import ConfigError, JobConfig, load_config
from kmim.storage import redact_text
from kmim.trainer.config import FinetuneConfig, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a tokenizer or a trained model.")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True, soft_wrap=True)


def _log_progress(info: bool = True) -> None:
    """kmim's own log lines on stderr (from INFO when ``info``, else from WARNING); other libraries' from WARNING
    only (faiss announces at INFO every build it tries to load)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kmim").setLevel(logging.INFO if info else logging.WARNING)


_STORAGE_HELP = ("key=value option of the fsspec filesystem, repeatable (e.g. endpoint_url=URL, profile=NAME, "
                 "anon=true); true/false become booleans. Default: the filesystem's usual environment and config")
_CONFIG_HELP = "YAML file with the same settings (flags override it)"
Command = TypeVar("Command", bound=Callable[..., None])


def _base_type(annotation: Any) -> Any:
    """``X`` of ``X | None``; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _option_help(field: FieldInfo) -> str:
    """A setting's help: its choices, description, and default (or that it is required), as plain text."""
    base = _base_type(field.annotation)
    choices = " | ".join(get_args(base)) + ":" if get_origin(base) is Literal else ""
    if field.is_required():
        default = "(required here or in --config)"
    elif field.default is None or field.default_factory is not None:
        default = ""  # the description says what happens without it
    else:
        shown = ("on" if field.default else "off") if base is bool else field.default
        default = f"[default: {shown}]"
    return escape(" ".join(part for part in (choices, field.description or "", default) if part))


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The typer option of setting ``name``: ``--name-with-dashes`` (bool: ``--x/--no-x``), parsed as bool, int or
    float as typed and anything else (choices, JSON objects) as text for the model to validate, so that every
    invalid value is reported naming its field. Its default is None: not given, the YAML file or the model
    decides."""
    flag = "--" + name.replace("_", "-")
    base = _base_type(field.annotation)
    kind = base if base in (bool, int, float) else str
    decls = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
    option = typer.Option(None, decls, help=_option_help(field), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


def _settings_options(model: type[BaseModel], skip: tuple[str, ...] = ()) -> Callable[[Command], Command]:
    """Give a command one option per field of ``model`` (but ``skip``) after its own parameters, all collected by
    its ``**settings``: each setting is stated once, in the model."""

    def add_options(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        settings = [_option(name, field) for name, field in model.model_fields.items() if name not in skip]
        command.__signature__ = signature.replace(parameters=[*own, *settings])
        return command

    return add_options


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
def _invalid_config() -> Iterator[None]:
    """A ConfigError (invalid settings, found before any work) as ``config error:`` and its message, exit status 2."""
    try:
        yield
    except ConfigError as e:
        _say("config error", e, sep="\n")
        raise typer.Exit(2) from None


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
@_settings_options(JobConfig, skip=("storage_options",))
def run(config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
        storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP),
        **settings: Any) -> None:
    """Fit a codebook (or take --codebook) and tokenize a dataset into verified WebDataset shards (resumes if
    interrupted)."""
    from kmim.pipeline.checks import check_extractor, with_codebook
    from kmim.pipeline.job import JobError, run_job
    from kmim.pipeline.lock import LockError
    from kmim.storage import UploadError

    with _invalid_config():
        cfg = load_config(config, {**settings, "storage_options": _storage_options(storage_option)})
        if cfg.codebook is not None:  # the settings it fixes, as run_job takes them: conflicts are config errors
            cfg = with_codebook(cfg)[0]
        check_extractor(cfg)  # run_job checks again, for callers without the CLI: here it is a config error
    _log_progress()
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
@_settings_options(JobConfig, skip=("storage_options", "codebook"))
def fit(config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
        storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP),
        **settings: Any) -> None:
    """Fit only a codebook into --out (codebook.safetensors + fit-report.json), to reuse with kmim run --codebook
    (resumes if interrupted)."""
    from kmim.pipeline.checks import check_extractor
    from kmim.pipeline.job import JobError, fit_job
    from kmim.pipeline.lock import LockError
    from kmim.storage import UploadError

    with _invalid_config():
        cfg = load_config(config, {**settings, "storage_options": _storage_options(storage_option)})
        check_extractor(cfg)
    _log_progress()
    with _reported(ConfigError, JobError, LockError, UploadError, ValueError, OSError):
        summary = fit_job(cfg)
    console.print(_report_table(summary, "fit summary"))


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
def report(root: str = typer.Argument(..., help="dataset directory or URL (any fsspec URL)"),
           out: Path = typer.Option(..., "--out", help="report directory: index.html and assets/ are written there"),
           samples: int = typer.Option(12, min=0, help="samples whose token maps are shown (every stored view)"),
           per_code: int = typer.Option(8, min=1, help="patches shown per code"),
           max_codes: int | None = typer.Option(None, min=0, help="show only the most used codes (default: all)"),
           max_images: int = typer.Option(512, min=1, help="samples scanned for the gallery and the token maps "
                                          "(bounds time and reads)"),
           weights: str | None = typer.Option(None, help="a learned extractor's weights file, to rank patches by "
                                              "distance (default: the local caches)"),
           storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP)) -> None:
    """Write a static HTML report of a dataset's tokenizer: codebook gallery, token maps, code usage, TCAS,
    token-by-class matrix, k-means curve."""
    from kmim.report import build_report

    with _reported(OSError, ValueError):
        index = build_report(root, out, storage_options=_storage_options(storage_option), samples=samples,
                             per_code=per_code, max_codes=max_codes, max_images=max_images, weights=weights)
    console.print(escape(f"report: {index}"))


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

    _log_progress()
    with _reported(PublishError, UploadError, OSError):
        summary = publish_dataset(src, url, _storage_options(storage_option), workers=workers)
    console.print(_report_table(summary, "publish summary"))


@app.command()
def serve(root: str = typer.Argument(..., help="dataset directory or URL (any fsspec URL)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on; not loopback only with --allow-remote"),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one)"),
          report: Path | None = typer.Option(None, help="serve this report directory (kmim report --out) instead "
                                             "of building one at start"),
          allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a --host other than loopback: "
                                            "whoever reaches it reads the dataset, over plain HTTP"),
          token: str | None = typer.Option(None, envvar="KMIM_SERVE_TOKEN", show_default=False,
                                           help="require 'Authorization: Bearer TOKEN' on every request (better "
                                                "set in the environment: a flag shows in the process list)"),
          storage_option: list[str] | None = typer.Option(None, "--storage-option", help=_STORAGE_HELP)) -> None:
    """Serve a dataset read-only over HTTP: its report at /, its manifest-listed files under /data/ (Range, ETag),
    to stream with TokenDataset("http://HOST:PORT/data/")."""
    from kmim.serve.server import is_loopback
    from kmim.serve.server import serve as serve_dataset

    if allow_remote and not is_loopback(host):
        console.print(f"[yellow]warning:[/yellow] listening on {escape(host)}: anyone who reaches it reads the "
                      "dataset over plain HTTP (no TLS)" + ("" if token else ", and no token is required"))
    _log_progress()
    with _reported(ValueError, OSError):
        serve_dataset(root, host=host, port=port, report=report, token=token,
                      storage_options=_storage_options(storage_option), allow_remote=allow_remote)


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
@_settings_options(TrainConfig)
def train_command(config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP), **settings: Any) -> None:
    """Train a MIM model on a kmim dataset (single process, or DDP under `torchrun --no-python kmim train`)."""
    from kmim.trainer.config import load_train_config
    from kmim.trainer.engine import train

    with _invalid_config():
        cfg = load_train_config(config, settings)
    _run_on_ranks(lambda: train(cfg), "training summary")


def _run_on_ranks(run: Callable[[], dict], title: str, as_json: bool = False) -> None:
    """``run()`` on this rank (one of torchrun's, or the only one); rank 0 logs progress and prints the summary it
    returns, as a table or (``as_json``) one JSON object."""
    import os

    from kmim.trainer.engine import TrainError

    main = os.environ.get("RANK", "0") == "0"
    _log_progress(main and not as_json)
    with _reported(TrainError, ValueError, OSError):
        summary = run()
    if main:
        if as_json:
            print(json.dumps(summary))
        else:
            console.print(_report_table(summary, title))


@eval_app.command("linprobe")
def eval_linprobe(
    checkpoint: Path = typer.Option(..., help="run directory (its latest checkpoint is evaluated)"),
    data: str | None = typer.Option(None, help="one labelled dataset, split by key hash"),
    train_data: str | None = typer.Option(None, help="labelled dataset the head is trained on (with --val-data)"),
    val_data: str | None = typer.Option(None, help="held-out labelled dataset top-1 is measured on"),
    pool: str = typer.Option("auto", help="auto | cls | mean: the CLS token's output (models trained with "
                                          "--cls-token; auto picks it) or mean-pooled patch tokens"),
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
    """Frozen-encoder linear probe and weighted k-NN top-1: trained on --train-data, measured on --val-data, or
    on a held-out split of --data by key hash."""
    from kmim.trainer.engine import TrainError
    from kmim.trainer.linprobe import ProbeConfig, linear_probe

    split = data is not None and train_data is None and val_data is None
    if not split and (data is not None or train_data is None or val_data is None):
        _say("error", "give either --data DIR, or both --train-data DIR and --val-data DIR")
        raise typer.Exit(2)
    with _reported(TrainError, ValueError, OSError):
        cfg = ProbeConfig(train_fraction, split_seed, epochs, batch_size, lr, knn_k, knn_temperature)
        report = linear_probe(checkpoint, data or train_data, cfg, val_data=val_data, pool=pool, device=device,
                              workers=workers)
    if as_json:
        print(json.dumps(report))
    else:
        Console().print(_report_table(report, f"linear probe: {checkpoint}"))


@eval_app.command("finetune")
@_settings_options(FinetuneConfig)
def eval_finetune(config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
                  as_json: bool = typer.Option(False, "--json", help="print one JSON object (rank 0)"),
                  **settings: Any) -> None:
    """Fine-tune a pre-trained run end to end (MAE / BEiT recipe) and report top-1 on held-out data (single
    process, or DDP under `torchrun --no-python kmim eval finetune`)."""
    from kmim.trainer.config import load_finetune_config
    from kmim.trainer.finetune import finetune

    with _invalid_config():
        cfg = load_finetune_config(config, settings)
    _run_on_ranks(lambda: finetune(cfg), "fine-tuning summary", as_json)
