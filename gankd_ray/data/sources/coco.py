"""An existing COCO detection file (or one file per split) and its image folder.

- Category ids are remapped to ``1..K`` in the order of the input ids; names are kept.
- ``bbox`` ``[x, y, w, h]`` becomes xyxy; ``area`` is kept where plausible (a segmentation area is
  smaller than its box) and recomputed from the box where missing, non-positive or larger than the box.
- ``iscrowd`` is kept (an ignore region); it must be 0 or 1 (or false/true): anything else is an invalid
  annotation, never read as a truth value. Segmentations are not carried over (boxes only).
- Image ids are kept; they must be integers (not booleans), unique over all split files and fit in 64 bits.

Splits: one ``--annotations`` file is cut by ``--val-fraction``/``--test-fraction``. With split
files (``--train-annotations`` and optionally ``--val-annotations``/``--test-annotations``), a split
without a file is cut from the train file by its fraction (e.g. COCO 2017: train2017 gives train and
val, val2017 is kept as test).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from gankd_ray.data.records import SPLITS, Annotation, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.sources import DatasetSource, register_source
from gankd_ray.data.sources.common import add_fraction_arguments, files_digest, split_by_fraction
from gankd_ray.utils import first_line, short_repr


def coco_source_data(
    annotation_files: dict[str, str | Path],
    image_dirs: dict[str, str | Path],
    rejections: Rejections,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> SourceData:
    """Records from COCO files.

    Args:
        annotation_files: ``{"all": file}`` (cut by fractions) or ``{"train": file, ...}`` (split files).
        image_dirs: the folder ``file_name`` is relative to, per key of ``annotation_files``.
    """
    files = {key: Path(path) for key, path in annotation_files.items()}
    documents = {key: _read(path) for key, path in files.items()}
    first_key = next(iter(files))
    categories = _category_map(documents[first_key], files[first_key])
    for key in files:
        if _category_map(documents[key], files[key]) != categories:
            raise DatasetError(f"{files[key]}: categories differ from those of {files[first_key]}")
    id_map = {old: new for new, old in enumerate(sorted(categories), start=1)}
    records = {key: _records(documents[key], files[key], Path(image_dirs[key]), id_map, rejections) for key in files}
    return SourceData(
        source="coco",
        classes=[categories[old] for old in sorted(categories)],
        splits=_assign_splits(records, val_fraction, test_fraction, seed),
        inputs_digest=files_digest(list(files.values()), _common_root(files.values())),
    )


def _assign_splits(
    records: dict[str, list[ImageRecord]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[ImageRecord]]:
    if "all" in records:
        return split_by_fraction(records["all"], val_fraction, test_fraction, seed)
    if "train" not in records:
        raise DatasetError("coco: split files need at least --train-annotations")
    carved = split_by_fraction(
        records["train"],
        0.0 if "val" in records else val_fraction,
        0.0 if "test" in records else test_fraction,
        seed,
    )
    return {
        "train": carved["train"],
        "val": records.get("val", carved["val"]),
        "test": records.get("test", carved["test"]),
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a COCO annotation file") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the annotation file ({err.strerror or first_line(err)})") from None
    except RecursionError:
        raise DatasetError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise DatasetError(f"{path}: invalid JSON: {first_line(err)}") from None
    if not isinstance(document, dict) or not all(
        isinstance(document.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(f"{path}: not a COCO detection file (needs images, annotations and categories lists)")
    return document


def _category_map(document: dict[str, Any], path: Path) -> dict[int, str]:
    """Input category id -> name."""
    categories: dict[int, str] = {}
    for category in document["categories"]:
        cat_id = category.get("id") if isinstance(category, dict) else None
        if not _is_integer(cat_id):
            raise DatasetError(f"{path}: category {short_repr(category)} has no integer id")
        if cat_id in categories:
            raise DatasetError(f"{path}: category {cat_id}: duplicate category id")
        categories[cat_id] = str(category.get("name", cat_id))
    if not categories:
        raise DatasetError(f"{path}: no categories")
    return categories


def _records(
    document: dict[str, Any], path: Path, image_dir: Path, id_map: dict[int, int], rejections: Rejections
) -> list[ImageRecord]:
    records: dict[int, ImageRecord] = {}
    for image in document["images"]:
        record = _image_record(image, path, image_dir, rejections)
        if record is None:
            continue
        if record.image_id in records:
            rejections.reject("image", f"{record.where()}: duplicate image id")
            continue
        records[record.image_id] = record
    seen_annotations: set[Any] = set()
    for annotation in document["annotations"]:
        ann_id = annotation.get("id") if isinstance(annotation, dict) else None
        where = f"{path}: annotation {short_repr(ann_id)}"
        if not _is_integer(ann_id):
            rejections.reject("annotation", f"{where}: missing or non-integer annotation id")
            continue
        if ann_id in seen_annotations:
            rejections.reject("annotation", f"{where}: duplicate annotation id")
            continue
        seen_annotations.add(ann_id)
        _attach(annotation, where, records, id_map, rejections)
    return [records[image_id] for image_id in sorted(records)]


def _image_record(image: Any, path: Path, image_dir: Path, rejections: Rejections) -> ImageRecord | None:
    image_id = image.get("id") if isinstance(image, dict) else None
    if not _is_integer(image_id) or not isinstance(image.get("file_name"), str):
        rejections.reject("image", f"{path}: image {short_repr(image_id)}: needs an integer id and a file_name")
        return None
    width, height = image.get("width"), image.get("height")
    for name, value in (("width", width), ("height", height)):
        # An absent size is read from the image; a present one must be a whole number.
        if value is not None and not (_is_integer(value) or (isinstance(value, float) and value.is_integer())):
            rejections.reject(
                "image", f"{path}: image {short_repr(image_id)}: {name} {short_repr(value)} is not an integer"
            )
            return None
    return ImageRecord(
        image_id=image_id,
        file_name=image["file_name"],
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        origin=str(path),
        path=image_dir / image["file_name"],
    )


def _attach(
    annotation: dict[str, Any],
    where: str,
    records: dict[int, ImageRecord],
    id_map: dict[int, int],
    rejections: Rejections,
) -> None:
    """Append one COCO annotation to its image's record, or reject it."""
    image_id = annotation.get("image_id")
    # Booleans are ints to Python (True == 1): an image_id of true must not land on image 1.
    if not _is_integer(image_id) or image_id not in records:
        rejections.reject("annotation", f"{where}: image {short_repr(image_id)} is not in the file (or was rejected)")
        return
    category = annotation.get("category_id")
    if not _is_integer(category) or category not in id_map:
        rejections.reject("annotation", f"{where}: image {image_id}: unknown category {short_repr(category)}")
        return
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        rejections.reject("annotation", f"{where}: image {image_id}: bbox {short_repr(bbox)} is not 4 numbers")
        return
    iscrowd = annotation.get("iscrowd", 0)
    if iscrowd not in (0, 1) or not isinstance(iscrowd, (int, bool)):
        rejections.reject("annotation", f"{where}: image {image_id}: iscrowd {short_repr(iscrowd)} must be 0 or 1")
        return
    x, y, w, h = (_float(v) for v in bbox)
    area = annotation.get("area")
    records[image_id].annotations.append(
        Annotation(
            box=(x, y, x + w, y + h),
            category_id=id_map[category],
            iscrowd=bool(iscrowd),
            area=_float(area) if _is_number(area) else None,
            source_id=annotation["id"],
        )
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float(value: int | float) -> float:
    """``float(value)``, infinite for an integer too large for a float (the validator rejects it by name)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _common_root(paths: Any) -> Path:
    parents = [Path(p).absolute().parent for p in paths]
    root = parents[0]
    while not all(root == p or root in p.parents for p in parents):
        root = root.parent
    return root


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder that the files' file_name entries are relative to")
    parser.add_argument("--annotations", help="one COCO file, cut into splits by the fractions")
    for split in SPLITS:
        parser.add_argument(f"--{split}-annotations", help=f"COCO file of the {split} split (instead of --annotations)")
        parser.add_argument(f"--{split}-images", help=f"image folder of the {split} file (default --images)")
    add_fraction_arguments(parser)


def _load(args: argparse.Namespace, rejections: Rejections) -> SourceData:
    split_files = {
        split: getattr(args, f"{split}_annotations") for split in SPLITS if getattr(args, f"{split}_annotations")
    }
    if bool(args.annotations) == bool(split_files):
        raise DatasetError(
            "coco: give either --annotations or --train-annotations [--val-annotations --test-annotations]"
        )
    files = {"all": args.annotations} if args.annotations else split_files
    image_dirs = {key: getattr(args, f"{key}_images", None) or args.images for key in files}
    return coco_source_data(
        files, image_dirs, rejections, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed
    )


register_source(
    DatasetSource(
        name="coco", help="an existing COCO detection file and its images", add_arguments=_add_arguments, load=_load
    )
)
