"""Image decoding: every mode converts to RGB, every kind of bad input is skipped with its reason; the scaled
render method decodes JPEGs reduced only where its rule allows, and both sides of the contract render alike."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import job_overrides
from PIL import Image
from skimage import data as photos

from kmim.config import ConfigError, load_config
from kmim.datasets.loader import TokenDataset
from kmim.datasets.manifest import read_manifest
from kmim.datasets.preprocess import (
    BOMB,
    EMPTY,
    FULL,
    RENDERS,
    SCALED,
    TOO_SMALL,
    TRUNCATED,
    UNDECODABLE,
    JpegSource,
    Preprocess,
    SkipImage,
    ViewSpec,
    center_geometry,
    decode_source,
    decode_view,
    decode_views,
    jpeg_scale,
    render,
    view_box,
)
from kmim.pipeline.job import run_job

PRE = Preprocess(image_size=32, min_image_size=8, max_image_pixels=200_000)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_geometry_resize_shorter_side_then_center_crop() -> None:
    arr = np.zeros((40, 80, 3), np.uint8)  # H=40, W=80
    arr[:, 40:] = 255  # right half white
    view = decode_view(encode(Image.fromarray(arr)), PRE)
    assert view.pixels.shape == (32, 32, 3) and view.pixels.dtype == np.uint8
    assert view.geometry == {"source_size": [80, 40], "resized": [64, 32], "crop_box": [16, 0, 48, 32], "flip": False}
    assert view.ext == "png"
    assert view.pixels[:, :14].max() < 10 and view.pixels[:, 18:].min() > 245  # the edge stays centered


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_modes_convert_to_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    view = decode_view(encode(img, fmt), PRE)
    assert view.pixels.shape == (32, 32, 3)


def test_sixteen_bit_scales_to_eight_bit() -> None:
    img = Image.fromarray(np.full((32, 32), 65535, np.uint16))
    view = decode_view(encode(img), PRE)
    assert (view.pixels == 255).all()


def test_transparent_pixels_composite_on_white() -> None:
    arr = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    view = decode_view(encode(Image.fromarray(arr, "RGBA")), PRE)
    assert (view.pixels == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # W=40, H=20
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    view = decode_view(encode(img, "JPEG", exif=exif), PRE)
    assert view.geometry["source_size"] == [20, 40]


def good_png() -> bytes:
    return encode(Image.fromarray(np.full((40, 40, 3), 128, np.uint8)))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", EMPTY),
    (b"definitely not an image", UNDECODABLE),
    (good_png()[:60], TRUNCATED),
    (encode(Image.new("L", (600, 600))), BOMB),
    (encode(Image.new("RGB", (4, 30))), TOO_SMALL),
])
def test_bad_inputs_are_skipped_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SkipImage) as e:
        decode_view(data, PRE)
    assert e.value.reason == reason


def test_truncated_jpeg_is_skipped() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(SkipImage) as e:
        decode_view(data[: len(data) // 2], PRE)
    assert e.value.reason in (TRUNCATED, UNDECODABLE)


# --- the scaled render method ---------------------------------------------------------------------------------


def photo(name: str, size: tuple[int, int], **kw) -> bytes:
    """scikit-image's sample photograph ``name`` resampled (Lanczos) to ``size`` [width, height] px, as a JPEG."""
    img = Image.fromarray(getattr(photos, name)()).resize(size, Image.Resampling.LANCZOS)
    return encode(img, "JPEG", quality=90, **kw)


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """An ImageNet-sized JPEG, a large one (upscaled to 1,500 px on the shorter side), a rotated one (EXIF 6)."""
    return {"typical": photo("coffee", (500, 375)), "large": photo("chelsea", (2250, 1500)),
            "rotated": photo("astronaut", (600, 450), exif=exif_orientation(6))}


def test_the_method_is_recorded_and_a_description_without_it_is_the_full_method() -> None:
    full, scaled = Preprocess(224), Preprocess(224, render=SCALED)
    assert full.render == FULL and "render" not in full.describe()  # as every manifest written before the setting
    assert scaled.describe() == {**full.describe(), "render": SCALED}
    assert [Preprocess.from_description(p.describe()) for p in (full, scaled)] == [full, scaled]
    with pytest.raises(ValueError, match="render method 'fast'"):
        Preprocess.from_description({**full.describe(), "render": "fast"})


@pytest.mark.parametrize("name", ["typical", "large", "rotated"])
def test_the_loader_path_renders_the_tokenized_pixels(jpegs: dict[str, bytes], name: str) -> None:
    pre = Preprocess(224, render=SCALED)
    tokenized = decode_views(jpegs[name], pre, ViewSpec(count=4), "9f3a", 112)
    for v, geometry in enumerate(tokenized.geometry):
        # As the loader does: the stored bytes decoded afresh per sample, the recorded view rendered.
        source = decode_source(tokenized.data, pre)
        assert isinstance(source.image, JpegSource) and list(source.image.size) == geometry["source_size"]
        assert np.array_equal(render(source.image, geometry, 224), tokenized.pixels[v])
        assert np.array_equal(render(decode_source(tokenized.data, pre).image, geometry, 112), tokenized.extract[v])


def test_the_scale_keeps_at_least_size_pixels_across_the_box() -> None:
    assert jpeg_scale((0, 0, 500, 375), 224) == 5  # 375 x 5/8 = 234 >= 224 > 375 x 4/8
    assert jpeg_scale((0, 0, 2250, 1500), 224) == 2
    assert jpeg_scale((10, 10, 266, 266), 224) == 7  # 8/7 x 224 = 256 px: the smallest box decoded reduced
    assert jpeg_scale((10, 10, 265.9, 400), 224) == 8
    assert jpeg_scale((0, 0, 100, 100), 224) == 8  # a view that enlarges is never reduced


def bilinear(pixels: np.ndarray, box: tuple[float, ...], size: int) -> np.ndarray:
    """float64 [size, size, 3]: ``pixels`` uint8 [H, W, 3] interpolated bilinearly at the centers of ``size`` x
    ``size`` pixels spanning ``box`` [left, top, right, bottom] (px), rounded to 1/32 px; edge pixels repeat
    outward."""

    def taps(start: float, end: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centers = np.rint((start + (np.arange(size) + 0.5) * (end - start) / size - 0.5) * 32) / 32
        first = np.floor(centers).astype(int)
        return np.clip(first, 0, n - 1), np.clip(first + 1, 0, n - 1), centers - first

    (x0, x1, fx), (y0, y1, fy) = taps(box[0], box[2], pixels.shape[1]), taps(box[1], box[3], pixels.shape[0])
    rows = pixels[y0].astype(float) * (1 - fy)[:, None, None] + pixels[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_a_box_shrunk_by_at_most_5_4_is_resampled_bilinearly_any_other_antialiased(jpegs: dict[str, bytes]) -> None:
    """The ImageNet-sized photo's center view (decoded at 5/8: a 234 px box to 224 px) is the reduced decode
    interpolated bilinearly, to OpenCV's rounding; the large one's (decoded at 2/8: 375 px to 224 px) is Pillow's
    antialiased bicubic of it, bit for bit."""
    pre = Preprocess(224, render=SCALED)
    for name, m in (("typical", 5), ("large", 2)):
        source = decode_source(jpegs[name], pre).image
        geometry = center_geometry(*source.size, 224)
        box, reduced = tuple(c * m / 8 for c in view_box(geometry)), source.reduced(m)
        assert jpeg_scale(view_box(geometry), 224) == m and (max(box[2] - box[0], box[3] - box[1]) / 224 > 5 / 4) == (
            name == "large")
        got = render(source, geometry, 224)
        if name == "large":
            want = Image.fromarray(reduced).resize((224, 224), Image.Resampling.BICUBIC, box=box)
            assert np.array_equal(got, np.asarray(want))
        else:  # OpenCV's integer weights are exact for 1/32 px steps: only the final rounding differs
            assert np.abs(got - bilinear(reduced, box, 224)).max() <= 0.5


def test_a_view_far_into_a_wide_jpeg_is_resampled_where_it_is() -> None:
    """A box 40,000 px to the right (35,000 px at 7/8: past OpenCV's int16 maps) renders as the full method's."""
    width = 40_000
    ramp = np.broadcast_to(np.arange(width) * 255 // width, (290, width)).astype(np.uint8)
    data = encode(Image.fromarray(ramp, "L"), "JPEG", quality=95)
    geometry = {"source_size": [width, 290], "source_box": [width - 290, 0, width, 290], "flip": False}
    assert jpeg_scale(view_box(geometry), 224) == 7
    full = render(decode_source(data, Preprocess(224)).image, geometry, 224)
    scaled = render(decode_source(data, Preprocess(224, render=SCALED)).image, geometry, 224)
    assert np.abs(full.astype(int) - scaled).max() <= 2


@pytest.mark.parametrize("name", ["typical", "large"])
def test_views_decoded_whole_are_the_full_methods_bit_for_bit(jpegs: dict[str, bytes], name: str) -> None:
    views = ViewSpec(count=12, scale=(0.05, 1.0))
    full = decode_views(jpegs[name], Preprocess(224), views, "51", 224)
    scaled = decode_views(jpegs[name], Preprocess(224, render=SCALED), views, "51", 224)
    assert scaled.geometry == full.geometry
    scales = [jpeg_scale(view_box(g), 224) for g in full.geometry]
    for m, want, got in zip(scales, full.pixels, scaled.pixels, strict=True):
        diff = np.abs(want.astype(int) - got)
        assert diff.max() == 0 if m == 8 else 0 < diff.mean() < 2
    assert min(scales) < 8 and (name == "large" or 8 in scales)


def test_what_the_scaled_method_does_not_reduce_renders_as_the_full_method(jpegs: dict[str, bytes]) -> None:
    data = jpegs["typical"]
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    corrupt = data[:-2] + b"\0\1\2" + data[-2:]  # extraneous bytes before EOI: libjpeg-turbo warns, Pillow decodes
    pre = Preprocess(224, render=SCALED)
    source = decode_source(corrupt, pre).image
    assert isinstance(source, JpegSource) and source.reduced(5) is None
    for data in (encode(rgb), encode(rgb.convert("CMYK"), "JPEG"), encode(rgb.convert("L"), "PNG"), corrupt):
        assert np.array_equal(decode_view(data, pre).pixels, decode_view(data, Preprocess(224)).pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_renders_the_oriented_view(orientation: int) -> None:
    data = photo("astronaut", (480, 320), exif=exif_orientation(orientation))
    full = decode_views(data, Preprocess(96), ViewSpec(count=3), "7c", 96)
    scaled = decode_views(data, Preprocess(96, render=SCALED), ViewSpec(count=3), "7c", 96)
    assert scaled.geometry == full.geometry and scaled.source_size == ([320, 480] if orientation > 4 else [480, 320])
    assert np.abs(full.pixels.astype(int) - scaled.pixels).mean() < 2  # a box mapped the wrong way: tens of levels


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF breaks exif_transpose: Orientation 6 and RowsPerStrip (a number) stored as text."""
    entries = struct.pack(">HHII", 0x0112, 3, 1, 6 << 16) + struct.pack(">HHI4s", 0x0116, 2, 3, b"ab\0\0")
    exif = b"Exif\0\0MM\0*" + struct.pack(">IH", 8, 2) + entries + struct.pack(">I", 0)
    return encode(Image.new("RGB", (64, 48)), "JPEG", exif=exif)


@pytest.mark.parametrize(("data", "reason"), [
    (photo("coffee", (200, 150))[:3000], TRUNCATED),
    (corrupt_exif_jpeg(), UNDECODABLE),
    (encode(Image.new("L", (600, 600)), "JPEG"), BOMB),
    (encode(Image.new("RGB", (4, 30)), "JPEG"), TOO_SMALL),
])
def test_bad_jpegs_are_skipped_with_the_full_methods_reason(data: bytes, reason: str) -> None:
    for render_method in RENDERS:
        with pytest.raises(SkipImage) as e:
            decode_view(data, Preprocess(32, 8, 200_000, render_method))
        assert e.value.reason == reason



def test_fuzzed_jpegs_skip_exactly_when_the_full_method_skips() -> None:
    seed, rng = photo("coffee", (96, 72)), random.Random(7)
    skipped = 0
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        outcomes = []
        for render_method in RENDERS:
            try:
                outcomes.append(decode_view(bytes(data), Preprocess(32, 8, 200_000, render_method)).pixels.shape)
            except SkipImage:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1]
        skipped += outcomes[0] is None
    assert 30 < skipped < 270


def test_full_datasets_load_as_before_and_a_job_resumes_only_with_its_method(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "class_0"
    folder.mkdir(parents=True)
    for i, name in enumerate(("coffee", "chelsea", "astronaut", "rocket")):
        (folder / f"{name}.jpg").write_bytes(photo(name, (120 + 20 * i, 90)))
    inputs = [p.read_bytes() for p in sorted(folder.iterdir())]
    overrides = job_overrides(out=str(tmp_path / "full"), input=str(tmp_path / "images"), k=4, render=FULL)
    run_job(load_config(None, overrides))
    assert read_manifest(tmp_path / "full")["preprocess"] == Preprocess(32).describe()  # as kmim always wrote it
    want = {decode_view(b, Preprocess(32)).pixels.tobytes() for b in inputs}
    scaled = {decode_view(b, Preprocess(32, render=SCALED)).pixels.tobytes() for b in inputs}
    assert not want & scaled
    ds = TokenDataset(tmp_path / "full", batch_size=1, rank=0, world_size=1, mean=(0, 0, 0), std=(1, 1, 1))
    loaded = {(ds.sample(i)["image"] * 255).round().byte().permute(1, 2, 0).numpy().tobytes() for i in range(4)}
    assert loaded == want
    with pytest.raises(ConfigError, match="field 'render'"):
        run_job(load_config(None, {**overrides, "render": SCALED}))
    run_job(load_config(None, {**overrides, "out": str(tmp_path / "scaled"), "render": SCALED}))
    assert read_manifest(tmp_path / "scaled")["preprocess"] == Preprocess(32, render=SCALED).describe()
