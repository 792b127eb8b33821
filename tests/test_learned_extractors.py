"""K-MIM DINO and k-CLIP extractors on tiny randomly initialized models of each family.

The tiny models go through the same code path as real ones: a library model name plus ``model_kwargs``
architecture overrides, weights saved to a file and loaded from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder
from safetensors.torch import save_file
from typer.testing import CliRunner

from kmim.cli import app
from kmim.config import ConfigError, load_config
from kmim.datasets.codebook import load_codebook
from kmim.pipeline.checks import check_extractor
from kmim.pipeline.specs import extractor_spec
from kmim.tokenizers import clip, dino, weights
from kmim.tokenizers.extractors import build_extractor
from kmim.tokenizers.weights import file_sha256

VIT16 = ("dino", "vit_small_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2})
DINOV2_REG = ("dino", "vit_small_patch14_reg4_dinov2", {"depth": 2, "embed_dim": 64, "num_heads": 2})
CLIP_VIT = ("clip", "ViT-B-16", {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 64, "head_width": 32,
                                                                 "image_size": 64}})
CLIP_RN = ("clip", "RN50", {"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64}})
FAMILIES = {"dino": dino, "clip": clip}


def save_tiny(path: Path, spec: tuple, seed: int = 0, wrap=lambda sd: sd) -> Path:
    """Random weights of a tiny model, built as the extractor builds it, saved to ``path``."""
    extractor, model, kwargs = spec
    torch.manual_seed(seed)
    sd = FAMILIES[extractor].build(model, kwargs, None, None, None).module.state_dict()
    sd = wrap({k: v.contiguous() for k, v in sd.items()})
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def config(spec: tuple, weights_arg: Path | str | None, **kw):
    extractor, model, kwargs = spec
    return load_config(None, {"out": "unused", "extractor": extractor, "model": model,
                              "model_kwargs": json.dumps(kwargs), "weights": weights_arg and str(weights_arg), **kw})


def extractor_of(spec: tuple, weights_arg: Path | str | None, **kw):
    """The extractor the job settings of :func:`config` ask for."""
    return build_extractor(extractor_spec(config(spec, weights_arg, **kw)))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("model,size,patch", [("vit_small_patch16_224", 64, 16),
                                              ("vit_small_patch14_reg4_dinov2", 56, 14)])
def test_dino_tokens_match_timm_forward_features(tmp_path: Path, model: str, size: int, patch: int) -> None:
    import timm

    kwargs = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": size}
    ref = timm.create_model(model, pretrained=False, num_classes=0, **kwargs).eval()
    # A DINO training checkpoint: teacher weights behind DDP's and MultiCropWrapper's prefixes, plus a head.
    ckpt = {"teacher": {**{f"module.backbone.{k}": v for k, v in ref.state_dict().items()},
                        "module.head.last_layer.weight": torch.zeros(8, 64)}}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    ex = extractor_of(("dino", model, kwargs), tmp_path / "checkpoint.pth", image_size=size, patch_size=patch)
    x = images(2, size)
    with torch.inference_mode():
        feats = ex(x)
        norm = (x.float() / 255 - torch.tensor(ex.backbone.mean).view(1, 3, 1, 1)) / torch.tensor(
            ex.backbone.std).view(1, 3, 1, 1)
        tokens = ref.forward_features(norm)[:, ref.num_prefix_tokens:]
    g = size // patch
    assert ref.num_prefix_tokens == (5 if "reg4" in model else 1)
    assert feats.shape == (2, g, g, 64)
    torch.testing.assert_close(feats, tokens.reshape(2, g, g, 64), rtol=1e-4, atol=1e-4)
    meta = ex.metadata()
    assert meta["layer"] == 1 and meta["layer_name"] == "blocks.1+norm"
    assert meta["weights_digest"] == file_sha256(tmp_path / "checkpoint.pth")


@pytest.mark.parametrize("spec", [VIT16, DINOV2_REG, CLIP_VIT, CLIP_RN], ids=["vit16", "dinov2_reg", "clip_vit",
                                                                              "clip_rn"])
def test_token_grid_follows_image_regions(tmp_path: Path, spec: tuple) -> None:
    """Changing the pixels of trainer patch (i, j) changes token (i, j) most, for every (i, j) tried."""
    path = save_tiny(tmp_path / "w.safetensors", spec)
    ex = extractor_of(spec, path, image_size=64, patch_size=16)
    assert ex.metadata()["model_grid"] == [4, 4] and ex.metadata()["feature_resample"] == "none"
    base = images(1, 64)
    with torch.inference_mode():
        ref = ex(base)
        for i, j in [(0, 0), (1, 2), (3, 1)]:
            x = base.clone()
            x[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] = 255 - x[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            change = (ex(x) - ref).norm(dim=-1)[0]
            assert divmod(int(change.argmax()), 4) == (i, j), change


def test_feature_map_resampling_to_the_patch_grid(tmp_path: Path) -> None:
    """bilinear / area run the model at its own size and resample its feature map to the trainer's grid."""
    path = save_tiny(tmp_path / "w.pth", CLIP_VIT)
    x = images(2, 64)
    native = extractor_of(CLIP_VIT, path, image_size=64, patch_size=16)  # model grid 4 = trainer grid
    up = extractor_of(CLIP_VIT, path, image_size=64, patch_size=8, resample="bilinear")
    down = extractor_of(CLIP_VIT, path, image_size=64, patch_size=32, resample="area")
    refit = extractor_of(CLIP_VIT, path, image_size=64, patch_size=8)  # input resized to 128 px
    with torch.inference_mode():
        f4 = native(x).permute(0, 3, 1, 2)
        torch.testing.assert_close(up(x), F.interpolate(f4, size=(8, 8), mode="bilinear").permute(0, 2, 3, 1))
        torch.testing.assert_close(down(x), F.avg_pool2d(f4, 2).permute(0, 2, 3, 1))
        assert refit(x).shape == (2, 8, 8, 64)
    assert up.metadata()["model_grid"] == [4, 4] and up.metadata()["feature_resample"] == "bilinear"
    assert down.metadata()["feature_resample"] == "area" and down.metadata()["input_resize"] == "none"
    assert refit.metadata()["input_size"] == 128 and refit.metadata()["input_resize"] == "bicubic_antialias"
    assert refit.metadata()["feature_resample"] == "none"


def test_l2_features_are_unit_and_use_inner_product(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "w.safetensors", CLIP_RN)
    ex = extractor_of(CLIP_RN, path, image_size=64, patch_size=16, normalize="l2", layer=3)
    with torch.inference_mode():
        feats = ex(images(2, 64))
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 4, 4))
    assert ex.metric == "ip" and ex.metadata()["normalize"] == "l2"
    assert ex.metadata()["layer_name"] == "layer3" and ex.metadata()["model_stride"] == 16
    with pytest.raises(ConfigError, match="field 'normalize'"):
        load_config(None, {"out": "x", "normalize": "l2"})
    with pytest.raises(ConfigError, match="field 'normalize'"):
        config(CLIP_RN, path, normalize="imagenet")


def test_bf16_autocast_path_runs_on_cpu(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "w.safetensors", VIT16)
    fp32 = extractor_of(VIT16, path, image_size=32, patch_size=8)
    bf16 = extractor_of(VIT16, path, image_size=32, patch_size=8, dtype="bf16")
    assert fp32.metadata()["dtype"] == "fp32" and bf16.metadata()["dtype"] == "bf16"
    with torch.inference_mode():
        a, b = fp32(images(2, 32)), bf16(images(2, 32))
    assert b.dtype == torch.float32 and F.cosine_similarity(a, b, dim=-1).min() > 0.98


def test_extractor_is_built_once_per_process(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "w.safetensors", VIT16)
    a = extractor_of(VIT16, path, image_size=32, patch_size=8)
    assert extractor_of(VIT16, path, image_size=32, patch_size=8) is a
    assert extractor_of(VIT16, path, image_size=32, patch_size=8, layer=0) is not a


def test_bad_settings_name_the_field(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "w.safetensors", VIT16)
    cases = [({"layer": 2}, "field 'layer'.*out of range"), ({"model": None}, "field 'model'.*required"),
             ({"model": "resnet50"}, "field 'model'.*not a Vision Transformer"),
             ({"model_kwargs": '{"depth": 2, "nope": 1}'}, "field 'model_kwargs'.*nope"),
             ({"model_kwargs": "{depth"}, "field 'model_kwargs'.*JSON"), ({"device": "gpu"}, "field 'device'")]
    base = {"out": "x", "extractor": "dino", "model": VIT16[1], "model_kwargs": json.dumps(VIT16[2]),
            "weights": str(path)}
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_extractor(load_config(None, {**base, **change}))
    with pytest.raises(ConfigError, match="field 'weights': .*only used by the dino and clip"):
        load_config(None, {"out": "x", "weights": str(path)})


def test_missing_weights_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "vits16.safetensors"
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--extractor", "dino", "--model",
                                      "vit_small_patch16_224.dino", "--weights", str(missing), "--runner", "local"])
    assert result.exit_code == 2 and not out.exists()
    text = " ".join(result.output.split())
    assert "field 'weights'" in text and "vit_small_patch16_224.dino" in text and str(missing) in text
    assert "--weights PATH" in text
    empty = tmp_path / "cache"
    empty.mkdir()
    monkeypatch.setattr(weights, "default_cache_roots", lambda: [empty])
    for weights_arg in [str(empty), None]:
        with pytest.raises(ConfigError) as err:
            check_extractor(load_config(None, {"out": "x", "extractor": "dino", "model": "vit_small_patch16_224.dino",
                                               "weights": weights_arg}))
        assert "timm/vit_small_patch16_224.dino/model.safetensors" in str(err.value) and str(empty) in str(err.value)
    with pytest.raises(ConfigError, match="field 'weights'.*RN50.*tags of this model: openai"):
        check_extractor(load_config(None, {"out": "x", "extractor": "clip", "model": "RN50", "weights": "openai"}))


def _hf_cache_file(root: Path, repo: str, filename: str) -> Path:
    revision = "0" * 40
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    (repo_dir / "snapshots" / revision).mkdir(parents=True)
    return repo_dir / "snapshots" / revision / filename


def test_weights_found_in_local_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    timm_file = save_tiny(_hf_cache_file(hub, "timm/vit_small_patch16_224.dino", "model.safetensors"), VIT16)
    spec = ("dino", "vit_small_patch16_224.dino", VIT16[2])
    meta = extractor_of(spec, hub, image_size=32, patch_size=8).metadata()
    assert meta["weights_digest"] == file_sha256(timm_file)
    assert meta["input_norm"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the dino tag's, not augreg's
    clip_file = _hf_cache_file(hub, "timm/resnet50_clip.openai", "open_clip_model.safetensors")
    save_tiny(clip_file, CLIP_RN, wrap=lambda sd: {f"visual.{k}": v for k, v in sd.items()})
    monkeypatch.setattr(weights, "default_cache_roots", lambda: [hub])
    cfg = config(CLIP_RN, "openai", image_size=64, patch_size=32)
    meta = build_extractor(extractor_spec(cfg)).metadata()
    assert meta["pretrained_tag"] == "openai" and meta["arch"]["quick_gelu"] is True
    assert meta["weights_digest"] == file_sha256(clip_file)
    assert config(CLIP_RN, None, image_size=64, patch_size=32).weights is None  # the one cached tag is found


def _run(out: Path, inputs: Path, spec: tuple, path: Path, *extra: str) -> dict:
    extractor, model, kwargs = spec
    args = ["run", "--input", str(inputs), "--out", str(out), "--extractor", extractor, "--model", model,
            "--model-kwargs", json.dumps(kwargs), "--weights", str(path), "--image-size", "32", "--patch-size", "8",
            "--k", "6", "--kmeans-epochs", "2", "--kmeans-batch-size", "256", "--fit-patches", "384",
            "--shard-size", "12", "--batch-size", "8", "--runner", "local", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    verified = CliRunner().invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("spec,extra", [(VIT16, ()), (CLIP_VIT, ("--layer", "0")),
                                        (CLIP_RN, ("--normalize", "l2"))], ids=["dino", "clip_vit", "clip_rn_l2"])
def test_run_end_to_end_then_verify(tmp_path: Path, spec: tuple, extra: tuple) -> None:
    inputs = make_image_folder(tmp_path / "images", per_class=8)
    path = save_tiny(tmp_path / "w.safetensors", spec)
    manifest = _run(tmp_path / "out", inputs, spec, path, *extra)
    assert manifest["samples"] == 24 and manifest["token_grid"]["shape"] == [4, 4]
    meta = manifest["codebook"]["metadata"]
    assert meta["extractor"] == spec[0] and meta["model"] == spec[1] and meta["grid"] == [4, 4]
    assert meta["weights_digest"] == file_sha256(path)
    if "l2" in extra:
        book = load_codebook(tmp_path / "out" / "codebook.safetensors")
        assert meta["metric"] == "ip"
        torch.testing.assert_close(book.centroids.norm(dim=1), torch.ones(book.k))


def test_same_seed_same_codebook_other_weights_other_id(tmp_path: Path) -> None:
    inputs = make_image_folder(tmp_path / "images", per_class=8)
    path = save_tiny(tmp_path / "w.safetensors", VIT16)
    first = _run(tmp_path / "a", inputs, VIT16, path)["tokenizer_id"]
    assert _run(tmp_path / "b", inputs, VIT16, path)["tokenizer_id"] == first
    other = save_tiny(tmp_path / "other.safetensors", VIT16, seed=1)
    assert _run(tmp_path / "c", inputs, VIT16, other)["tokenizer_id"] != first
