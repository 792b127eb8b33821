"""Hostile inputs: one bad image never ends a job, every dataset kmim writes reads back, reads are bounded."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import struct
import tarfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import class_image, job_overrides, make_image_folder, png_bytes
from PIL import Image

from kmim.config import load_config
from kmim.datasets.loader import TokenDataset
from kmim.datasets.manifest import read_index, read_manifest
from kmim.datasets.preprocess import (
    BAD_LABEL,
    BOMB,
    IMAGE_EXTS,
    TOO_LARGE,
    UNDECODABLE,
    Preprocess,
    SkipImage,
    decode_view,
)
from kmim.datasets.shards import ShardError, ShardWriter, iter_tar
from kmim.datasets.verify import verify_dataset
from kmim.pipeline.job import run_job
from kmim.pipeline.sources import InputError, plan_inputs, read_shard
from kmim.pipeline.specs import source_spec

PRE = Preprocess(image_size=32, min_image_size=8, max_image_pixels=200_000)
RGB = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)


def config(out: Path, **kw):
    return load_config(None, job_overrides(out=str(out), **kw))


def run(out: Path, **kw) -> dict:
    return run_job(config(out, **kw))


def raw_samples(inp: Path, **kw) -> list:
    source = source_spec(config(inp.parent / "unused", input=str(inp), **kw))
    shards, _ = plan_inputs(source)
    return [raw for shard in shards for raw in read_shard(shard, source)]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def corrupt_exif_jpeg() -> bytes:
    """A JPEG that decodes, with an EXIF block that breaks orientation: Orientation = 6 (rotate) and
    RowsPerStrip (a number) stored as text, so re-encoding the EXIF after the rotation fails."""
    entries = struct.pack(">HHII", 0x0112, 3, 1, 6 << 16) + struct.pack(">HHI4s", 0x0116, 2, 3, b"ab\0\0")
    exif = b"Exif\0\0MM\0*" + struct.pack(">IH", 8, 2) + entries + struct.pack(">I", 0)
    return encode(Image.fromarray(RGB), "JPEG", exif=exif)


# --- 1. one image never kills a job -------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Byte flips, a truncation, an inserted random chunk or a duplicated chunk."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.6:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.75:
            del b[rng.randrange(1, len(b)):]
        elif op < 0.9:
            p = rng.randrange(len(b))
            b[p:p] = rng.randbytes(rng.randint(1, 64))
        else:
            p, q = rng.randrange(len(b)), rng.randrange(len(b))
            b[p:p] = b[q:q + rng.randint(4, 64)]
        if len(b) < 16:
            break
    return bytes(b)


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_images_skip_or_decode() -> None:
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    img = Image.fromarray(RGB)
    seeds = [encode(img, "PNG", exif=exif), encode(img, "JPEG", exif=exif), encode(img, "WEBP", exif=exif),
             encode(img, "WEBP", lossless=True), encode(img, "TIFF", exif=exif),
             encode(img, "TIFF", compression="tiff_lzw"), encode(img.convert("P"), "GIF")]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "skip": 0}
    deadline = time.monotonic() + 12
    for _ in range(60_000):
        if time.monotonic() > deadline:
            break
        data = _mutate(rng.choice(seeds), rng)
        try:
            view = decode_view(data, PRE)
        except SkipImage:
            outcomes["skip"] += 1
            continue
        assert view.pixels.shape == (32, 32, 3) and view.pixels.dtype == np.uint8
        assert view.ext in IMAGE_EXTS and isinstance(view.data, bytes)
        outcomes["ok"] += 1
    assert outcomes["ok"] > 100 and outcomes["skip"] > 100, outcomes


def test_corrupt_exif_is_a_skip_and_the_job_completes(tmp_path: Path, caplog) -> None:
    with pytest.raises(SkipImage) as e:
        decode_view(corrupt_exif_jpeg(), PRE)
    assert e.value.reason == UNDECODABLE
    folder = make_image_folder(tmp_path / "images", per_class=6)
    (folder / "class_1" / "bad_exif.jpg").write_bytes(corrupt_exif_jpeg())
    with caplog.at_level(logging.WARNING, logger="kmim"):
        summary = run(tmp_path / "out", input=str(folder))
    manifest = read_manifest(tmp_path / "out")
    assert summary["skipped"] == manifest["skipped"] == {UNDECODABLE: 1}
    assert manifest["samples"] == 18 and manifest["inputs"] == 19
    assert any("class_1/bad_exif.jpg" in r.getMessage() and UNDECODABLE in r.getMessage() for r in caplog.records)


# --- 2. every dataset kmim writes passes its own verify and loader ---------------------------------------------


def _format_images() -> dict[str, bytes]:
    """File name -> bytes of images in formats outside IMAGE_EXTS, named as the folder input takes them."""
    img = Image.fromarray(RGB)
    return {
        "camera.jpg": encode(img, "MPO", save_all=True, append_images=[Image.fromarray(RGB[::-1].copy())]),
        "icon.png": encode(img, "ICO"),
        "j2k.jpg": encode(img, "JPEG2000"),
        "targa.png": encode(img.convert("RGBA"), "TGA"),
        "paintbrush.bmp": encode(img, "PCX"),
        "iris.png": encode(img, "SGI"),
        "quite_ok.png": encode(img, "QOI"),
    }


def test_every_format_reads_back_through_verify_and_the_loader(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", per_class=4)
    originals = {f"class_0/{name}": data for name, data in _format_images().items()}
    for rel, data in originals.items():
        (folder / rel).write_bytes(data)
    out = tmp_path / "out"
    run(out, input=str(folder))
    manifest = read_manifest(out)
    assert manifest["skipped"] == {} and manifest["samples"] == 12 + len(originals)
    assert verify_dataset(out) == []
    stored = {}
    for entry in manifest["shards"]:
        with open(out / entry["path"], "rb") as f:
            for sample in iter_tar(f):
                images = [e for e in sample if e not in ("__key__", "json", "tokens.npy")]
                assert len(images) == 1 and images[0] in IMAGE_EXTS
                stored[json.loads(sample["json"])["source"]] = images[0], sample[images[0]]
    pre = Preprocess(32)
    for rel, data in originals.items():
        ext, kept = stored[rel]
        if rel.endswith("camera.jpg"):  # MPO is JPEG: stored as it came
            assert Image.open(io.BytesIO(data)).format == "MPO" and (ext, kept) == ("jpg", data)
        else:  # re-encoded losslessly
            assert ext == "png" and Image.open(io.BytesIO(kept)).format == "PNG"
        want, got = decode_view(data, pre), decode_view(kept, pre)
        assert got.geometry == want.geometry and np.array_equal(got.pixels, want.pixels)
    ds = TokenDataset(out, batch_size=4, rank=0, world_size=1)
    samples = [ds.sample(i) for i in range(manifest["samples"])]
    assert {s["key"] for s in samples} == _ok_keys(out, manifest)


def _ok_keys(out: Path, manifest: dict) -> set[str]:
    keys = set()
    for entry in manifest["shards"]:
        index = read_index(out / entry["index"]).to_pydict()
        keys |= {k for k, s in zip(index["key"], index["status"], strict=True) if s == "ok"}
    return keys


# --- 3. bounded reads -------------------------------------------------------------------------------------------


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, generated as read."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _bomb_tar(path: Path, mode: str, size: int) -> None:
    """A compressed tar: a good sample, one ``size``-byte zero member (written streaming), a good sample."""
    rng = np.random.default_rng(0)
    with tarfile.open(str(path), mode) as tar:
        for key in ("a", "bomb", "b"):
            info = tarfile.TarInfo(f"{key}.png")
            if key == "bomb":
                info.size = size
                tar.addfile(info, _Zeros(size))
            else:
                data = png_bytes(class_image(rng, 0, (40, 40)))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(("mode", "size"), [("w|gz", 512 << 20), ("w|bz2", 64 << 20)])
def test_compression_bomb_tar_is_skipped_quickly_in_bounded_memory(tmp_path: Path, mode: str, size: int) -> None:
    path = tmp_path / "bomb.tar"
    _bomb_tar(path, mode, size)
    assert path.stat().st_size < 1 << 20
    t0 = time.monotonic()
    tracemalloc.start()
    try:
        raws = raw_samples(path, max_image_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r.source, r.skip) for r in raws] == [("bomb.tar/a", None), ("bomb.tar/bomb", TOO_LARGE),
                                                  ("bomb.tar/b", None)]
    assert "max_image_bytes (1048576)" in raws[1].detail and str(size) in raws[1].detail
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"
    assert time.monotonic() - t0 < 20


def test_gzip_bomb_tar_job_completes_with_a_skip(tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    _bomb_tar(tars / "bomb.tar", "w|gz", 512 << 20)  # over the default 64 MiB cap
    rng = np.random.default_rng(1)
    w = ShardWriter(tars / "good.tar")
    for i in range(12):
        w.write({"__key__": f"g{i}", "png": png_bytes(class_image(rng, i % 3, (40, 40)))})
    w.finish()
    w.commit()
    run(tmp_path / "out", input=str(tars))
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped"] == {TOO_LARGE: 1} and manifest["samples"] == 14


def test_files_over_the_cap_are_skipped_unread(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", per_class=2, classes=1)
    with open(folder / "class_0" / "huge.png", "wb") as f:  # sparse: 1 GiB that takes no disk
        f.truncate(1 << 30)
    raws = {r.source: r for r in raw_samples(folder, max_image_bytes=1 << 20)}
    assert raws["class_0/huge.png"].skip == TOO_LARGE and raws["class_0/huge.png"].data is None
    assert "1073741824 bytes > max_image_bytes (1048576)" in raws["class_0/huge.png"].detail
    assert all(r.skip is None for s, r in raws.items() if s != "class_0/huge.png")
    # a Parquet value over the cap
    small = png_bytes(class_image(np.random.default_rng(0), 0, (40, 40)))
    big = small + bytes(1)
    pq.write_table(pa.table({"image": [small, big], "label": [0, 1]}), tmp_path / "d.parquet")
    raws = raw_samples(tmp_path / "d.parquet", max_image_bytes=len(small))
    assert [(r.skip, r.label) for r in raws] == [(None, 0), (TOO_LARGE, 1)]


def _run_guarded(fn, fifos: list[Path], timeout: float = 60) -> object:
    """Run ``fn`` in a thread; if it blocks on a FIFO past ``timeout`` seconds, unblock it and fail."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # a writer that opens and closes gives the blocked reader EOF
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("blocked on a FIFO in the input")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_fifos_and_devices_in_a_folder_are_never_opened(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", per_class=6)
    fifo = folder / "class_0" / "x.png"
    os.mkfifo(fifo)
    os.mkfifo(folder / "shards.tar")  # would be planned as an input tar, and opened
    (folder / "class_1" / "link.png").symlink_to(fifo)
    (folder / "class_2" / "null.png").symlink_to(os.devnull)
    (folder / "class_2" / "real.png").symlink_to(folder / "class_2" / "img_000.png")  # a link to a file counts
    summary = _run_guarded(lambda: run(tmp_path / "out", input=str(folder)), [fifo, folder / "shards.tar"])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["inputs"] == manifest["samples"] == 19 and summary["skipped"] == {}
    with pytest.raises(InputError, match="not a regular file"):
        _run_guarded(lambda: plan_inputs(source_spec(config(tmp_path / "o2", input=str(folder / "shards.tar")))),
                     [folder / "shards.tar"])


def test_file_and_class_names_that_are_not_utf8_are_kept(tmp_path: Path) -> None:
    """A file or class folder whose name is not UTF-8 is tokenized like any other; the dataset records the name
    with its undecodable bytes as \\xNN (valid UTF-8 everywhere) and keys the sample by its real bytes."""
    from kmim.pipeline.decoding import sample_key

    folder = make_image_folder(tmp_path / "images", per_class=4)
    os.rename(folder / "class_0" / "img_000.png", os.fsencode(folder / "class_0") + b"/caf\xe9.png")
    # and a file literally named like the recorded name of the first
    os.rename(folder / "class_0" / "img_002.png", os.fsencode(folder / "class_0") + b"/caf\\xe9.png")
    os.rename(folder / "class_1", os.fsencode(folder) + b"/class_\xff")
    out = tmp_path / "out"
    summary = run(out, input=str(folder))
    manifest = read_manifest(out)
    assert manifest["inputs"] == manifest["samples"] == 12 and summary["skipped"] == {}
    assert manifest["labels"] == ["class_0", "class_2", "class_\\xff"]
    sources, keys = [], []
    for e in manifest["shards"]:
        index = read_index(out / e["index"]).to_pydict()
        sources += index["source"]
        keys += index["key"]
    assert sources.count("class_0/caf\\xe9.png") == 2 and len(set(keys)) == 12  # one recorded name, two keys
    assert sample_key(os.fsdecode(b"class_0/caf\xe9.png")) in keys
    assert sum(s.startswith("class_\\xff/") for s in sources) == 4
    assert verify_dataset(out) == []
    batches = list(TokenDataset(out, batch_size=4, rank=0, world_size=1, drop_last=False).batches(0))
    assert sum(len(b["key"]) for b in batches) == 12


# --- 4. --max-image-pixels independent of Pillow's own limit ----------------------------------------------------


def test_pixel_limit_is_the_configured_one_not_pillows(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for Pillow's default, below the configured limit
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    images = [encode(img, fmt) for fmt in ("PNG", "TIFF", "GIF", "JPEG")] * 4
    with ThreadPoolExecutor(4) as pool:  # 90k pixels: above Pillow's limit, below PRE's 200k
        views = list(pool.map(lambda data: decode_view(data, PRE), images))
    assert all(v.geometry["source_size"] == [300, 300] for v in views)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(SkipImage) as e:
        decode_view(encode(img.resize((500, 500)), "TIFF"), PRE)
    assert e.value.reason == BOMB and Image.MAX_IMAGE_PIXELS == 1000
    # and a configured limit below Pillow's still holds
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    with pytest.raises(SkipImage) as e:
        decode_view(encode(img, "PNG"), Preprocess(32, max_image_pixels=50_000))
    assert e.value.reason == BOMB


# --- 5. labels, tar layout, writer cleanup ----------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> None:
    """A tar of (name, data) members; data None makes a directory entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_tar_labels_skip_their_sample_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = png_bytes(class_image(rng, 0, (40, 40)))
    jpeg = encode(Image.fromarray(RGB), "JPEG")
    labels = {"ok": b"2", "neg": b"-1", "word": b"cat", "neg5": b"-5", "huge": b"99999999999", "float": b"1.5",
              "uni": "\u0663".encode(), "binary": b"\xff\xfe"}
    members: list[tuple[str, bytes | None]] = [("subdir", None)]
    for key, cls in labels.items():
        members += [(f"{key}.png", img), (f"{key}.cls", cls)]
    members += [("j1.JPEG", jpeg), ("j1.json", b'{"label": 7}'), ("j2.PNG", img), ("j2.json", b'{"label": "dog"}'),
                ("j3.png", img), ("j3.json", b"{not json"), ("j4.png", img), ("j4.json", b'{"label": true}'),
                ("j5.png", img), ("j5.json", b'["no", "label"]')]
    _tar(tmp_path / "in.tar", members)
    got = {r.source.split("/", 1)[1]: (r.skip, r.label) for r in raw_samples(tmp_path / "in.tar")}
    assert got == {"ok": (None, 2), "neg": (None, -1), "word": (BAD_LABEL, None), "neg5": (BAD_LABEL, None),
                   "huge": (BAD_LABEL, None), "float": (BAD_LABEL, None), "uni": (BAD_LABEL, None),
                   "binary": (BAD_LABEL, None), "j1": (None, 7), "j2": (BAD_LABEL, None), "j3": (BAD_LABEL, None),
                   "j4": (BAD_LABEL, None), "j5": (None, None)}
    # shards kmim reads keep refusing anything but regular files
    with open(tmp_path / "in.tar", "rb") as f, pytest.raises(ShardError, match="not a regular file"):
        list(iter_tar(f))


def test_bad_parquet_labels_skip_their_row_only(tmp_path: Path) -> None:
    img = png_bytes(class_image(np.random.default_rng(0), 0, (40, 40)))
    pq.write_table(pa.table({"image": [img] * 4, "label": pa.array([0, 2**40, -7, None], pa.int64())}),
                   tmp_path / "ints.parquet")
    assert [(r.skip, r.label) for r in raw_samples(tmp_path / "ints.parquet")] == [
        (None, 0), (BAD_LABEL, None), (BAD_LABEL, None), (None, None)]
    pq.write_table(pa.table({"image": [img] * 2, "label": [1.0, 2.5]}), tmp_path / "floats.parquet")
    assert [r.skip for r in raw_samples(tmp_path / "floats.parquet")] == [BAD_LABEL, BAD_LABEL]


def test_unread_members_and_uppercase_extensions(tmp_path: Path) -> None:
    img = png_bytes(class_image(np.random.default_rng(0), 0, (40, 40)))
    _tar(tmp_path / "in.tar", [("a.PNG", img), ("a.txt", bytes(4 << 20)), ("b.Jpg", img), ("b.cls", b"1")])
    raws = raw_samples(tmp_path / "in.tar", max_image_bytes=1 << 20)
    assert [(r.skip, r.data, r.label) for r in raws] == [(None, img, None), (None, img, 1)]


def test_writer_abort_removes_the_temp_file_when_close_fails(tmp_path: Path, monkeypatch) -> None:
    w = ShardWriter(tmp_path / "s.tar")
    w.write({"__key__": "a", "png": b"x" * 100})
    real_close = w._file.close

    def failing_close() -> None:
        real_close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w._file, "close", failing_close)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_input_tars_may_hold_directories(tmp_path: Path) -> None:
    """``tar cf x.tar train/`` gives members under a directory: keys keep the path, as WebDataset reads them."""
    img = png_bytes(class_image(np.random.default_rng(0), 0, (40, 40)))
    _tar(tmp_path / "in.tar", [("./train/", None), ("./train/n01_1.JPEG", img), ("./train/n01_1.cls", b"3"),
                               ("train/sub/b.png", img)])
    raws = raw_samples(tmp_path / "in.tar")
    assert [(r.source, r.skip, r.label) for r in raws] == [("in.tar/train/n01_1", None, 3),
                                                            ("in.tar/train/sub/b", None, None)]
