"""Typed training configuration (``kmim train``): a YAML file plus command-line overrides, validated up front."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kmim.config import NOT_MATERIAL, load_config
from kmim.trainer.mto import MTOConfig
from kmim.trainer.objectives import decoder_config
from kmim.trainer.vit import ViTConfig, vit_config


class RunSettings(BaseModel):
    """Settings every training-style run shares (``kmim train``, ``kmim eval finetune``): loading, device, logging,
    checkpoints and resume. Only ``shuffle_window`` is material (it shapes the sample order)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    workers: int = Field(0, ge=0, json_schema_extra=NOT_MATERIAL, description="DataLoader worker processes per rank")
    shuffle_window: int = Field(4096, ge=1, description="samples shuffled together (see the loader)")
    verify: bool = Field(True, json_schema_extra=NOT_MATERIAL, description="check each shard's sha256 on read")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda)$", json_schema_extra=NOT_MATERIAL,
                        description="auto | cpu | cuda; auto = CUDA if available")
    amp: bool = Field(True, json_schema_extra=NOT_MATERIAL, description="bf16 autocast on CUDA (no effect on CPU)")
    log_every: int = Field(10, ge=1, json_schema_extra=NOT_MATERIAL, description="steps between metrics.jsonl lines")
    checkpoint_every: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                         description="steps between checkpoints; default: each epoch (always at "
                                                     "the end)")
    resume: bool = Field(False, json_schema_extra=NOT_MATERIAL,
                         description="continue from the run directory's latest checkpoint")


class TrainConfig(RunSettings):
    """Settings of one ``kmim train``. Field names are the CLI flags with dashes turned into underscores.

    Steps are optimizer steps; one step consumes ``accum_steps`` micro-batches of ``batch_size`` images on
    every rank, i.e. ``batch_size * accum_steps * world_size`` images.

    Material settings (every field not tagged NOT_MATERIAL: the architecture, the objective, the data order,
    the seed and the optimization schedule) must not change when a run resumes; what is tagged changes where
    or how fast the run computes, what it logs and when it checkpoints, or where it stops. ``data`` is not
    material: a resumed run checks the dataset's tokenizer_id instead, so the dataset may move.
    """

    data: str = Field(description="dataset directory or fsspec URL (a committed kmim dataset)",
                      json_schema_extra=NOT_MATERIAL)
    out: str = Field(description="run directory (local): config, checkpoints, metrics.jsonl, curves.png",
                     json_schema_extra=NOT_MATERIAL)
    objective: Literal["kmim", "mae", "beit", "mapet"] = Field(
        "kmim", description="what the masked patches are trained to predict: their tokens, their pixels, BEiT's "
                            "tokens, or MaPeT's permuted two-stream tokens")
    mto: bool = Field(False, description="add the Masked Token Optimization losses")
    mto_w_spa: float | None = Field(None, ge=0, validate_default=True,
                                    description=f"MTO sparsity weight; default {MTOConfig.w_spa}")
    mto_w_e: float | None = Field(None, ge=0, validate_default=True,
                                  description=f"MTO 1/H(0) weight; default {MTOConfig.w_e}")
    mto_w_r: float | None = Field(None, ge=0, validate_default=True,
                                  description=f"MTO heterogeneity-ranking weight; default {MTOConfig.w_r}")
    mto_eps: float | None = Field(None, gt=0, validate_default=True,
                                  description=f"MTO eps in 1/(H(0)+eps); default {MTOConfig.eps}")
    mto_scale: bool | None = Field(None, validate_default=True,
                                   description="divide MTO's dot products by sqrt(width); default off: the "
                                               "paper's formula")
    model: Literal["tiny", "small", "base"] = Field("tiny", description="encoder size")
    model_dim: int | None = Field(None, ge=4, description="encoder width override")
    model_depth: int | None = Field(None, ge=1, description="encoder blocks override")
    model_heads: int | None = Field(None, ge=1, description="encoder attention heads override")
    cls_token: bool = Field(False, description="prepend a learned CLS token to the encoder (probe it with "
                                               "'kmim eval linprobe --pool cls')")
    decoder_dim: int | None = Field(None, ge=4, validate_default=True, description="decoder width override (kmim, mae)")
    decoder_depth: int | None = Field(None, ge=1, validate_default=True,
                                      description="decoder blocks override (kmim, mae)")
    decoder_heads: int | None = Field(None, ge=1, validate_default=True,
                                      description="decoder heads override (kmim, mae)")
    mask_ratio: float | None = Field(None, gt=0, lt=1, description="share of patches masked; default: 0.75 "
                                                                   "(kmim, mae), 0.4 (beit)")
    reconstruction_ratio: float | None = Field(None, gt=0, lt=1, description="mapet: share of patches predicted "
                                               "(cut c = round((1 - ratio) * N)); default 0.7")
    cut: int | None = Field(None, ge=1, description="mapet: the cutting point c (patches of context); overrides "
                                                    "--reconstruction-ratio")
    epochs: int = Field(1, ge=1, description="length of the learning-rate schedule")
    max_steps: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                  description="stop after this many steps (the schedule still spans 'epochs'); "
                                              "counts steps of earlier runs")
    batch_size: int = Field(64, ge=1, description="images per micro-batch per rank")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases, norms, tokens)")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 = no clipping")
    seed: int = Field(0, ge=0, description="seed of the initialization, the sample order and the masks")
    sample_log: bool = Field(False, json_schema_extra=NOT_MATERIAL,
                             description="audit: each rank appends the sample ids it trained on to "
                                         "samples.rank<R>.jsonl")

    @field_validator("mto_w_spa", "mto_w_e", "mto_w_r", "mto_eps", "mto_scale")
    @classmethod
    def _mto_only(cls, v: float | bool | None, info: ValidationInfo) -> float | bool | None:
        if v is not None and not info.data.get("mto"):
            raise ValueError("only used with mto")
        return v

    @field_validator("decoder_dim", "decoder_depth", "decoder_heads")
    @classmethod
    def _decoder_only(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("objective") in ("beit", "mapet"):
            raise ValueError(f"{info.data['objective']} has no decoder")
        return v

    @field_validator("reconstruction_ratio", "cut")
    @classmethod
    def _mapet_only(cls, v: float | int | None, info: ValidationInfo) -> float | int | None:
        if v is not None and info.data.get("objective") != "mapet":
            raise ValueError("only used with objective mapet")
        return v

    @field_validator("mask_ratio")
    @classmethod
    def _not_mapet(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("objective") == "mapet":
            raise ValueError("mapet predicts, it does not mask: use reconstruction_ratio or cut")
        return v

    @model_validator(mode="after")
    def _check_shapes(self) -> TrainConfig:
        for part, build in (("model", self.encoder), ("decoder", self.decoder)):
            try:
                build()
            except ValueError as e:
                raise ValueError(f"fields '{part}_dim' / '{part}_heads': {e}") from None
        if self.min_lr > self.lr:
            raise ValueError(f"field 'min_lr' ({self.min_lr}) must not exceed field 'lr' ({self.lr})")
        return self

    def encoder(self) -> ViTConfig:
        return vit_config(self.model, dim=self.model_dim, depth=self.model_depth, heads=self.model_heads)

    def decoder(self) -> ViTConfig | None:
        """The decoder (None for beit and mapet): the model size's default with the overrides applied."""
        if self.objective in ("beit", "mapet"):
            return None
        base = decoder_config(self.model)
        return ViTConfig(self.decoder_dim or base.dim, self.decoder_depth or base.depth,
                         self.decoder_heads or base.heads, base.mlp_ratio)

    def mto_config(self) -> MTOConfig | None:
        if not self.mto:
            return None
        given = {"w_spa": self.mto_w_spa, "w_e": self.mto_w_e, "w_r": self.mto_w_r, "eps": self.mto_eps,
                 "scale": self.mto_scale}
        return MTOConfig(**{k: v for k, v in given.items() if v is not None})


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Merge the YAML file at ``path`` (if any) with ``overrides`` (None values ignored) and validate."""
    return load_config(path, overrides, TrainConfig)


class FinetuneConfig(RunSettings):
    """Settings of one ``kmim eval finetune``: the MAE / BEiT fine-tuning recipe (AdamW with layer-wise lr decay,
    warmup + cosine, label smoothing, drop path, random-resized-crop + flip), scaled to the pre-trained model.

    Material settings (checked on ``--resume``) are the recipe and the sample order; the data, run and pre-trained
    run paths and how or where the run computes are not.
    """

    checkpoint: str = Field(description="pre-trained run directory (`kmim train --out`); its latest checkpoint's "
                                        "encoder initializes the model", json_schema_extra=NOT_MATERIAL)
    train_data: str = Field(description="labelled kmim dataset to fine-tune on", json_schema_extra=NOT_MATERIAL)
    val_data: str = Field(description="held-out labelled kmim dataset: top-1 after every epoch",
                          json_schema_extra=NOT_MATERIAL)
    out: str = Field(description="fine-tuning run directory (local): finetune.json, checkpoints, metrics.jsonl, "
                                 "curves.png", json_schema_extra=NOT_MATERIAL)
    classes: int | None = Field(None, ge=2, description="number of classes; default: the train data's class names")
    pool: Literal["auto", "cls", "mean"] = Field("auto", description="classify the CLS token's output (auto "
                                                 "when the model has one) or mean-pooled patch tokens")
    epochs: int = Field(100, ge=1, description="length of the schedule (MAE ViT-B: 100)")
    max_steps: int | None = Field(None, ge=1, json_schema_extra=NOT_MATERIAL,
                                  description="stop after this many steps (the schedule still spans 'epochs')")
    batch_size: int = Field(64, ge=1, description="images per micro-batch per rank")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    blr: float = Field(5e-4, gt=0, description="base learning rate: peak lr = blr * images per step / 256 "
                                               "(MAE ViT-B)")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine decay")
    warmup_epochs: float | None = Field(None, ge=0, description="linear warmup; default min(5, epochs / 10)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay: block i of n gets "
                                      "decay^(n + 1 - i); default 0.65 for base (MAE ViT-B), 0.75 smaller")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases, norms, tokens)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the last block (linear in depth)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")
    crop_scale_min: float = Field(0.08, gt=0, le=1, description="smallest area share of the random resized crop")
    flip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    grad_clip: float = Field(0.0, ge=0, description="max global gradient norm; 0 = no clipping (MAE)")
    seed: int = Field(0, ge=0, description="seed of the head, the sample order, crops and drop path")

    @model_validator(mode="after")
    def _check_lr(self) -> FinetuneConfig:
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"field 'warmup_epochs' ({self.warmup_epochs}) must be below 'epochs' ({self.epochs})")
        return self

    def warmup(self) -> float:
        """Warmup length in epochs."""
        return min(5.0, self.epochs / 10) if self.warmup_epochs is None else self.warmup_epochs

    def decay_for(self, model_size: str) -> float:
        """The layer-wise lr decay for a pre-trained model of size ``model_size``."""
        return self.layer_decay or (0.65 if model_size == "base" else 0.75)


def load_finetune_config(path: str | Path | None = None, overrides: dict | None = None) -> FinetuneConfig:
    """Merge the YAML file at ``path`` (if any) with ``overrides`` (None values ignored) and validate."""
    return load_config(path, overrides, FinetuneConfig)
