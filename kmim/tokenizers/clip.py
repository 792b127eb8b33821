"""k-CLIP backbones: open_clip image towers (ViT-B/16, ViT-L/14, ...; ResNet RN50..RN50x64).

ViT: patch tokens of one residual block after ``ln_post`` (no projection), class token dropped.
ResNet: the feature map of one stage before the attention pool (layer 4 = ``layer4``; RN50x64 at
448 px gives 14 x 14 x 4096, as MaPeT's k-CLIP). Layer indices: 0 = stem, 1..4 = layer1..layer4.

``model_kwargs`` are deep-merged into the open_clip model config (``open_clip/model_configs/NAME.json``),
e.g. ``{"vision_cfg": {"layers": 2, "width": 64}}``. OpenAI weights given as a file need the
``-quickgelu`` model name (as in open_clip); a pretrained tag given as ``weights`` sets it itself.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from kmim.tokenizers.learned import Backbone, resolve_layer
from kmim.tokenizers.weights import Candidate, WeightsNotFound, find_weights, load_into, read_state_dict

_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_RESNET_STRIDES = (4, 4, 8, 16, 32)


def check_name(model: str) -> None:
    import open_clip

    if open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip model '{model}' (names as open_clip.list_models() spells them, "
                         "e.g. ViT-B-16, ViT-L-14, RN50x64)")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config(model: str, kwargs: dict, tag: str | None) -> tuple[dict, tuple, tuple]:
    """(model config, mean, std) as open_clip's factory would resolve them for ``model`` and ``tag``."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = open_clip.get_model_config(model)
    pre = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, **(cfg.get("preprocess_cfg") or {})}
    if tag is not None:
        pretrained = open_clip.get_pretrained_cfg(model, tag)
        pre.update({k: pretrained[k] for k in ("mean", "std") if k in pretrained})
        if pretrained.get("quick_gelu"):
            cfg["quick_gelu"] = True
    return _merge(cfg, kwargs), tuple(pre["mean"]), tuple(pre["std"])


def build_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool) -> torch.nn.Module:
    """open_clip's randomly initialized image tower (``VisionTransformer``, or ``ModifiedResNet`` when
    ``vision_cfg["layers"]`` is a list) for the ``vision_cfg`` of a model config, without the text tower.

    Adapter around a private open_clip API: ``open_clip.model._build_vision_tower``, the only builder of the image
    tower alone (``open_clip.create_model`` builds the whole CLIP). This is the one place that calls it;
    ``tests/test_private_apis.py`` fails when open_clip renames or reshapes it.
    """
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def build(model: str, kwargs: dict, tag: str | None, layer: int | None, img_size: int | None) -> Backbone:
    """Randomly initialized image tower cut at ``layer``, on torch's default device.

    ``img_size`` None keeps the config's input size; otherwise a ViT's position embedding grid is sized for it.
    """
    cfg, mean, std = _config(model, kwargs, tag)
    vision = dict(cfg["vision_cfg"])
    if vision.get("timm_model_name") or vision.get("attentional_pool"):
        raise ValueError(f"open_clip model '{model}': timm-tower and attention-pooled (CoCa) models are not supported")
    native = vision.get("image_size", 224)
    if isinstance(native, (list, tuple)):
        if native[0] != native[1]:
            raise ValueError(f"open_clip model '{model}': only square inputs are supported")
        native = native[0]
    if img_size is not None:
        vision["image_size"] = img_size
    tower = build_vision_tower(cfg["embed_dim"], vision, quick_gelu=cfg.get("quick_gelu", False))
    arch = {"library": "open_clip", "class": type(tower).__name__, "embed_dim": cfg["embed_dim"],
            "quick_gelu": bool(cfg.get("quick_gelu", False)), "vision_cfg": {**vision, "image_size": native}}
    if isinstance(vision.get("layers"), (list, tuple)):
        tower.attnpool = torch.nn.Identity()  # pooled features are never used; RN50x64's pool is 270 MB
        index = resolve_layer(layer, 5, 4, model, "stages (0 = stem, 1..4 = layer1..layer4)")
        stage = [tower, tower.layer1, tower.layer2, tower.layer3, tower.layer4][index]
        dim = tower.bn3.num_features if index == 0 else stage[-1].bn3.num_features

        def forward(x: torch.Tensor) -> torch.Tensor:
            return tower.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True
                                               )["image_intermediates"][0]

        return Backbone(module=tower, forward=forward, stride=_RESNET_STRIDES[index], native_size=native, dim=dim,
                        layer=index, layer_name="stem" if index == 0 else f"layer{index}", mean=mean, std=std,
                        arch=arch)
    depth = len(tower.transformer.resblocks)
    index = resolve_layer(layer, depth, depth - 1, model, "blocks")

    def forward(x: torch.Tensor) -> torch.Tensor:
        return tower.forward_intermediates(x, indices=[index], stop_early=True, normalize_intermediates=True,
                                           intermediates_only=True, output_fmt="NCHW")["image_intermediates"][0]

    patch = tower.patch_size[0]
    return Backbone(module=tower, forward=forward, stride=patch, native_size=native, dim=tower.conv1.out_channels,
                    layer=index, layer_name=f"transformer.resblocks.{index}+ln_post", mean=mean, std=std, arch=arch)


def _candidate(model: str, tag: str) -> Candidate:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    hub = cfg.get("hf_hub", "").strip("/").split("/")
    files = (hub[2],) if len(hub) > 2 else _HF_FILES
    url_file = cfg["url"].rsplit("/", 1)[-1] if cfg.get("url") else None
    return Candidate("/".join(hub[:2]) or None, files, url_file)


def resolve(model: str, weights: str | None) -> tuple[Path, str | None]:
    """(weights file, pretrained tag or None). ``weights`` is a file, a cache directory, an open_clip
    pretrained tag of ``model`` (looked up in the local caches only), or None (any cached tag, if exactly one)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if weights in tags:
        tags, weights = [weights], None
    elif weights is not None and Path(weights).expanduser().is_file():
        return Path(weights).expanduser(), None
    hits = {}
    for tag in tags:
        try:
            hits[tag] = find_weights(model, [_candidate(model, tag)], weights, "")
        except WeightsNotFound:
            continue
    if len(hits) > 1:
        raise WeightsNotFound(f"several pretrained weights of '{model}' are cached ({', '.join(hits)}): "
                              "choose one with --weights TAG or --weights PATH")
    if hits:
        tag, path = next(iter(hits.items()))
        return path, tag
    hint = f"; open_clip pretrained tags of this model: {', '.join(tags)}" if tags else ""
    return find_weights(model, [_candidate(model, t) for t in tags], weights, hint), None


def load(backbone: Backbone, path: Path, model: str) -> None:
    """Load a full open_clip / OpenAI CLIP state dict (``visual.*``) or an image-tower-only one."""
    tower = backbone.module
    sd = read_state_dict(path)
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("attnpool.")}
    if "positional_embedding" in sd and hasattr(tower, "grid_size"):
        from open_clip.model import resize_pos_embed

        wrapped = {"visual.positional_embedding": sd["positional_embedding"]}
        resize_pos_embed(wrapped, SimpleNamespace(visual=tower))
        sd["positional_embedding"] = wrapped["visual.positional_embedding"]
    load_into(tower, sd, path, model)
