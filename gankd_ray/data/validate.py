"""Checks that run before anything trains: every problem is one line naming the file and the id.

A box may stick out of its image by at most ``BOX_TOLERANCE_PX`` (float rounding, VOC's 1-based
edges written 0-based); it is clipped then. Anything further out is an error, not silently clipped,
because it usually means the wrong image or a swapped width/height.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gankd_ray.data.records import ImageRecord, Rejections

BOX_TOLERANCE_PX = 1.0


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


def validate_image(record: ImageRecord, num_classes: int, rejections: Rejections) -> CleanImage | None:
    """Check one image and its annotations.

    Returns:
        The clean image, or ``None`` when the image was rejected under ``drop_invalid`` (invalid
        annotations alone are dropped and the image kept).

    Raises:
        DatasetError: on the first problem unless ``rejections.drop_invalid``.
    """
    try:
        _check_file_name(record.file_name)
        data = _image_bytes(record)
        width, height = _decoded_size(data)
        if record.width is not None or record.height is not None:
            _check_declared_size(record.width, record.height, width, height)
    except _Invalid as reason:
        rejections.reject("image", f"{record.where()} ({record.file_name}): {reason}")
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
    normal = posixpath.normpath(name) if name else ""
    if not name or name.startswith("/") or "\\" in name or normal.startswith("..") or normal != name:
        raise _Invalid(f"file name {name!r} must be a plain relative path")


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


def _decoded_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` after a full decode, so truncated files fail here, not in a loader worker."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _Invalid(f"corrupt or unsupported image file: {detail}") from None


def _check_declared_size(width: int | None, height: int | None, actual_w: int, actual_h: int) -> None:
    if width is None or height is None or width <= 0 or height <= 0:
        raise _Invalid(f"non-positive or missing width/height {width}x{height}")
    if (width, height) != (actual_w, actual_h):
        raise _Invalid(f"declared size {width}x{height} but the image is {actual_w}x{actual_h}")


def _check_category(category_id: int, num_classes: int) -> None:
    if not 1 <= category_id <= num_classes:
        raise _Invalid(f"unknown category {category_id} (expected 1..{num_classes})")


def _plausible_area(area: float | None, box: tuple[float, float, float, float]) -> float:
    """The input's area (e.g. of a segmentation) unless missing or impossible for this box."""
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    if area is None or not math.isfinite(area) or area <= 0 or area > box_area * 1.001 + 1e-6:
        return box_area
    return float(area)
