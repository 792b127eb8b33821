"""Offline model weights: find them in a file or a local cache, load them safely, digest them.

Nothing here downloads. A weights source is a ``.safetensors`` / ``.pth`` / ``.bin`` file, or a directory
holding a Hugging Face hub cache (``models--org--name/snapshots/...``), a torch hub / open_clip cache, or
the weight files themselves. Files load with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kmim.files import sha256_file

# Checkpoint wrappers, unwrapped in this order of preference (DINO checkpoints hold "teacher" and "student").
_WRAPPERS = ("state_dict", "model", "teacher", "module")
# Key prefixes added by DDP (module.) and by DINO's MultiCropWrapper (backbone.; its head is dropped).
_PREFIXES = ("module.", "backbone.")


class WeightsNotFound(ValueError):
    """No weights file for a model; the message says where it looked and how to provide one."""


@dataclass(frozen=True)
class Candidate:
    """Where a model's published weights would lie: a Hugging Face repo's files and a download URL's file name."""

    hf_repo: str | None
    hf_files: tuple[str, ...]
    url_file: str | None


def default_cache_roots() -> list[Path]:
    """Local caches searched when no ``weights`` is given: Hugging Face hub, torch hub, open_clip."""
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE), Path(torch.hub.get_dir()) / "checkpoints",
            Path("~/.cache/clip").expanduser()]


def _in_root(root: Path, cands: list[Candidate]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for c in cands:
        if c.hf_repo:
            for name in c.hf_files:
                hit = try_to_load_from_cache(c.hf_repo, name, cache_dir=root)
                if isinstance(hit, str):
                    return Path(hit)
        names = [*c.hf_files, *([c.url_file] if c.url_file else [])]
        for sub in (root, root / "checkpoints"):
            for name in names:
                if (sub / name).is_file():
                    return sub / name
    return None


def find_weights(model: str, cands: list[Candidate], weights: str | None, hint: str) -> Path:
    """The weights file for ``model``: ``weights`` itself if a file, else searched in ``weights`` (a directory)
    or, when None, in :func:`default_cache_roots`. Raises :class:`WeightsNotFound` naming every place tried."""
    how = (" Provide them with --weights PATH (a .safetensors/.pth file, or a directory holding a timm, open_clip "
           f"or Hugging Face cache){hint}")
    if weights is not None:
        if Path(weights).expanduser().is_file():
            return Path(weights).expanduser()
        if not Path(weights).expanduser().exists():
            raise WeightsNotFound(f"no weights for model '{model}': {weights} does not exist.{how}")
    roots = [Path(weights).expanduser()] if weights is not None else default_cache_roots()
    for root in roots:
        if root.is_dir() and (hit := _in_root(root, cands)) is not None:
            return hit
    wanted = sorted({f"{c.hf_repo}/{n}" for c in cands if c.hf_repo for n in c.hf_files}
                    | {c.url_file for c in cands if c.url_file})
    where = ", ".join(str(r) for r in roots)
    what = f"looked for {', '.join(wanted)} in {where}" if wanted else f"looked in {where}"
    raise WeightsNotFound(f"no weights for model '{model}': {what} (nothing is downloaded).{how}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, with common wrappers and prefixes removed. Never unpickles arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Mapping = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as e:
            if "TorchScript" in str(e):
                raise ValueError(f"{path}: TorchScript archives (e.g. OpenAI's original CLIP .pt) are not loaded; "
                                 "use the Hugging Face copy (open_clip_model.safetensors) or save its state_dict()"
                                 ) from None
            raise ValueError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
    for key in _WRAPPERS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, model: str) -> None:
    """Load ``sd`` into ``module``; every parameter and buffer of the module must be present."""
    try:
        missing, _ = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not fit model '{model}': {e}; check --model and --model-kwargs") from None
    if missing:
        raise ValueError(f"{path} does not fit model '{model}': {len(missing)} of its tensors are missing "
                         f"(e.g. {', '.join(missing[:3])}); check --model and --model-kwargs")


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hex sha256 of ``path``; ``size`` (bytes) and ``mtime_ns`` only key the cache."""
    return sha256_file(path)[0]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a weights file (:func:`kmim.files.sha256_file`), computed once per process while the file
    is unchanged (same size and mtime)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
