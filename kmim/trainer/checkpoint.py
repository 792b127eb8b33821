"""Training checkpoints: safetensors weights plus a resumable state file, committed by a pointer file.

Layout under ``RUN_DIR/checkpoints/``:

- ``step_<N>.safetensors``: the objective's ``state_dict()`` (encoder, decoder / head), metadata ``step``;
- ``step_<N>.state.pt``: ``torch.save`` of tensors and primitive containers only (``format``, ``step``,
  ``optimizer``, ``loader``, ``rng`` (one entry per rank), ``weights_sha256``, ``tokenizer_id``), so it
  loads with ``torch.load(weights_only=True)``;
- ``latest.json``: ``{"step", "weights", "state"}``, written last: the commit. Older step files are deleted
  after it.

Every file is written to a hidden temporary name and renamed, so a crash never leaves a partial checkpoint
visible; the state records the sha256 of its weights file, so a mismatched pair is refused.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kmim.files import TMP_GLOB, atomic_write, sha256_file

STATE_FORMAT = "kmim-train-state/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
_NAME = re.compile(r"^step_[0-9]+\.(safetensors|state\.pt)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    weights: Path
    state: Path


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss"]))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: dict) -> Checkpoint:
    """Write ``model``'s weights and ``state`` (plus format, step and the weights' sha256) for ``step``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_GLOB):  # left by a crash; only one process writes checkpoints
        stale.unlink(missing_ok=True)
    ckpt = Checkpoint(step, root / f"step_{step:08d}.safetensors", root / f"step_{step:08d}.state.pt")
    tensors = _weights(model)
    atomic_write(ckpt.weights, lambda p: save_file(tensors, p, metadata={"step": str(step)}))
    full = {**state, "format": STATE_FORMAT, "step": step, "weights_sha256": sha256_file(ckpt.weights)[0]}
    atomic_write(ckpt.state, lambda p: torch.save(full, p))
    pointer = {"step": step, "weights": ckpt.weights.name, "state": ckpt.state.name}
    atomic_write(root / LATEST, lambda p: p.write_text(json.dumps(pointer) + "\n"))
    for old in root.glob("step_*"):
        if old not in (ckpt.weights, ckpt.state):
            old.unlink(missing_ok=True)
    return ckpt


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The committed checkpoint of a run directory, or None when it has none yet."""
    root = Path(run_dir) / CHECKPOINTS
    try:
        pointer = json.loads((root / LATEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CheckpointError(f"{root / LATEST}: not valid JSON ({e})") from None
    if not (isinstance(pointer, dict) and isinstance(pointer.get("step"), int)
            and all(isinstance(pointer.get(f), str) and _NAME.match(pointer[f]) for f in ("weights", "state"))):
        raise CheckpointError(f"{root / LATEST}: malformed pointer {pointer!r}")
    return Checkpoint(pointer["step"], root / pointer["weights"], root / pointer["state"])


def load_weights(model: nn.Module, ckpt: Checkpoint, prefix: str = "") -> None:
    """Load the checkpoint's weights into ``model`` (strict: every key, every shape); with ``prefix``, only the
    tensors under it, the prefix stripped (``"encoder."``: a pre-trained encoder without its decoder and heads)."""
    try:
        tensors = load_file(ckpt.weights)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt.weights}: missing") from None
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.weights}: does not fit the configured model: {e}") from None


def load_state(ckpt: Checkpoint) -> dict:
    """The resumable state of ``ckpt``, checked against its weights file."""
    try:
        state = torch.load(ckpt.state, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt.state}: missing") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("step") != ckpt.step:
        raise CheckpointError(f"{ckpt.state}: not a {STATE_FORMAT} file for step {ckpt.step}")
    if sha256_file(ckpt.weights)[0] != state["weights_sha256"]:
        raise CheckpointError(f"{ckpt.weights}: sha256 does not match the one {ckpt.state.name} recorded")
    return state
