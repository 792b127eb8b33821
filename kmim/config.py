"""Typed job configuration: a YAML file plus command-line overrides, validated before any work starts.

Each setting is stated once, as a field of a settings model: its type, default and description also make its
command-line option (:mod:`kmim.cli`), and its tag says whether it is material (:func:`material_settings`).
Checks that need a model built or its weights found are a job step (:mod:`kmim.pipeline.checks`), not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from kmim.storage import redact_text

LEARNED = ("dino", "clip")
_EXAMPLES = {"dino": "a timm model name, e.g. vit_small_patch16_224.dino",
             "clip": "an open_clip model name, e.g. ViT-B-16 or RN50x64"}
# The tag of a setting that changes no output (where or how fast the work runs, where it is written):
# ``Field(..., json_schema_extra=NOT_MATERIAL)``. Every untagged setting is material.
NOT_MATERIAL = {"material": False}


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending field."""


def is_material(field: FieldInfo) -> bool:
    """Whether a change of this setting means a different output (it is not tagged :data:`NOT_MATERIAL`)."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("material") is False)


def material_settings(settings: BaseModel) -> dict:
    """The material fields of ``settings`` with their values, in field order: what a resumed run must share with
    the run it continues."""
    fields = type(settings).model_fields
    return settings.model_dump(include={name for name, field in fields.items() if is_material(field)})


class JobConfig(BaseModel):
    """Settings of one ``kmim run``. Field names are the CLI flags with dashes turned into underscores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(description="output dataset directory or URL: s3://bucket/prefix, gs://..., any fsspec URL",
                     json_schema_extra=NOT_MATERIAL)
    # May hold credentials: kept out of repr, job.json, the manifest and every message.
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False, json_schema_extra=NOT_MATERIAL,
                                            description="options of the output's fsspec filesystem")
    staging: str | None = Field(None, json_schema_extra=NOT_MATERIAL,
                                description="local working directory for a remote out (codebook, shards before "
                                            "upload); default: ~/.cache/kmim/staging/<digest of the URL>")
    input: str | None = Field(None, description="ImageFolder dir, tar shard(s) or brace pattern, Parquet; "
                                                "default: the built-in digits sample")
    # Not material: the codebook itself is checked (its tokenizer_id against the one in the output), not its path.
    codebook: str | None = Field(None, json_schema_extra=NOT_MATERIAL,
                                 description="tokenize with this existing codebook (a codebook.safetensors path or "
                                             "URL, or a directory / prefix holding one, e.g. from kmim fit) instead "
                                             "of fitting one; the settings it fixes are taken from it")
    extractor: Literal["pixel", "dino", "clip"] = Field(
        "pixel", description="where patch features come from: the pixels, or a DINO (timm) / CLIP (open_clip) backbone")
    # The next seven settings are for the dino and clip extractors only; None = the extractor's default.
    model: str | None = Field(None, validate_default=True, description="dino: timm model name "
                              "(vit_small_patch16_224.dino); clip: open_clip model name (ViT-B-16, RN50x64)")
    model_kwargs: dict | None = Field(None, description="JSON object of architecture overrides: timm create_model "
                                      "kwargs (dino), merged into the open_clip model config (clip)")
    weights: str | None = Field(None, description="weights file (.safetensors/.pth), a local timm / open_clip / "
                                "Hugging Face cache directory, or an open_clip pretrained tag; never downloaded; "
                                "default: the local caches")
    layer: int | None = Field(None, description="ViT block (negative = from the end) or ResNet CLIP stage "
                              "(0 stem, 1..4) whose features are used; default: the last")
    resample: Literal["input", "bilinear", "area"] | None = Field(
        None, description="align features with the patch grid by resizing the image to model_patch * grid (input, "
                          "the default) or by resampling the model's feature map (bilinear, area)")
    dtype: Literal["auto", "fp32", "bf16"] | None = Field(
        None, description="auto (the default) is bf16 autocast when the job runs on CUDA, fp32 on CPU, resolved "
                          "once on the driver")
    # Not material: where features are computed changes no token beyond float rounding; ``dtype`` does.
    device: str | None = Field(None, pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", json_schema_extra=NOT_MATERIAL,
                               description="auto | cpu | cuda | cuda:N (cuda:N with runner local only); auto (the "
                                           "default): CUDA if the machine or the Ray cluster has GPUs")
    k: int = Field(50, ge=2, le=2**31 - 1, description="codebook size")
    image_size: int = Field(224, ge=8, le=4096, description="resize the shorter side to this, then center crop")
    patch_size: int = Field(16, ge=1, le=512, description="patch size in pixels")
    views: int = Field(1, ge=1, le=256, description="views tokenized per image: view 0 is the center view, views "
                                                     "1.. random resized crops (see view_scale, view_ratio, view_flip)")
    view_scale: tuple[float, float] = Field((0.2, 1.0), description="random views: min,max share of the image's "
                                            "area a crop covers")
    view_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="random views: min,max aspect ratio "
                                            "(width/height) of a crop, drawn log-uniformly")
    view_flip: float = Field(0.5, ge=0, le=1, description="random views: probability of a horizontal flip")
    tokenizer_image_size: int | None = Field(None, ge=8, le=4096, description="dino/clip: render each view's crop "
                                             "at this size for the extractor (the grid stays image_size/patch_size); "
                                             "default: image_size")
    seed: int = Field(0, ge=0, description="seed of the fit sample and the k-means fit")
    normalize: Literal["imagenet", "none", "l2"] | None = Field(
        None, validate_default=True,
        description="input normalization of pixel, imagenet (default) or none; feature normalization of dino/clip, "
                    "none (default) or l2 (then spherical k-means and max-dot assignment)")
    norm_pix: bool = Field(False, description="per-patch mean/variance normalization (MAE norm_pix_loss)")
    kmeans_epochs: int = Field(20, ge=1, le=10_000, description="k-means passes over the fit sample")
    kmeans_batch_size: int = Field(8192, ge=16, description="k-means mini-batch size")
    kmeans_workers: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                       description="Ray actors sampling and holding the k-means fit sample (runner "
                                                   "ray); default: none (the fit runs in the driver) on a one-node "
                                                   "cluster when the sample takes at most 2 GiB, else the GPUs in "
                                                   "the cluster, else its CPUs up to 16")
    fit_images: int = Field(10_000, ge=1, description="images sampled for the k-means fit")
    fit_patches: int = Field(200_000, ge=2, description="patch features sampled for the k-means fit")
    # Not material: tokens are exact with either backend; the fast fit's backend is recorded in the codebook, and
    # a resumed fit keeps its checkpoint's.
    assign: Literal["auto", "faiss", "torch"] = Field("auto", json_schema_extra=NOT_MATERIAL,
                                                      description="nearest-centroid search; also the backend of "
                                                                  "the fast fit's float32 top-1 (auto: faiss on "
                                                                  "CPU, torch on CUDA)")
    fit_exact: bool = Field(False, description="k-means updates by the exact nearest centroid (a backend- and "
                                               "device-independent fit, kmim's only one before) instead of the "
                                               "float32 top-1 (faiss on CPU, torch on CUDA, or --assign); tokens are "
                                               "exact nearest centroids either way")
    feature_cache: str | None = Field(None, json_schema_extra=NOT_MATERIAL,
                                      description="directory caching sampled fit features (fp16), so repeated "
                                                  "k-means experiments skip extraction")
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    batch_size: int = Field(64, ge=1, json_schema_extra=NOT_MATERIAL, description="images per extraction batch")
    decode_threads: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                       description="threads decoding images in each worker; default: the CPUs the "
                                                   "worker holds")
    runner: Literal["ray", "local"] = Field("ray", json_schema_extra=NOT_MATERIAL,
                                            description="a Ray cluster, or this process")
    gpu_wait_s: float = Field(600.0, ge=0, json_schema_extra=NOT_MATERIAL,
                              description="with device cuda on Ray: seconds to wait for a GPU worker to join the "
                                          "cluster before failing")
    ray_address: str | None = Field(None, json_schema_extra=NOT_MATERIAL,
                                    description="join this Ray cluster; default: RAY_ADDRESS, else an embedded one")
    max_in_flight: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                      description="shard tasks in flight; default: 2 x CPUs, with GPU actors 2 each")
    task_retries: int = Field(2, ge=0, le=100, json_schema_extra=NOT_MATERIAL,
                              description="extra attempts of a shard after a transient failure (worker, actor or "
                                          "node death, I/O error)")
    image_column: str = Field("image", description="Parquet image-bytes column")
    label_column: str | None = Field("label", description="Parquet label column")
    min_image_size: int = Field(8, ge=1, description="skip images with a shorter side below this")
    max_image_pixels: int = Field(89_478_485, ge=1, description="skip larger images as decompression bombs")
    render: Literal["full", "scaled"] = Field("scaled", description="scaled: decode a JPEG at the smallest DCT "
                                              "scale M/8 that keeps each view's box at least as large as the view "
                                              "(2.4-5.9x faster; other images as full); full: decode every image "
                                              "whole (the pixels of datasets written before this setting)")
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

    @field_validator("view_scale", "view_ratio", mode="before")
    @classmethod
    def _parse_pair(cls, v):
        if isinstance(v, str):
            return [p.strip() for p in v.split(",")]
        return v

    @field_validator("view_scale", "view_ratio")
    @classmethod
    def _check_pair(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        top = 1.0 if info.field_name == "view_scale" else math.inf
        if not 0 < v[0] <= v[1] <= top:
            raise ValueError(f"expected min,max with 0 < min <= max{' <= 1' if top == 1.0 else ''}")
        return v

    @field_validator("model", "model_kwargs", "weights", "layer", "resample", "dtype", "device",
                     "tokenizer_image_size")
    @classmethod
    def _learned_only(cls, v, info: ValidationInfo):
        # With a codebook the extractor may come from it: checked once the codebook's settings are merged in.
        if v is not None and info.data.get("extractor") == "pixel" and info.data.get("codebook") is None:
            raise ValueError(f"only used by the {' and '.join(LEARNED)} extractors")
        return v

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        extractor = info.data.get("extractor")
        if extractor in LEARNED and v is None and info.data.get("codebook") is None:
            raise ValueError(f"required for extractor '{extractor}' ({_EXAMPLES[extractor]})")
        return v

    @field_validator("normalize")
    @classmethod
    def _check_normalize(cls, v: str | None, info: ValidationInfo) -> str | None:
        extractor = info.data.get("extractor")
        if info.data.get("codebook") is not None:
            return v  # see _learned_only
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
        if v and info.data.get("extractor") in LEARNED and info.data.get("codebook") is None:
            raise ValueError("only used by the pixel extractor")
        return v

    @model_validator(mode="after")
    def _check_geometry(self) -> JobConfig:
        if self.runner == "ray" and (self.device or "").startswith("cuda:"):
            raise ValueError(f"field 'device': {self.device} names one GPU of this machine, but with runner 'ray' "
                             "each GPU actor uses the GPU Ray assigned it: use --device cuda")
        if self.codebook is not None:
            return self  # the geometry may come from the codebook: checked once its settings are merged in
        if self.image_size % self.patch_size:
            raise ValueError(f"field 'image_size' ({self.image_size}) must be a multiple of field 'patch_size' "
                             f"({self.patch_size})")
        if self.tokenizer_image_size is not None and self.tokenizer_image_size % self.grid:
            raise ValueError(f"field 'tokenizer_image_size' ({self.tokenizer_image_size}) must be a multiple of the "
                             f"token grid's side ({self.grid} = image_size / patch_size)")
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
