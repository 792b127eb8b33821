"""Canaries for the third-party private APIs kmim relies on, one adapter each.

Each test exercises a private API the way its adapter uses it. When a library release renames, moves or
reshapes one, the test fails with one line naming the library version, the private API and the adapter to
change, instead of a traceback deep in a job. (fsspec's private helpers have their own canaries in
``tests/test_adapters.py``.)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

import pytest
import torch

from kmim.pipeline.runners import LOOPBACK
from kmim.tokenizers import clip, dino


@contextmanager
def private_api(dist: str, api: str, adapter: str) -> Iterator[None]:
    """Turn any error inside into a failure naming ``dist``'s installed version, ``api`` and ``adapter``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported as the canary's verdict
        pytest.fail(f"{dist} {version(dist)} changed its private {api} ({type(e).__name__}: {e}); adapt {adapter}, "
                    "the one place kmim uses it", pytrace=False)


def test_open_clip_builds_an_image_tower_alone() -> None:
    with private_api("open_clip_torch", "open_clip.model._build_vision_tower",
                     "kmim.tokenizers.clip.build_vision_tower"):
        vit = clip.build_vision_tower(32, {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                                           "image_size": 32}, quick_gelu=False)
        assert type(vit).__name__ == "VisionTransformer", type(vit)
        assert len(vit.transformer.resblocks) == 2 and vit.patch_size[0] == 16 and vit.conv1.out_channels == 64
        out = vit.forward_intermediates(torch.zeros(1, 3, 32, 32), indices=[1], intermediates_only=True,
                                        output_fmt="NCHW")["image_intermediates"][0]
        assert out.shape == (1, 64, 2, 2), out.shape
        resnet = clip.build_vision_tower(32, {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64},
                                         quick_gelu=False)
        assert type(resnet).__name__ == "ModifiedResNet", type(resnet)
        assert all(hasattr(resnet, a) for a in ("layer1", "layer4", "bn3", "attnpool", "forward_intermediates"))


def test_timm_checkpoint_filter_resamples_position_embeddings() -> None:
    import timm

    with private_api("timm", "module-level checkpoint_filter_fn", "kmim.tokenizers.dino.checkpoint_filter"):
        net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1, embed_dim=64,
                                num_heads=2, img_size=32)
        convert = dino.checkpoint_filter(net)
        assert convert is not None, f"{type(net).__module__} has no checkpoint_filter_fn"
        sd = net.state_dict()
        sd["pos_embed"] = torch.zeros(1, 1 + 4 * 4, 64)  # class token + a 4 x 4 grid; the model's is 2 x 2
        assert convert(sd, net)["pos_embed"].shape == net.pos_embed.shape


def test_ray_init_takes_node_ip_address() -> None:
    import ray

    with private_api("ray", "ray.init keyword _node_ip_address", "kmim.pipeline.runners.init_ray_on_loopback"):
        assert "_node_ip_address" in inspect.getsource(ray.init), "ray.init no longer reads it"


def test_embedded_ray_listens_on_loopback_only(ray_local) -> None:
    """``ray_local`` starts its cluster through the adapter."""
    with private_api("ray", "ray.init keyword _node_ip_address", "kmim.pipeline.runners.init_ray_on_loopback"):
        addresses = {node["NodeManagerAddress"] for node in ray_local.nodes()}
        assert addresses == {LOOPBACK}, f"the node listens on {addresses}"


def test_ray_auth_token_state_can_be_reset() -> None:
    with private_api("ray", "ray._private.authentication_test_utils.reset_auth_token_state",
                     "tests/conftest.py reset_ray_auth"):
        from ray._private.authentication_test_utils import reset_auth_token_state

        assert not inspect.signature(reset_auth_token_state).parameters, inspect.signature(reset_auth_token_state)


def test_python_exposes_the_exit_steps_the_cli_runs() -> None:
    """kmim.__main__._exit runs what interpreter shutdown runs first, then ends the process without the teardown."""
    import atexit
    import platform
    import threading

    for owner, name in ((threading, "_shutdown"), (atexit, "_run_exitfuncs")):
        if not callable(getattr(owner, name, None)):
            pytest.fail(f"Python {platform.python_version()} has no {owner.__name__}.{name}; adapt kmim.__main__._exit",
                        pytrace=False)
