"""EXIF orientation without decoding pixels, and boxes of an oriented image mapped back to the stored one (what the
scaled render method needs to cut a view out of a JPEG decoded as stored)."""

from __future__ import annotations

from PIL import ExifTags, Image, ImageOps

# The transpose ImageOps.exif_transpose applies for each EXIF orientation.
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# How a box in the oriented image maps back to the stored one, per transpose: (axes swapped, stored x reversed,
# stored y reversed).
STORED_AXES = {None: (False, False, False), Image.Transpose.FLIP_LEFT_RIGHT: (False, True, False),
               Image.Transpose.ROTATE_180: (False, True, True), Image.Transpose.FLIP_TOP_BOTTOM: (False, False, True),
               Image.Transpose.TRANSPOSE: (True, False, False), Image.Transpose.ROTATE_270: (True, False, True),
               Image.Transpose.TRANSVERSE: (True, True, True), Image.Transpose.ROTATE_90: (True, True, False)}


def exif_orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose :func:`ImageOps.exif_transpose` applies to the opened ``img``, without decoding its pixels:
    it runs on a 1 x 1 stand-in holding ``img``'s metadata, so EXIF it cannot handle fails here as on the full
    path."""
    stand_in = Image.new("L", (1, 1))
    stand_in.info = dict(img.info)
    ImageOps.exif_transpose(stand_in)
    return ORIENTATIONS.get(stand_in.getexif().get(ExifTags.Base.Orientation, 1))


def stored_box(box: tuple[float, ...], method: Image.Transpose | None, width: int, height: int,
                ) -> tuple[float, ...]:
    """``box`` [left, top, right, bottom] in the oriented image (px) as the same region of the stored ``width`` x
    ``height`` image that ``method`` orients."""
    swap, reverse_x, reverse_y = STORED_AXES[method]
    x0, y0, x1, y1 = (box[1], box[0], box[3], box[2]) if swap else box
    x0, x1 = (width - x1, width - x0) if reverse_x else (x0, x1)
    y0, y1 = (height - y1, height - y0) if reverse_y else (y0, y1)
    return x0, y0, x1, y1
