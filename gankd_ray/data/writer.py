"""Write a prepared dataset: images, COCO annotations, parquet shards and ``dataset.json``.

Everything is built in a temporary folder beside ``DIR`` and renamed into place at the end, so a
failure (or Ctrl-C, or SIGTERM through ``prepare_data``) never leaves a partial ``DIR``. A process killed
harder leaves its hidden ``.DIR.<pid>.<hex>.partial`` folder behind: the next write to ``DIR`` removes
those whose process is gone. Data files carry no timestamps: the same input gives byte-identical images,
annotations and parquet shards; only ``dataset.json`` has a date.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gankd_ray.data.records import FORMAT_VERSION, SPLITS, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.validate import DEFAULT_MAX_PIXELS, CleanImage, validate_image

ROWS_PER_SHARD = 256
# Row groups smaller than a shard let a rank read only the part of a file that holds its rows.
ROWS_PER_ROW_GROUP = 64
LOG_EVERY = 500

PARQUET_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("labels", pa.list_(pa.int32())),
        ("iscrowd", pa.list_(pa.bool_())),
    ]
)


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_dataset(
    out: str | Path,
    data: SourceData,
    rejections: Rejections,
    *,
    overwrite: bool = False,
    rows_per_shard: int = ROWS_PER_SHARD,
    log: Callable[[str], None] = stderr_log,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Validate ``data`` and write it as a prepared dataset at local folder ``out``.

    Args:
        out: destination folder; must be absent or empty, or with ``overwrite`` hold a prepared dataset.
        data: classes and per-split records from a source (iterables are consumed once).
        rejections: shared with the source; raises at the first invalid item unless dropping.
        rows_per_shard: maximum rows per parquet file.
        max_pixels: images with more pixels are invalid.

    Returns:
        The ``dataset.json`` content.

    Raises:
        DatasetError: invalid input, an empty split, or a non-empty ``out`` without ``overwrite``.
    """
    out = output_path(out)
    check_output_dir(out, overwrite)
    sweep_stale_staging(out)
    staging = _sibling(out, "partial")
    try:
        info = _write_all(staging, data, rejections, rows_per_shard, log, max_pixels)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def output_path(out: str | Path) -> Path:
    """``out`` made absolute with ``.`` and ``..`` resolved, so its name and parent are real ones."""
    return Path(os.path.abspath(out))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) when ``out`` holds something and ``overwrite`` is off, or when
    ``overwrite`` would replace a folder that is not a prepared dataset (``--out . --overwrite``)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: output path exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DatasetError(f"{out}: output directory exists and is not empty; pass --overwrite to replace it")
    if not holds_prepared_dataset(out):
        raise DatasetError(
            f"{out}: not a prepared dataset (no valid dataset.json); --overwrite only replaces a prepared dataset "
            "or an empty folder"
        )


def holds_prepared_dataset(folder: Path) -> bool:
    """Whether ``folder/dataset.json`` is one that this writer wrote."""
    try:
        info = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and info.get("format_version") == FORMAT_VERSION and "splits" in info


def sweep_stale_staging(out: Path) -> None:
    """Remove the staging folders of ``out`` left by processes that are gone (killed by SIGKILL, a crash).

    A stale ``.old`` folder holds the dataset that was being replaced: it is put back when ``out`` is
    missing (the process died between the two renames), else removed.
    """
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}\.(partial|old)")
    for folder in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(folder.name)
        if not match or not folder.is_dir() or _process_alive(int(match.group(1))):
            continue
        previous = folder / "old"
        if match.group(2) == "old" and previous.is_dir() and not out.exists():
            os.rename(previous, out)
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an id we cannot ask about): leave its folder alone
    return True


def _write_all(
    staging: Path,
    data: SourceData,
    rejections: Rejections,
    rows_per_shard: int,
    log: Callable[[str], None],
    max_pixels: int,
) -> dict[str, Any]:
    missing = [split for split in SPLITS if split not in data.splits]
    if missing:
        raise DatasetError(f"{data.source}: split {missing[0]!r} is empty")
    builder = _SplitWriter(staging, data, rejections, rows_per_shard, log, max_pixels)
    split_counts = {split: builder.write(split) for split in SPLITS}
    info = {
        "format_version": FORMAT_VERSION,
        "source": data.source,
        "classes": list(data.classes),
        "splits": split_counts,
        "inputs_sha256": _inputs_sha256(data.inputs_digest, builder.image_digests),
        "dropped": {"images": rejections.images, "annotations": rejections.annotations},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # A plain write: the whole staging folder becomes visible at once, and mkstemp's 0600 mode
    # (atomic_write_json) would hide dataset.json from other users of a shared dataset.
    (staging / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


class _SplitWriter:
    """Writes one split at a time; keeps what must be unique or summed over the whole dataset."""

    def __init__(
        self,
        staging: Path,
        data: SourceData,
        rejections: Rejections,
        rows_per_shard: int,
        log: Callable[[str], None],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.staging = staging
        self.max_pixels = max_pixels
        self.data = data
        self.rejections = rejections
        self.rows_per_shard = rows_per_shard
        self.log = log
        self.seen_ids: dict[int, str] = {}
        self.image_digests: list[tuple[str, str]] = []
        self.last_annotation_id = 0

    def write(self, split: str) -> dict[str, int]:
        """Validate and write ``split``'s images, parquet shards and COCO file; returns its counts."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        seen_files: set[str] = set()
        shards = _ShardWriter(self.staging / "parquet" / split, self.rows_per_shard)
        boxes = crowd = 0
        for record in self.data.splits[split]:
            if not self._is_new(record, split, seen_files):
                continue
            image = validate_image(record, len(self.data.classes), self.rejections, self.max_pixels)
            if image is None:
                continue
            self.image_digests.append((image.file_name, hashlib.sha256(image.data).hexdigest()))
            _write_image_file(self.staging / "images" / split / image.file_name, image.data)
            shards.add(image)
            images.append(
                {"id": image.image_id, "file_name": image.file_name, "width": image.width, "height": image.height}
            )
            annotations.extend(self._coco_annotations(image))
            boxes += int((~image.iscrowd).sum())
            crowd += int(image.iscrowd.sum())
            if len(images) % LOG_EVERY == 0:
                self.log(f"{split}: {len(images)} images")
        shards.close()
        if not images:
            raise DatasetError(f"{self.data.source}: split {split!r} is empty (no valid images)")
        self._write_coco(split, images, annotations)
        self.log(f"{split}: {len(images)} images, {boxes} boxes, {crowd} ignore regions, {shards.files} shards")
        return {"images": len(images), "boxes": boxes, "crowd": crowd}

    def _is_new(self, record: ImageRecord, split: str, seen_files: set[str]) -> bool:
        """Image ids are unique over the dataset, file names within a split (they share one folder)."""
        if record.image_id in self.seen_ids:
            other = self.seen_ids[record.image_id]
            self.rejections.reject("image", f"{record.where()}: duplicate image id (also in {other})")
            return False
        if record.file_name in seen_files:
            self.rejections.reject(
                "image", f"{record.where()}: duplicate file name {record.file_name!r} in split {split}"
            )
            return False
        self.seen_ids[record.image_id] = record.origin
        seen_files.add(record.file_name)
        return True

    def _coco_annotations(self, image: CleanImage) -> list[dict[str, Any]]:
        """COCO ``bbox`` is ``[x, y, w, h]``; 3 decimals keep the file small and below float32 noise."""
        annotations = []
        for box, label, crowd, area in zip(image.boxes, image.labels, image.iscrowd, image.areas):
            self.last_annotation_id += 1
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": self.last_annotation_id,
                    "image_id": image.image_id,
                    "category_id": int(label),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "area": round(float(area), 3),
                    "iscrowd": int(crowd),
                }
            )
        return annotations

    def _write_coco(self, split: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> None:
        classes = self.data.classes
        coco = {
            "info": {"description": f"gankd-ray prepared {self.data.source} dataset, split {split}"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": name, "supercategory": ""} for k, name in enumerate(classes, start=1)],
        }
        (self.staging / "annotations").mkdir(exist_ok=True)
        (self.staging / "annotations" / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def _write_image_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class _ShardWriter:
    """Buffers rows and writes ``part-00000.parquet``, ``part-00001.parquet``... of at most ``rows_per_shard``."""

    def __init__(self, folder: Path, rows_per_shard: int) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard}: must be >= 1")
        self.folder = folder
        self.rows_per_shard = rows_per_shard
        self.rows: list[CleanImage] = []
        self.files = 0

    def add(self, image: CleanImage) -> None:
        self.rows.append(image)
        if len(self.rows) >= self.rows_per_shard:
            self._flush()

    def close(self) -> None:
        if self.rows:
            self._flush()

    def _flush(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = self.rows
        table = pa.table(
            {
                "image_id": [r.image_id for r in rows],
                "file_name": [r.file_name for r in rows],
                "width": [r.width for r in rows],
                "height": [r.height for r in rows],
                "image": [r.data for r in rows],
                "boxes": [r.boxes.astype(np.float32).tolist() for r in rows],
                "labels": [r.labels.tolist() for r in rows],
                "iscrowd": [r.iscrowd.tolist() for r in rows],
            },
            schema=PARQUET_SCHEMA,
        )
        pq.write_table(
            table,
            self.folder / f"part-{self.files:05d}.parquet",
            row_group_size=ROWS_PER_ROW_GROUP,
            # Image bytes are already compressed (PNG/JPEG) and dwarf the other columns: a codec would
            # cost time and save nothing.
            compression="none",
            # Min/max of image bytes would bloat the footer; ids are enough for inspection.
            write_statistics=["image_id"],
        )
        self.files += 1
        self.rows = []


def _inputs_sha256(inputs_digest: str, image_digests: list[tuple[str, str]]) -> str:
    """Digest of the non-image inputs and every valid image, independent of the split assignment."""
    total = hashlib.sha256(inputs_digest.encode())
    for name, digest in sorted(image_digests):
        total.update(f"\n{name}\t{digest}".encode())
    return total.hexdigest()


def _sibling(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` (same filesystem, so renames are atomic).

    ``mkdir`` rather than ``mkdtemp``: the folder becomes the dataset, so it takes the umask's
    permissions, not mkdtemp's owner-only 0700.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"
    folder.mkdir()
    return folder


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` (empty, or with --overwrite) is removed after."""
    if not out.exists():
        os.rename(staging, out)
        return
    trash = _sibling(out, "old")
    os.rename(out, trash / "old")
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(trash / "old", out)  # put the previous dataset back
        trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)
