"""Typed job configuration: a YAML file plus command-line overrides, validated before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kmim.storage import redact_text

LEARNED = ("dino", "clip")
_EXAMPLES = {"dino": "a timm model name, e.g. vit_small_patch16_224.dino",
             "clip": "an open_clip model name, e.g. ViT-B-16 or RN50x64"}


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending field."""


class JobConfig(BaseModel):
    """Settings of one ``kmim run``. Field names are the CLI flags with dashes turned into underscores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(description="output dataset directory or fsspec URL (s3://bucket/prefix, gs://..., file://...)")
    # May hold credentials: kept out of repr, job.json, the manifest and every message.
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False,
                                            description="options of the output's fsspec filesystem")
    staging: str | None = Field(None, description="local working directory for a remote out (codebook, shards "
                                                  "before upload); default: one per URL under ~/.cache/kmim/staging")
    input: str | None = Field(None, description="ImageFolder dir, tar shard(s), or Parquet; none = built-in")
    extractor: Literal["pixel", "dino", "clip"] = "pixel"
    # The next seven settings are for the dino and clip extractors only; None = the extractor's default.
    model: str | None = Field(None, validate_default=True, description="timm (dino) / open_clip (clip) model name")
    model_kwargs: dict | None = Field(None, validate_default=True,
                                      description="architecture overrides: timm create_model kwargs (dino), "
                                                  "merged into the open_clip model config (clip)")
    weights: str | None = Field(None, validate_default=True,
                                description="weights file, local cache directory, or open_clip pretrained tag; "
                                            "default: the local timm / open_clip / Hugging Face caches")
    layer: int | None = Field(None, description="block (ViT) or stage (ResNet CLIP) index; default: the last")
    resample: Literal["input", "bilinear", "area"] | None = Field(
        None, description="grid alignment: resize the input to model_patch * grid (input, default), or run at "
                          "the model's size and resample the feature map (bilinear, area)")
    dtype: Literal["auto", "fp32", "bf16"] | None = Field(None, description="auto = bf16 autocast on CUDA, else fp32")
    device: str | None = Field(None, pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto = CUDA if available")
    k: int = Field(50, ge=2, le=2**31 - 1, description="codebook size")
    image_size: int = Field(224, ge=8, le=4096)
    patch_size: int = Field(16, ge=1, le=512)
    seed: int = Field(0, ge=0)
    normalize: Literal["imagenet", "none", "l2"] | None = Field(
        None, validate_default=True,
        description="pixel: input normalization, imagenet (default) | none; dino/clip: feature normalization, "
                    "none (default) | l2 (then spherical k-means and max-dot assignment)")
    norm_pix: bool = Field(False, description="per-patch mean/variance normalization (MAE norm_pix_loss)")
    kmeans_epochs: int = Field(20, ge=1, le=10_000)
    kmeans_batch_size: int = Field(8192, ge=16)
    kmeans_workers: int | None = Field(None, ge=1, description="Ray actors holding the k-means fit sample "
                                       "(runner ray; default: the GPUs in the cluster, else its CPUs up to 16)")
    fit_images: int = Field(10_000, ge=1, description="images sampled for the k-means fit")
    fit_patches: int = Field(200_000, ge=2, description="patch features sampled for the k-means fit")
    assign: Literal["auto", "faiss", "torch"] = "auto"
    feature_cache: str | None = Field(None, description="directory caching sampled fit features (fp16)")
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    batch_size: int = Field(64, ge=1, description="images per extraction batch")
    decode_threads: int | None = Field(None, ge=1, description="threads decoding images in each worker "
                                       "(default: the CPUs the worker holds)")
    runner: Literal["ray", "local"] = "ray"
    gpu_wait_s: float = Field(600.0, ge=0, description="with --device cuda on Ray: seconds to wait for a GPU worker "
                              "to join the cluster before failing")
    ray_address: str | None = None
    max_in_flight: int | None = Field(None, ge=1, description="shard tasks in flight "
                                      "(default: 2 x CPUs; with GPU actors: 2 per actor)")
    task_retries: int = Field(2, ge=0, le=100, description="extra attempts of a shard after a transient failure "
                                                          "(worker/actor/node death, I/O error)")
    image_column: str = "image"
    label_column: str | None = "label"
    min_image_size: int = Field(8, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1)
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="skip an input image of more bytes (a file, tar "
                                 "member or Parquet value) without reading it")

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _parse_json(cls, v):
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON object: {e}") from None
        return v

    @field_validator("model", "model_kwargs", "weights", "layer", "resample", "dtype", "device")
    @classmethod
    def _learned_only(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("extractor") == "pixel":
            raise ValueError(f"only used by the {' and '.join(LEARNED)} extractors")
        return v

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        extractor = info.data.get("extractor")
        if extractor in LEARNED:
            if v is None:
                raise ValueError(f"required for extractor '{extractor}' ({_EXAMPLES[extractor]})")
            from kmim.tokenizers.learned import check_architecture, family

            family(extractor).check_name(v)
            check_architecture(extractor, v, {}, None)
        return v

    @field_validator("model_kwargs")
    @classmethod
    def _check_kwargs(cls, v: dict | None, info: ValidationInfo) -> dict | None:
        extractor, model = info.data.get("extractor"), info.data.get("model")
        if v and extractor in LEARNED and model is not None:
            from kmim.tokenizers.learned import check_architecture

            try:
                check_architecture(extractor, model, v, None)
            except Exception as e:  # noqa: BLE001 - any failure to build the model is a configuration error
                raise ValueError(f"cannot build '{model}' with {v}: {type(e).__name__}: {e}") from None
        return v

    @field_validator("layer")
    @classmethod
    def _check_layer(cls, v: int | None, info: ValidationInfo) -> int | None:
        extractor, model = info.data.get("extractor"), info.data.get("model")
        if v is not None and extractor in LEARNED and model is not None and "model_kwargs" in info.data:
            from kmim.tokenizers.learned import check_architecture

            check_architecture(extractor, model, info.data["model_kwargs"] or {}, v)
        return v

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: str | None, info: ValidationInfo) -> str | None:
        extractor, model = info.data.get("extractor"), info.data.get("model")
        if extractor in LEARNED and model is not None:
            from kmim.tokenizers.learned import family

            family(extractor).resolve(model, v)
        return v

    @field_validator("normalize")
    @classmethod
    def _check_normalize(cls, v: str | None, info: ValidationInfo) -> str | None:
        extractor = info.data.get("extractor")
        if extractor == "pixel":
            if v == "l2":
                raise ValueError("pixel takes imagenet | none (l2 is for dino/clip features)")
            return v or "imagenet"
        if v == "imagenet":
            raise ValueError(f"{extractor} takes none | l2 (the model's own input normalization is always applied)")
        return v or "none"

    @field_validator("norm_pix")
    @classmethod
    def _check_norm_pix(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("extractor") in LEARNED:
            raise ValueError("only used by the pixel extractor")
        return v

    @model_validator(mode="after")
    def _check_geometry(self) -> JobConfig:
        if self.runner == "ray" and (self.device or "").startswith("cuda:"):
            raise ValueError(f"field 'device': {self.device} names one GPU of this machine, but with runner 'ray' "
                             "each GPU actor uses the GPU Ray assigned it: use --device cuda")
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
        # Storage options may be credentials whatever their type; other values are shown with URLs redacted.
        secret = e["loc"][0] == "storage_options" or isinstance(e.get("input"), dict)
        value = f" (got {redact_text(repr(e['input']))})" if "input" in e and not secret else ""
        lines.append(f"{source}: field '{field}': {e['msg']}{value}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                model: type[BaseModel] = JobConfig) -> BaseModel:
    """Merge the YAML file at ``path`` (if any) with ``overrides`` (None values ignored); validate as ``model``."""
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
        return model(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
