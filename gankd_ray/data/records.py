"""In-memory description of a dataset before it is written: what every source produces.

Coordinates are continuous pixel edges of the original image, 0-based: a box covering the whole
``W x H`` image is ``(0, 0, W, H)``. Category ids are contiguous ``1..K`` (0 is background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gankd_ray.errors import InputError
from gankd_ray.utils import short_repr

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class DatasetError(InputError):
    """Invalid input or prepared data; the one-line message names the file and the image/annotation id."""


class UnreadableRows(DatasetError):
    """Rows of a split that could not be read (raised by the batch loader); ``reason`` says where (file, row
    group) and why. Here rather than in the loader: a Train controller unpickles it without importing torch."""

    def __init__(self, message: str, *, reason: str = "", flag: str | None = None) -> None:
        super().__init__(message, flag=flag)
        self.reason = reason  # restored from __dict__ when Ray unpickles it (exceptions rebuild from args)


@dataclass
class Annotation:
    """One box of one image.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in original-image pixels (0-based edges), not yet validated.
        category_id: contiguous id ``1..K``, or 0 when the source could not map it (rejected later).
        iscrowd: an ignore region (VOC ``difficult``, COCO crowd): never a positive, ignored by COCOeval.
        area: the input's area (e.g. a segmentation area); ``None`` = use the box area.
        source_id: the input's id for this annotation, used in error messages.
    """

    box: tuple[float, float, float, float]
    category_id: int
    iscrowd: bool = False
    area: float | None = None
    source_id: int | str | None = None


@dataclass
class ImageRecord:
    """One input image with its annotations; the image comes from ``data`` or else from ``path``.

    Attributes:
        image_id: unique over the whole dataset (all splits).
        file_name: relative POSIX path under ``images/<split>/`` in the prepared dataset.
        width, height: declared size, ``None`` = read it from the image.
        origin: the input file that describes this image (annotation file), for error messages.
    """

    image_id: int
    file_name: str
    width: int | None
    height: int | None
    origin: str
    annotations: list[Annotation] = field(default_factory=list)
    path: Path | None = None
    data: bytes | None = None

    def where(self) -> str:
        """``"<origin>: image <id>"``: the prefix of every message about this image."""
        return f"{self.origin}: image {short_repr(self.image_id)}"


@dataclass
class SourceData:
    """What a source hands to the writer.

    Attributes:
        source: source name written to ``dataset.json`` (``synthetic``, ``voc``, ``coco``...).
        classes: class names; class ``classes[k-1]`` has category id ``k``.
        splits: records per split name (every split in ``SPLITS``).
        inputs_digest: sha256 of the non-image inputs (annotation files or generator parameters);
            the writer folds in the digest of every image it reads.
    """

    source: str
    classes: list[str]
    splits: dict[str, list[ImageRecord]]
    inputs_digest: str


class Rejections:
    """Invalid inputs: the first one raises ``DatasetError``, unless ``drop_invalid`` counts and skips them.

    Sources and the writer share one instance, so the final report covers both.
    """

    def __init__(self, drop_invalid: bool = False) -> None:
        self.drop_invalid = drop_invalid
        self.images = 0
        self.annotations = 0
        self.messages: list[str] = []

    def reject(self, kind: Literal["image", "annotation"], message: str) -> None:
        """Raise ``DatasetError(message)``, or count one dropped image/annotation and keep the message."""
        if not self.drop_invalid:
            raise DatasetError(message)
        if kind == "image":
            self.images += 1
        else:
            self.annotations += 1
        self.messages.append(message)

    def summary(self) -> str:
        return f"dropped {self.images} invalid images and {self.annotations} invalid annotations"
