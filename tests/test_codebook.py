"""The codebook file: the same codebook always gives the same bytes, and loads back checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from kmim.datasets.codebook import Codebook, load_codebook, save_codebook

_SAVE = """
import sys, torch
from kmim.datasets.codebook import Codebook, save_codebook
save_codebook(sys.argv[1], Codebook(torch.arange(12, dtype=torch.float32).reshape(4, 3), {"k": 4, "seed": 0}))
"""


def test_same_codebook_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors orders header metadata by a per-process hash seed; save_codebook pins the order."""
    paths = [tmp_path / f"c{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", _SAVE, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    book = load_codebook(paths[0])
    assert book.metadata == {"k": 4, "seed": 0} and book.k == 4
    save_codebook(tmp_path / "here.safetensors", Codebook(book.centroids, book.metadata))
    assert (tmp_path / "here.safetensors").read_bytes() == paths[0].read_bytes()
    assert torch.equal(load_codebook(tmp_path / "here.safetensors").centroids, book.centroids)
