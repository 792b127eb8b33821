"""Decode + render per core: the center view at 224 px of real photographs stored as JPEG, before and after issue 14.

scikit-image's sample photographs (coffee, astronaut, chelsea, rocket) are resampled (Lanczos) to two sizes and
encoded as JPEG quality 90 (4:2:0): ``typical``, ImageNet-sized (500 x 375, one of them 375 x 500), and ``large``,
upscaled to 1,500 px on the shorter side. Paths, each from the JPEG bytes in memory to the uint8 [224, 224, 3] view:

- ``baseline``: the path as it was, re-implemented here: Pillow open + load, EXIF transpose, RGB, resize of the whole
  image (shorter side to 224, bicubic), center crop (checked equal to ``full``);
- ``full``: ``decode_view`` with the full render method (``--render full``; must not be slower than the baseline);
- ``scaled``: ``decode_view`` with the scaled render method (the default since issue 14; JPEG decoded at DCT
  scale M/8 where the view allows, then resampled to 224 px: bilinearly by OpenCV where the box shrinks by at most
  5/4, as for ``typical``, else by Pillow's antialiased bicubic, as for ``large``).

Single thread (torch at 1 thread, OpenCV at 1 as kmim sets it; Pillow and libjpeg-turbo use one). Rounds alternate
the paths; each path's best round counts. Prints images/s per path by CPU time of the thread (what one core does,
robust to other load) and by wall time, the ratios to the baseline, the machine line and the load average.

    .venv/bin/python benchmarks/decode_render.py [--rounds 7] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from common import emit, machine
from PIL import Image, ImageOps
from skimage import data as photos

from kmim.datasets.preprocess import FULL, SCALED, Preprocess, center_geometry, decode_view

SIZE = 224
PHOTOS = ("coffee", "astronaut", "chelsea", "rocket")
SETS = {"typical": [(500, 375), (500, 375), (375, 500), (500, 375)],
        "large": [(2000, 1500), (1500, 1500), (1500, 2250), (2248, 1500)]}


def jpegs(sizes: list[tuple[int, int]]) -> list[bytes]:
    """Each of PHOTOS resampled to its [width, height] in ``sizes`` (px), as JPEG bytes."""
    out = []
    for name, size in zip(PHOTOS, sizes, strict=True):
        buf = io.BytesIO()
        Image.fromarray(getattr(photos, name)()).resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def baseline(data: bytes) -> np.ndarray:
    """The center view as kmim rendered it before the scaled method: uint8 [SIZE, SIZE, 3]."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    img = img if img.mode == "RGB" else img.convert("RGB")
    g = center_geometry(*img.size, SIZE)
    return np.asarray(img.resize(tuple(g["resized"]), Image.Resampling.BICUBIC).crop(tuple(g["crop_box"])))


def paths() -> dict[str, Callable[[bytes], np.ndarray]]:
    full, scaled = Preprocess(SIZE, render=FULL), Preprocess(SIZE, render=SCALED)
    return {"baseline": baseline, "full": lambda b: decode_view(b, full).pixels,
            "scaled": lambda b: decode_view(b, scaled).pixels}


def timed(path: Callable[[bytes], np.ndarray], images: list[bytes], seconds: float) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) per image of ``path`` over ``images``, passes repeated for ``seconds``."""
    n, cpu0, wall0 = 0, time.thread_time(), time.perf_counter()
    while n == 0 or time.perf_counter() - wall0 < seconds:
        for data in images:
            path(data)
        n += len(images)
    return (time.thread_time() - cpu0) / n, (time.perf_counter() - wall0) / n


def measure(name: str, images: list[bytes], rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    """Images/s of each path on one image set (best round by CPU time, and by wall time)."""
    fns = paths()
    for data in images:
        assert np.array_equal(baseline(data), fns["full"](data)), "the baseline is not the full method's view"
    best = {p: [float("inf"), float("inf")] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            cpu, wall = timed(fn, images, seconds)
            best[p] = [min(best[p][0], cpu), min(best[p][1], wall)]
    rates = {p: {"cpu_images_s": 1 / c, "wall_images_s": 1 / w} for p, (c, w) in best.items()}
    for p, r in rates.items():
        emit(set=name, path=p, **{k: round(v, 1) for k, v in r.items()})
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per path per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    emit(machine=machine(), load_avg_start=[round(x, 2) for x in os.getloadavg()])
    summary = {}
    for name, sizes in SETS.items():
        rates = measure(name, jpegs(sizes), args.rounds, args.seconds)
        base = rates["baseline"]
        summary[name] = {f"{p}_x_{k.split('_')[0]}": round(r[k] / base[k], 2)
                         for p, r in rates.items() if p != "baseline" for k in r}
    emit(summary="decode + render per core vs the baseline (ratio of images/s)", **summary,
         load_avg_end=[round(x, 2) for x in os.getloadavg()])


if __name__ == "__main__":
    main()
