"""The settings each stage takes, built once from the job's resolved settings: no stage sees the job's config.

Small frozen specs (source, decode/view, extractor, fit, output) bound into the stage callables
(:class:`~kmim.pipeline.stages.FitSampleStage`, :class:`~kmim.pipeline.stages.TokenizeStage`), the shape of
img2dataset's ``Downloader``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kmim.config import JobConfig
from kmim.datasets.preprocess import Preprocess, ViewSpec
from kmim.pipeline.decoding import DecodeSpec
from kmim.pipeline.fit import FitSample, FitSpec
from kmim.pipeline.sources import InputShard, SourceSpec
from kmim.pipeline.stages import FitSampleStage, OutputSpec, TokenizeStage
from kmim.tokenizers.extractors import ExtractorSpec, PixelSpec
from kmim.tokenizers.learned import LearnedSpec


def source_spec(cfg: JobConfig) -> SourceSpec:
    """How the job's input is planned into shards and read."""
    return SourceSpec(cfg.input, cfg.shard_size, cfg.image_column, cfg.label_column, cfg.max_image_bytes)


def extractor_spec(cfg: JobConfig) -> ExtractorSpec:
    """The extractor the job's settings ask for; a learned one's device and dtype as ``cfg`` says (concrete once
    :func:`kmim.pipeline.compute.resolve_compute` resolved them, ``auto`` before)."""
    if cfg.extractor == "pixel":
        return PixelSpec(cfg.patch_size, cfg.normalize, cfg.norm_pix)
    size = extract_size(cfg)  # the same grid over the views rendered at this size
    return LearnedSpec(cfg.extractor, cfg.model, json.dumps(cfg.model_kwargs or {}, sort_keys=True), cfg.weights,
                       cfg.layer, cfg.normalize, cfg.resample or "input", cfg.dtype or "auto", cfg.device or "auto",
                       size, size // cfg.grid)


def extract_size(cfg: JobConfig) -> int:
    """Pixels per side of the views the extractor sees: ``tokenizer_image_size`` (learned extractors only), else
    the training view's ``image_size``."""
    return cfg.tokenizer_image_size or cfg.image_size


def view_spec(cfg: JobConfig) -> ViewSpec:
    """The views of each image the job tokenizes."""
    return ViewSpec(cfg.views, cfg.view_scale, cfg.view_ratio, cfg.view_flip, cfg.seed)


def decode_spec(cfg: JobConfig) -> DecodeSpec:
    """How both stages read an input shard and decode its images to views."""
    preprocess = Preprocess(cfg.image_size, cfg.min_image_size, cfg.max_image_pixels, cfg.render)
    return DecodeSpec(source_spec(cfg), preprocess, cfg.decode_threads, view_spec(cfg), extract_size(cfg))


def fit_spec(cfg: JobConfig) -> FitSpec:
    """The k-means fit of the job's resolved settings ``cfg``."""
    return FitSpec(cfg.k, cfg.kmeans_epochs, cfg.kmeans_batch_size, cfg.seed, cfg.assign, cfg.fit_exact, cfg.runner,
                   cfg.device, cfg.kmeans_workers, cfg.ray_address)


def fit_sample(cfg: JobConfig, shards: list[InputShard]) -> FitSample:
    """The fit sample of the job's resolved settings ``cfg``: ``fit_images`` images' features from shards spread
    evenly over the input (at least 64 images from each shard sampled), at most ``fit_patches`` points."""
    per_shard = max(64, math.ceil(cfg.fit_images / len(shards)))
    n_fit = min(len(shards), math.ceil(cfg.fit_images / per_shard))
    chosen = sorted({int(round(i)) for i in np.linspace(0, len(shards) - 1, n_fit)})
    patches_per_image = max(1, min(cfg.views * cfg.grid**2, math.ceil(cfg.fit_patches / cfg.fit_images)))
    sampler = FitSampleStage(decode_spec(cfg), extractor_spec(cfg), cfg.batch_size, cfg.seed, per_shard,
                             patches_per_image)
    cache = str(Path(cfg.feature_cache).resolve()) if cfg.feature_cache else None
    return FitSample(tuple(shards[i] for i in chosen), sampler, cfg.fit_patches, cfg.seed, cache)


def tokenize_stage(cfg: JobConfig, codebook: str, out: str) -> TokenizeStage:
    """The tokenize stage of the job's resolved settings ``cfg``, reading the codebook at ``codebook`` and
    writing shards to ``out`` (paths or URLs on the output's filesystem)."""
    return TokenizeStage(decode_spec(cfg), extractor_spec(cfg), cfg.batch_size, cfg.assign, codebook,
                         OutputSpec(out, cfg.storage_options, cfg.staging))
