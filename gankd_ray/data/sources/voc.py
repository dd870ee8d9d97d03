"""Pascal VOC folders: ``Annotations/*.xml`` beside ``JPEGImages/``.

Coordinates: VOC numbers pixels from 1 and its ``xmax``/``ymax`` name the last pixel *inside* the
box, so pixel ``i`` covers the continuous span ``[i - 1, i)``. The prepared format uses 0-based
pixel edges, hence ``(xmin - 1, ymin - 1, xmax, ymax)``: a box over a whole ``W x H`` image,
``(1, 1, W, H)`` in VOC, becomes ``(0, 0, W, H)``. Files written 0-based (``xmin = 0``) land at
``-1``, within the validator's 1 px tolerance, and are clipped to 0.

Real files are tolerated: float coordinates, empty tags (``<difficult/>`` = 0; otherwise 0 or 1), a missing or empty
``<size>`` (read from the image) and a ``<filename>`` that does not match (the XML's stem is tried).
``difficult`` objects become ignore regions (``iscrowd``), not positives. Image ids are ``1..N`` in
the sorted order of the XML names; splits are drawn from them with ``--seed``.

A ``<filename>`` must be a plain relative path inside ``JPEGImages/`` (no ``..``, no absolute path, no
backslash or control character): anything else is an invalid image, never read from outside the dataset.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from gankd_ray.data.records import Annotation, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.sources import DatasetSource, register_source
from gankd_ray.data.sources.common import add_fraction_arguments, files_digest, split_by_fraction
from gankd_ray.data.validate import is_plain_relative_path
from gankd_ray.utils import short_repr

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
COORDINATES = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocObject:
    """One ``<object>``: its class name, 0-based xyxy box (see the module docstring) and ``difficult`` flag."""

    name: str
    box: tuple[float, float, float, float] | None  # None: a coordinate was missing or not a number
    difficult: bool
    problem: str = ""


@dataclass
class _VocFile:
    xml: Path
    image: Path
    named: str  # the <filename> text, checked before it is used
    width: int | None
    height: int | None
    objects: list[VocObject]


def voc_source_data(
    voc_root: str | Path,
    rejections: Rejections,
    *,
    classes: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> SourceData:
    """Records of every annotated image under ``voc_root``.

    Args:
        classes: class names in category-id order; ``None`` = sorted names found in the files.
            With a given list, objects of other classes are invalid annotations.
    """
    root = Path(voc_root)
    xml_paths = sorted((root / "Annotations").glob("*.xml"))
    if not xml_paths:
        raise DatasetError(f"{root / 'Annotations'}: no *.xml annotation files")
    parsed = [(path, _parse(path, root)) for path in xml_paths]
    if classes is None:
        classes = sorted({obj.name for _, voc in parsed if voc is not None for obj in voc.objects if obj.name})
    category_ids = {name: k for k, name in enumerate(classes, start=1)}
    records = []
    for image_id, (path, voc) in enumerate(parsed, start=1):
        if voc is None:
            rejections.reject("image", f"{path}: image {image_id}: unreadable annotation XML")
            continue
        if voc.named and not is_plain_relative_path(voc.named):
            rejections.reject(
                "image",
                f"{path}: image {image_id}: <filename> {short_repr(voc.named)} must be a "
                "plain relative path inside JPEGImages/",
            )
            continue
        records.append(_record(image_id, voc, category_ids, rejections))
    return SourceData(
        source="voc",
        classes=list(classes),
        splits=split_by_fraction(records, val_fraction, test_fraction, seed),
        inputs_digest=files_digest(xml_paths, root),
    )


def _parse(xml_path: Path, root: Path) -> _VocFile | None:
    """The XML's content, or None when it is not well-formed XML."""
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    named = (tree.findtext("filename") or "").strip()
    return _VocFile(
        xml=xml_path,
        image=_image_path(named, xml_path, root / "JPEGImages"),
        named=named,
        width=voc_size_field(tree, "width"),
        height=voc_size_field(tree, "height"),
        objects=[parse_voc_object(node) for node in tree.findall("object")],
    )


def _image_path(named: str, xml_path: Path, image_dir: Path) -> Path:
    if not is_plain_relative_path(named):
        named = ""  # never looked at outside image_dir (the caller rejects the image)
    if named and (image_dir / named).is_file():
        return image_dir / named
    for suffix in IMAGE_SUFFIXES:
        candidate = image_dir / f"{xml_path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    return image_dir / (named or f"{xml_path.stem}.jpg")  # missing: the validator reports it


def voc_size_field(tree: ET.Element, name: str) -> int | None:
    """``<size><width>``; None when the tag is absent, empty or not a number (then read from the image)."""
    text = (tree.findtext(f"size/{name}") or "").strip()
    try:
        return int(float(text)) if text else None
    except (ValueError, OverflowError):  # "abc", "nan"; "inf", "1e400"
        return None


def parse_voc_object(node: ET.Element) -> VocObject:
    """An ``<object>`` element; ``problem`` says why it is unusable (a coordinate missing or not a number)."""
    name = (node.findtext("name") or "").strip()
    difficult_text = (node.findtext("difficult") or "").strip()
    difficult = difficult_text == "1"
    if difficult_text not in ("", "0", "1"):  # "no" must not become an ignore region
        return VocObject(name, None, False, problem=f"difficult {short_repr(difficult_text)} must be 0 or 1")
    values = []
    for tag in COORDINATES:
        text = (node.findtext(f"bndbox/{tag}") or "").strip()
        try:
            values.append(float(text))
        except ValueError:
            return VocObject(name, None, difficult, problem=f"{tag} is missing or not a number ({short_repr(text)})")
    xmin, ymin, xmax, ymax = values
    return VocObject(name, (xmin - 1, ymin - 1, xmax, ymax), difficult)


def _record(image_id: int, voc: _VocFile, category_ids: dict[str, int], rejections: Rejections) -> ImageRecord:
    record = ImageRecord(
        image_id=image_id,
        file_name=voc.image.name,
        width=voc.width,
        height=voc.height,
        origin=str(voc.xml),
        path=voc.image,
    )
    for index, obj in enumerate(voc.objects):
        problem = _object_problem(obj, category_ids)
        if problem:
            rejections.reject("annotation", f"{record.where()}: object #{index}: {problem}")
            continue
        record.annotations.append(
            Annotation(box=obj.box, category_id=category_ids[obj.name], iscrowd=obj.difficult, source_id=f"#{index}")
        )
    return record


def _object_problem(obj: VocObject, category_ids: dict[str, int]) -> str:
    """Why ``obj`` cannot be used ("" when it can); box geometry is the validator's job."""
    if obj.problem:
        return obj.problem
    if not obj.name:
        return "object without a name"
    if obj.name not in category_ids:
        return f"unknown class {short_repr(obj.name)}"
    return ""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voc-root", required=True, help="folder holding Annotations/ and JPEGImages/")
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: the names found)")
    add_fraction_arguments(parser)


def _load(args: argparse.Namespace, rejections: Rejections) -> SourceData:
    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    return voc_source_data(
        args.voc_root,
        rejections,
        classes=classes,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )


register_source(
    DatasetSource(
        name="voc",
        help="Pascal VOC folders (Annotations/*.xml + JPEGImages/)",
        add_arguments=_add_arguments,
        load=_load,
    )
)
