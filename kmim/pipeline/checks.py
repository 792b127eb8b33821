"""Checks of a job's settings that need the model libraries, run by the job before any work.

:class:`kmim.config.JobConfig` validates what the settings say on their own; whether a learned extractor's
model exists, builds with its ``model_kwargs``, has the ``layer`` asked for, and has weights in the local
caches is checked here, by building the model skeleton on the meta device (no memory, no weights loaded)
and resolving its weights file (never downloaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmim.config import LEARNED, ConfigError, JobConfig, load_config
from kmim.storage import redact_text

if TYPE_CHECKING:
    from kmim.datasets.codebook import Codebook


def _named(field: str, error: Exception, value: object) -> str:
    """``error`` as a message naming ``field`` and the value given (URLs redacted)."""
    return f"field '{field}': {error} (got {redact_text(repr(value))})"


def check_extractor(cfg: JobConfig) -> None:
    """Check a learned extractor's ``model``, ``model_kwargs``, ``layer`` and ``weights``; raises ConfigError
    naming each field at fault (one line each). Nothing to check for the pixel extractor."""
    if cfg.extractor not in LEARNED:
        return
    from kmim.tokenizers.learned import check_architecture, family

    extractor, model, kwargs = cfg.extractor, cfg.model, cfg.model_kwargs or {}
    try:
        family(extractor).check_name(model)
        check_architecture(extractor, model, {}, None)
    except ValueError as e:
        raise ConfigError(_named("model", e, model)) from None
    problems, kwargs_ok = [], True
    if kwargs:
        try:
            check_architecture(extractor, model, kwargs, None)
        except Exception as e:  # noqa: BLE001 - any failure to build the model is a configuration error
            problems.append(f"field 'model_kwargs': cannot build '{model}' with {kwargs}: {type(e).__name__}: {e}")
            kwargs_ok = False
    try:
        family(extractor).resolve(model, cfg.weights)
    except ValueError as e:
        problems.append(_named("weights", e, cfg.weights))
    if cfg.layer is not None and kwargs_ok:
        try:
            check_architecture(extractor, model, kwargs, cfg.layer)
        except ValueError as e:
            problems.append(_named("layer", e, cfg.layer))
    if problems:
        raise ConfigError("\n".join(problems))


# Settings a codebook fixes, as (field, its value in the codebook's metadata ``meta`` of K ``k``); the k-means
# settings (seed, kmeans_*, fit_*) only drive a fit, so they are not among them.
_FIXED = ("extractor", "model", "model_kwargs", "layer", "resample", "dtype", "normalize", "norm_pix", "k",
          "image_size", "patch_size", "tokenizer_image_size")
# Fields whose given value may be spelled otherwise in the metadata (a negative layer, dtype auto): not refused
# here, but by :func:`check_codebook_extractor` when the extractor they build differs.
_RESOLVED = ("model_kwargs", "layer", "dtype")


def _codebook_values(meta: dict, k: int) -> dict:
    """The :data:`_FIXED` settings recorded in codebook metadata ``meta`` (those it records)."""
    values = {name: meta[name] for name in _FIXED if name in meta}
    values["k"] = k
    grid = meta["grid"][0] if "grid" in meta else meta["image_size"] // meta["patch_size"]
    values["patch_size"] = meta["image_size"] // grid
    if meta.get("extractor") != "pixel":
        values["tokenizer_image_size"] = meta.get("tokenizer_image_size")
        if meta.get("feature_resample") not in (None, "none"):  # else the model's grid is the token grid
            values["resample"] = meta["feature_resample"]
        values.pop("norm_pix", None)
    return values


def codebook_file(url: str) -> str:
    """The codebook file of ``--codebook``: the path or URL itself when it names a ``.safetensors`` file, else the
    ``codebook.safetensors`` in that directory or prefix."""
    from kmim.datasets.manifest import CODEBOOK
    from kmim.storage import join

    return url if url.endswith(".safetensors") else join(url, CODEBOOK)


def with_codebook(cfg: JobConfig) -> tuple[JobConfig, bytes, Codebook]:
    """The settings of a job tokenizing with the existing codebook ``cfg.codebook``, that file's bytes and the
    codebook. The settings it fixes are taken from it; one given explicitly that differs raises ConfigError naming
    the field. The k-means settings (seed, kmeans_*, fit_*) are not compared: they only drive a fit (``seed``
    also draws the random views, as without a codebook)."""
    import tempfile
    from pathlib import Path

    from kmim.datasets.codebook import load_codebook
    from kmim.storage import open_url, redact

    url = codebook_file(cfg.codebook)
    fs, path = open_url(url, cfg.storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ConfigError(f"field 'codebook': {redact(url)} does not exist") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "codebook.safetensors").write_bytes(data)
        try:
            book = load_codebook(Path(tmp) / "codebook.safetensors", redact(url))
        except ValueError as e:
            raise ConfigError(f"field 'codebook': {e}") from None
    values = _codebook_values(book.metadata, book.k)
    for name in _FIXED:
        given = getattr(cfg, name)
        if name in cfg.model_fields_set and name not in _RESOLVED and name in values and given != values[name]:
            raise ConfigError(f"field '{name}': {given!r} conflicts with the codebook {redact(url)}, fitted with "
                              f"{values[name]!r} (leave it out to take the codebook's)")
    settings = cfg.model_dump(include=cfg.model_fields_set)
    settings.update({n: v for n, v in values.items() if n not in cfg.model_fields_set and v is not None})
    # Validated without the codebook (load_config drops None), so that every cross-field check applies again.
    merged = load_config(None, {**settings, "codebook": None})
    return merged.model_copy(update={"codebook": cfg.codebook}), data, book


def check_codebook_extractor(metadata: dict, extractor: dict, where: str) -> None:
    """Refuse a codebook (metadata ``metadata``, at ``where``) whose extractor is not ``extractor`` (the metadata
    of the one the settings build), naming the first differing setting."""
    differs = [key for key, value in extractor.items() if metadata.get(key) != value]
    if differs:
        key = differs[0]
        field = {"weights_digest": "weights", "weights_file": "weights", "pretrained_tag": "weights",
                 "layer_name": "layer", "arch": "model", "input_norm": "model", "model_stride": "model",
                 "model_grid": "model", "dim": "model", "grid": "patch_size", "input_size": "tokenizer_image_size",
                 "input_resize": "tokenizer_image_size", "feature_resample": "resample", "metric": "normalize"}
        raise ConfigError(f"field '{field.get(key, key)}': the extractor these settings build differs from the one "
                          f"the codebook {where} was fitted with in '{key}' ({extractor[key]!r}, there "
                          f"{metadata.get(key)!r})")
