"""K-MIM DINO backbones: timm Vision Transformers (DINO ViT-S/16, B/16; DINOv2 S/14, B/14 with registers; ...).

The features are the patch tokens of one block, after the model's final norm (as DINOv2's
``get_intermediate_layers(norm=True)``), with the class and register tokens dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kmim.tokenizers.learned import Backbone, resolve_layer
from kmim.tokenizers.weights import Candidate, find_weights, load_into, read_state_dict


def check_name(model: str) -> None:
    import timm

    if not timm.is_model(model):
        raise ValueError(f"unknown timm model '{model}' (names as timm.list_models() spells them, "
                         "e.g. vit_small_patch16_224.dino, vit_base_patch14_reg4_dinov2.lvd142m)")


def build(model: str, kwargs: dict, tag: str | None, layer: int | None, img_size: int | None) -> Backbone:
    """Randomly initialized model cut at block ``layer`` (default: the last), on torch's default device.

    ``img_size`` None keeps the model's own input size; otherwise the position embedding grid is sized for it.
    """
    import timm
    from timm.data import resolve_model_data_config

    size = {} if img_size is None else {"img_size": img_size}
    net = timm.create_model(model, pretrained=False, **{"num_classes": 0, **kwargs, **size})
    if not (hasattr(net, "blocks") and hasattr(net, "patch_embed") and hasattr(net, "forward_intermediates")):
        raise ValueError(f"timm model '{model}' is not a Vision Transformer with patch tokens")
    depth = len(net.blocks)
    index = resolve_layer(layer, depth, depth - 1, model, "blocks")
    ph, pw = net.patch_embed.patch_size
    ih, iw = net.patch_embed.img_size
    if ph != pw or ih != iw:
        raise ValueError(f"timm model '{model}': only square patches and inputs are supported")
    data = resolve_model_data_config(net)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return net.forward_intermediates(x, indices=[index], norm=True, stop_early=True, output_fmt="NCHW",
                                         intermediates_only=True)[0]

    arch = {"library": "timm", "class": type(net).__name__, "depth": depth, "embed_dim": net.embed_dim,
            "patch_size": ph, "prefix_tokens": net.num_prefix_tokens}
    return Backbone(module=net, forward=forward, stride=ph, native_size=ih, dim=net.embed_dim, layer=index,
                    layer_name=f"blocks.{index}+norm", mean=tuple(data["mean"]), std=tuple(data["std"]), arch=arch)


def resolve(model: str, weights: str | None) -> tuple[Path, str | None]:
    """(weights file, pretrained tag): the tag is part of a timm model name, so always None here."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    cands = []
    if cfg is not None:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        url_file = cfg.url.rsplit("/", 1)[-1] if cfg.url and not cfg.custom_load else None
        cands.append(Candidate(cfg.hf_hub_id, files, url_file))
    hint = f", e.g. after `hf download {cfg.hf_hub_id}` on a connected machine" if cfg and cfg.hf_hub_id else ""
    return find_weights(model, cands, weights, hint), None


def checkpoint_filter(net: torch.nn.Module) -> Callable[[dict, torch.nn.Module], dict] | None:
    """timm's checkpoint converter for ``net``'s architecture, or None when its model file has none:
    ``filter(state_dict, net)`` maps DINO / DINOv2 / original-format keys to timm's and resamples the position
    embedding to ``net``'s grid.

    Adapter around a private timm convention: each model file (``timm.models.vision_transformer``...) defines a
    module-level ``checkpoint_filter_fn``, which timm hands to its own pretrained loader; timm has no public way
    to look it up for a model. This is the one place that finds it; ``tests/test_private_apis.py`` fails when
    timm renames it or stops converting.
    """
    return getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)


def load(backbone: Backbone, path: Path, model: str) -> None:
    """Load a timm-, DINO- or DINOv2-format checkpoint, resampling the position embedding to the model's grid."""
    net = backbone.module
    sd = read_state_dict(path)
    filter_fn = checkpoint_filter(net)
    if filter_fn is not None:
        sd = filter_fn(sd, net)
    load_into(net, sd, path, model)
