"""Typed job configuration: a YAML file plus command-line overrides, validated before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending field."""


class JobConfig(BaseModel):
    """Settings of one ``kmim run``. Field names are the CLI flags with dashes turned into underscores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(description="output dataset directory")
    input: str | None = Field(None, description="ImageFolder dir, tar shard(s), or Parquet; none = built-in")
    extractor: Literal["pixel"] = "pixel"
    k: int = Field(50, ge=2, le=2**31 - 1, description="codebook size")
    image_size: int = Field(224, ge=8, le=4096)
    patch_size: int = Field(16, ge=1, le=512)
    seed: int = Field(0, ge=0)
    normalize: Literal["imagenet", "none"] = "imagenet"
    norm_pix: bool = Field(False, description="per-patch mean/variance normalization (MAE norm_pix_loss)")
    kmeans_epochs: int = Field(20, ge=1, le=10_000)
    kmeans_batch_size: int = Field(8192, ge=16)
    fit_images: int = Field(10_000, ge=1, description="images sampled for the k-means fit")
    fit_patches: int = Field(200_000, ge=2, description="patch features sampled for the k-means fit")
    assign: Literal["auto", "faiss", "torch"] = "auto"
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    batch_size: int = Field(64, ge=1, description="images per extraction batch")
    runner: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    max_in_flight: int | None = Field(None, ge=1, description="shard tasks in flight (default: 2 x CPUs)")
    image_column: str = "image"
    label_column: str | None = "label"
    min_image_size: int = Field(8, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)

    @model_validator(mode="after")
    def _check_geometry(self) -> JobConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"field 'image_size' ({self.image_size}) must be a multiple of field 'patch_size' "
                             f"({self.patch_size})")
        if self.k > self.fit_patches:
            raise ValueError(f"field 'k' ({self.k}) must not exceed field 'fit_patches' ({self.fit_patches})")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across fields: its message names them
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
            continue
        field = ".".join(str(p) for p in e["loc"])
        value = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{source}: field '{field}': {e['msg']}{value}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> JobConfig:
    """Merge the YAML file at ``path`` (if any) with ``overrides`` (None values ignored) and validate."""
    data: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in (loaded or {}).items()}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return JobConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
