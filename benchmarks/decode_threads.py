"""Decoding images on the calling thread vs a 2-thread pool, by image size and format.

For each size in SIZES (px, the shorter side; aspect 4:3), scikit-image's ``astronaut`` photograph is resized
(Pillow Lanczos) and encoded as JPEG (quality 90) and as PNG; 400 copies are then decoded with kmim's
``decode_views(data, Preprocess(out), ViewSpec(), key, out)`` (out = min(size, 224): one center view), serially on
the calling thread and with ``ThreadPoolExecutor(2).map``. Best of ``--rounds`` (serial and threaded alternate).

Prints per size and format: the encoded bytes, serial microseconds per image, and the speed-up of 2 threads over
1 (serial seconds / threaded seconds; < 1: the threads are slower), then kmim's ``INLINE_BYTES`` (images stored in
fewer bytes are decoded on the consuming thread, ``kmim/pipeline/decoding.py``), the machine line and the load
average.

    .venv/bin/python benchmarks/decode_threads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

from common import emit, machine
from PIL import Image
from skimage import data as photos

from kmim.datasets.preprocess import Preprocess, ViewSpec, decode_views
from kmim.pipeline.decoding import INLINE_BYTES

SIZES = (32, 64, 96, 160, 256, 375)
FORMATS = {"jpeg": {"format": "JPEG", "quality": 90}, "png": {"format": "PNG"}}
COPIES = 400
KEY = "0123456789abcdef"


def encoded(size: int, fmt: str) -> bytes:
    """The astronaut photograph at ``size`` px on the shorter side (4:3 landscape), encoded as ``fmt``."""
    buf = io.BytesIO()
    img = Image.fromarray(photos.astronaut()).resize((round(size * 4 / 3), size), Image.Resampling.LANCZOS)
    img.save(buf, **FORMATS[fmt])
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    views = ViewSpec()
    summary = {}
    with ThreadPoolExecutor(2) as pool:
        for size in SIZES:
            out = min(size, 224)
            pre = Preprocess(out)

            def decode(data: bytes, pre: Preprocess = pre, out: int = out):
                return decode_views(data, pre, views, KEY, out)

            for fmt in FORMATS:
                data = encoded(size, fmt)
                images = [data] * COPIES
                list(pool.map(decode, images[:20]))  # warm-up (threads, decoders)
                serial = threaded = float("inf")
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    for image in images:
                        decode(image)
                    serial = min(serial, time.perf_counter() - t)
                    t = time.perf_counter()
                    list(pool.map(decode, images))
                    threaded = min(threaded, time.perf_counter() - t)
                speedup = round(serial / threaded, 2)
                emit(bench="decode_threads", size=size, out=out, format=fmt, bytes=len(data),
                     inline=len(data) < INLINE_BYTES, serial_us_per_image=round(serial / COPIES * 1e6, 1),
                     threaded_us_per_image=round(threaded / COPIES * 1e6, 1), speedup_2_threads=speedup)
                summary[f"{fmt}_{size}_speedup_2_threads"] = speedup
    emit(bench="decode_threads", summary=True, inline_bytes=INLINE_BYTES, copies=COPIES, rounds=args.rounds,
         **summary, machine=machine(), load_average=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
