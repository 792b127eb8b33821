"""Checks of a job's settings that need the model libraries, run by the job before any work.

:class:`kmim.config.JobConfig` validates what the settings say on their own; whether a learned extractor's
model exists, builds with its ``model_kwargs``, has the ``layer`` asked for, and has weights in the local
caches is checked here, by building the model skeleton on the meta device (no memory, no weights loaded)
and resolving its weights file (never downloaded).
"""

from __future__ import annotations

from kmim.config import LEARNED, ConfigError, JobConfig
from kmim.storage import redact_text


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
