"""Checks that run before anything trains: every problem is one line naming the file and the id.

A box may stick out of its image by at most ``BOX_TOLERANCE_PX`` (float rounding, VOC's 1-based
edges written 0-based); it is clipped then. Anything further out is an error, not silently clipped,
because it usually means the wrong image or a swapped width/height.

Images are checked from their header before any decode: more than ``max_pixels`` pixels (an image bomb
would be decoded again every epoch) or pixels that are not 8-bit (16-bit and float images would be
clipped to 8 bits by the RGB conversion) are refused, not converted.
"""

from __future__ import annotations

import io
import math
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gankd_ray.data.records import ImageRecord, Rejections
from gankd_ray.utils import first_line, short_repr

BOX_TOLERANCE_PX = 1.0
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: above any camera a detector is trained on, far below PIL's bomb limit
# PIL modes of more than 8 bits per channel; converting them to RGB clips every value above 255.
WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;32", "I;32B", "I;32L", "F;32", "F;32B", "F;32L")
INT64_RANGE = (-(2**63), 2**63 - 1)  # the parquet image_id column


@dataclass
class CleanImage:
    """A validated image, ready to write.

    Attributes:
        data: the encoded image file, unchanged.
        boxes: float64[N, 4] xyxy inside ``[0, width] x [0, height]``, ``x2 > x1``, ``y2 > y1``.
        labels: int64[N] category ids ``1..K``.
        iscrowd: bool[N] ignore regions.
        areas: float64[N] the input's area where plausible, else the box area.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    data: bytes
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray


class _Invalid(Exception):
    """A reason; the caller prefixes where it happened."""


def validate_image(
    record: ImageRecord, num_classes: int, rejections: Rejections, max_pixels: int = DEFAULT_MAX_PIXELS
) -> CleanImage | None:
    """Check one image and its annotations (images of more than ``max_pixels`` pixels are invalid).

    Returns:
        The clean image, or ``None`` when the image was rejected under ``drop_invalid`` (invalid
        annotations alone are dropped and the image kept).

    Raises:
        DatasetError: on the first problem unless ``rejections.drop_invalid``.
    """
    try:
        _check_image_id(record.image_id)
        _check_file_name(record.file_name)
        data = _image_bytes(record)
        width, height = _decoded_size(data, max_pixels)
        if record.width is not None or record.height is not None:
            _check_declared_size(record.width, record.height, width, height)
    except _Invalid as reason:
        rejections.reject("image", f"{record.where()} ({short_repr(record.file_name)}): {reason}")
        return None
    boxes, labels, crowd, areas = [], [], [], []
    for index, annotation in enumerate(record.annotations):
        try:
            box = clean_box(annotation.box, width, height)
            _check_category(annotation.category_id, num_classes)
        except _Invalid as reason:
            ann_id = annotation.source_id if annotation.source_id is not None else f"#{index}"
            rejections.reject("annotation", f"{record.where()}: annotation {ann_id}: {reason}")
            continue
        boxes.append(box)
        labels.append(annotation.category_id)
        crowd.append(annotation.iscrowd)
        areas.append(_plausible_area(annotation.area, box))
    return CleanImage(
        image_id=record.image_id,
        file_name=record.file_name,
        width=width,
        height=height,
        data=data,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        iscrowd=np.asarray(crowd, dtype=bool),
        areas=np.asarray(areas, dtype=np.float64),
    )


def clean_box(box: tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    """Validate an xyxy box against a ``width x height`` image, clipping sub-tolerance overhang.

    Raises:
        _Invalid: non-finite, outside the image by more than ``BOX_TOLERANCE_PX``, or degenerate.
    """
    if len(box) != 4:
        raise _Invalid(f"box {list(box)} must have 4 coordinates")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise _Invalid(f"box {[x1, y1, x2, y2]} has a NaN or infinite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise _Invalid(f"degenerate box {[x1, y1, x2, y2]} (needs x2 > x1 and y2 > y1)")
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise _Invalid(f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise _Invalid(f"box {list(box)} is empty once clipped to the {width}x{height} image")
    return x1, y1, x2, y2


def _check_file_name(name: str) -> None:
    # file_name becomes a path under images/<split>/: it must not escape that folder.
    if not is_plain_relative_path(name):
        raise _Invalid(f"file name {short_repr(name)} must be a plain relative path")


def is_plain_relative_path(name: str) -> bool:
    """Whether ``name`` stays inside the folder it is joined to: relative, normalised, no ``..``, no
    backslash, no NUL or other control character (which the OS rejects with a traceback, or hides)."""
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 or c == "\x7f" for c in name):
        return False
    normal = posixpath.normpath(name)
    return not normal.startswith("..") and normal == name


def _check_image_id(image_id: int) -> None:
    if not INT64_RANGE[0] <= image_id <= INT64_RANGE[1]:
        raise _Invalid("image id does not fit in 64 bits")


def _image_bytes(record: ImageRecord) -> bytes:
    if record.data is not None:
        return record.data
    if record.path is None:
        raise _Invalid("no image data or path")
    try:
        return record.path.read_bytes()
    except FileNotFoundError:
        raise _Invalid(f"image file {record.path} is missing") from None
    except OSError as err:
        raise _Invalid(f"image file {record.path} is unreadable: {err.strerror}") from None


def _decoded_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` after a full decode, so truncated files fail here, not in a loader worker;
    the header is checked first, so a bomb or a 16-bit image is refused without decoding it."""
    try:
        with open_image(data) as image:
            problem = image_header_problem(image, max_pixels)
            if not problem:
                image.load()
                return image.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise _Invalid(f"corrupt or unsupported image file: {first_line(err)}") from None
    raise _Invalid(problem)


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` (header only) without PIL's bomb warning: callers apply their own pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def image_header_problem(image: Image.Image, max_pixels: int) -> str:
    """Why an opened (not yet decoded) image is refused, or ""; its size and mode come from the header."""
    width, height = image.size
    if width * height > max_pixels:
        return f"{width}x{height} is {width * height} pixels, above the limit of {max_pixels} (--max-pixels)"
    if image.mode in WIDE_MODES:
        return (
            f"pixels of mode {image.mode!r} (16-bit or float) would be clipped to 8 bits: "
            "convert the image to 8 bits per channel first"
        )
    return ""


def _check_declared_size(width: int | None, height: int | None, actual_w: int, actual_h: int) -> None:
    declared = f"{short_repr(width)}x{short_repr(height)}"
    if width is None or height is None or width <= 0 or height <= 0:
        raise _Invalid(f"non-positive or missing width/height {declared}")
    if (width, height) != (actual_w, actual_h):
        raise _Invalid(f"declared size {declared} but the image is {actual_w}x{actual_h}")


def _check_category(category_id: int, num_classes: int) -> None:
    if not 1 <= category_id <= num_classes:
        raise _Invalid(f"unknown category {category_id} (expected 1..{num_classes})")


def _plausible_area(area: float | None, box: tuple[float, float, float, float]) -> float:
    """The input's area (e.g. of a segmentation) unless missing or impossible for this box."""
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    if area is None or not math.isfinite(area) or area <= 0 or area > box_area * 1.001 + 1e-6:
        return box_area
    return float(area)
