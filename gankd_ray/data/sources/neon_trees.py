"""NEON tree crowns: real aerial RGB scenes (10 cm pixels) with hand-drawn crown boxes.

Input: the ``deepforest==2.1.0`` wheel from PyPI (MIT licence), fetched with ``pip download
--no-deps`` into a cache and checked against its sha256; it is opened as a zip and only
``deepforest/data/*`` is read (deepforest itself is never installed). Every image there with a Pascal
VOC XML beside it (same stem) is a scene; in 2.1.0 these are two Yellowstone crops (2299x2472 px with
574 crowns, 1249x1035 px with 279), OSBS_029 (400x400, 61) and SOAP_061 (400x400, 37). The CSV files
in the wheel repeat (subsets of) the same boxes and are not read. An XML's ``<filename>`` is ignored
(OSBS_029.xml names a GeoTIFF): the image is the XML's stem with ``.png``/``.jpg``/``.jpeg``.

Classes: one, ``Tree``. SOAP_061 labels crown *health* (``Alive``/``Dead``) on 37 boxes while the
other 914 are plain ``Tree``, so both map to ``Tree``; any other label is an invalid annotation.
Coordinates: the XMLs are VOC-style 1-based inclusive pixels (values run from 1 to the image size), so
they become ``(xmin - 1, ymin - 1, xmax, ymax)`` like every VOC input (see ``voc.py``).

Tiling (``--tile T``, 0 = none): each axis of length ``L`` is cut into ``n = max(1, round(L / T))``
equal parts (edges at ``round(i * L / n)``), so tiles are disjoint, cover the whole scene and are
about ``T`` px (between ``0.75 T`` and ``1.25 T`` once ``L >= 1.5 T``; a scene up to ``1.5 T`` is one
tile) with no thin edge strips. A box is clipped to each tile it touches and kept there only when at
least ``--min-visible`` of its area lies inside (a sliver of a crown is not a crown). Tiles without a
box are dropped. A scene that stays one tile keeps its original, unchanged file; cut tiles are
lossless PNG named ``<scene>_x<left>_y<top>.png`` (the tile's offset in the scene).

Split by region, deterministic, so no scene pixel is on both sides (tiles are disjoint, so no two
tiles of different splits overlap): in a scene with at least 3 tiles, its tiles in row-major order
(top to bottom, left to right) give the first ~70 % to train, the next 15 % to val and the last 15 %
to test (at least one each): horizontal bands, train at the top and test at the bottom. Scenes of
1-2 tiles are not cut: each whole scene, in name order, goes to the split furthest below its 70/15/15
share of tiles (an empty split first). Crowns on a band boundary are clipped into both bands (or
dropped as slivers), the one thing neighbouring splits share.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from gankd_ray import wheels
from gankd_ray.data.records import SPLITS, Annotation, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.sources import DatasetSource, register_source
from gankd_ray.data.sources.voc import parse_voc_object, voc_size_field
from gankd_ray.data.validate import BOX_TOLERANCE_PX
from gankd_ray.data.writer import stderr_log
from gankd_ray.utils import first_line

DEEPFOREST_WHEEL = wheels.PinnedWheel(
    package="deepforest",
    version="2.1.0",
    sha256="8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54",
)
DATA_PREFIX = "deepforest/data/"
CLASSES = ("Tree",)
LABELS = {"Tree": "Tree", "Alive": "Tree", "Dead": "Tree"}  # SOAP_061's health labels are crowns too
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
SPLIT_SHARES = {"train": 0.70, "val": 0.15, "test": 0.15}
DEFAULT_TILE = 400
DEFAULT_MIN_VISIBLE = 0.5
MIN_TILE = 64
# Bumped whenever tiling or splitting changes, so inputs_sha256 tells the two datasets apart.
PREPARATION_VERSION = 1

Box = tuple[float, float, float, float]


@dataclass
class Scene:
    """One annotated image of the wheel.

    Attributes:
        name: the image's stem (``OSBS_029``); scenes are handled in name order.
        origin: ``<wheel>:<xml member>``, for messages.
        suffix: the image file's suffix (``.png``).
        data: the encoded image file, unchanged.
        boxes: xyxy in scene pixels (0-based edges), clipped to the scene.
        source_ids: ``<name>#<object index in the XML>`` per box, for messages.
    """

    name: str
    origin: str
    suffix: str
    data: bytes
    width: int
    height: int
    boxes: list[Box]
    source_ids: list[str]
    _pixels: Image.Image | None = field(default=None, repr=False, compare=False)

    def pixels(self) -> Image.Image:
        """The decoded RGB image, decoded once (a 15 MB PNG per tile would dominate the run time)."""
        if self._pixels is None:
            with Image.open(io.BytesIO(self.data)) as image:
                self._pixels = image.convert("RGB")
        return self._pixels


@dataclass(frozen=True, eq=False)
class Tile:
    """A rectangle ``[x0, x1) x [y0, y1)`` of a scene with its boxes in tile pixels."""

    scene: Scene
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    boxes: tuple[Box, ...]
    source_ids: tuple[str, ...]

    @property
    def is_whole_scene(self) -> bool:
        return (self.x0, self.y0, self.x1, self.y1) == (0, 0, self.scene.width, self.scene.height)

    def file_name(self) -> str:
        if self.is_whole_scene:
            return f"{self.scene.name}_x0_y0{self.scene.suffix.lower()}"
        return f"{self.scene.name}_x{self.x0}_y{self.y0}.png"


# --------------------------------------------------------------------------------------------
# the whole conversion


def neon_source_data(
    files: Mapping[str, bytes],
    rejections: Rejections,
    *,
    origin: str = "deepforest",
    tile: int = DEFAULT_TILE,
    min_visible: float = DEFAULT_MIN_VISIBLE,
    log: Callable[[str], None] = stderr_log,
) -> SourceData:
    """Tiled, region-split records of every annotated image in ``files``.

    Args:
        files: ``{name: bytes}`` of one folder (``deepforest/data/`` without the prefix).
        origin: where ``files`` come from (the wheel's name), for messages.
        tile: target tile size in px; 0 keeps scenes whole.
        min_visible: share of a box's area that must lie in a tile for the tile to keep it.
    """
    check_options(tile, min_visible)
    scenes = read_scenes(files, origin, rejections)
    tiles = [t for scene in scenes for t in tile_scene(scene, tile, min_visible)]
    splits = split_by_region(tiles)
    log(
        f"neon-trees: {len(scenes)} scenes, {sum(len(s.boxes) for s in scenes)} boxes -> {len(tiles)} tiles with "
        f"{sum(len(t.boxes) for t in tiles)} boxes (tile {tile or 'none'}, min visible {min_visible})"
    )
    return SourceData(
        source="neon-trees",
        classes=list(CLASSES),
        splits=_records(splits),
        inputs_digest=_inputs_digest(files, tile, min_visible),
    )


def check_options(tile: int, min_visible: float) -> None:
    if tile != 0 and tile < MIN_TILE:
        raise DatasetError(f"neon-trees: --tile {tile}: must be 0 (no tiling) or >= {MIN_TILE}")
    if not 0 < min_visible <= 1:
        raise DatasetError(f"neon-trees: --min-visible {min_visible}: must be in (0, 1]")


def _records(splits: dict[str, list[Tile]]) -> dict[str, list[ImageRecord]]:
    """Image ids ``1..N`` in scene-name, then row-major order, whatever the split."""
    order = sorted((t for tiles in splits.values() for t in tiles), key=lambda t: (t.scene.name, t.row, t.col))
    ids = {t: image_id for image_id, t in enumerate(order, start=1)}  # identity-hashed (eq=False)
    return {split: [_record(t, ids[t]) for t in tiles] for split, tiles in splits.items()}


def _record(tile: Tile, image_id: int) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        file_name=tile.file_name(),
        width=tile.x1 - tile.x0,
        height=tile.y1 - tile.y0,
        origin=f"{tile.scene.origin} tile x{tile.x0} y{tile.y0}",
        annotations=[
            Annotation(box=box, category_id=1, source_id=sid) for box, sid in zip(tile.boxes, tile.source_ids)
        ],
        data=tile.scene.data if tile.is_whole_scene else _crop_png(tile),
    )


def _crop_png(tile: Tile) -> bytes:
    """The tile as PNG with fixed settings and no metadata (byte-identical for the same input)."""
    crop = tile.scene.pixels().crop((tile.x0, tile.y0, tile.x1, tile.y1))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _inputs_digest(files: Mapping[str, bytes], tile: int, min_visible: float) -> str:
    """sha256 of the XML files and every parameter that changes the output."""
    total = hashlib.sha256()
    params = {"version": PREPARATION_VERSION, "tile": tile, "min_visible": min_visible, "labels": LABELS}
    total.update(json.dumps(params, sort_keys=True).encode())
    for name in sorted(n for n in files if n.endswith(".xml")):
        total.update(f"\n{name}\t{hashlib.sha256(files[name]).hexdigest()}".encode())
    return total.hexdigest()


# --------------------------------------------------------------------------------------------
# scenes


def read_scenes(files: Mapping[str, bytes], origin: str, rejections: Rejections) -> list[Scene]:
    """Every image with a VOC XML of the same stem, in name order; invalid ones go to ``rejections``."""
    xml_names = sorted(name for name in files if name.endswith(".xml"))
    scenes = [_scene(name, files, f"{origin}:{name}", rejections) for name in xml_names]
    found = [scene for scene in scenes if scene is not None]
    if not found:
        raise DatasetError(f"{origin}: no annotated images (image + VOC .xml) found")
    return found


def _scene(xml_name: str, files: Mapping[str, bytes], origin: str, rejections: Rejections) -> Scene | None:
    stem = PurePosixPath(xml_name).stem
    image_name = next((stem + s for s in IMAGE_SUFFIXES if stem + s in files), None)
    try:
        tree = ET.fromstring(files[xml_name])
    except ET.ParseError as err:
        rejections.reject("image", f"{origin}: unreadable annotation XML ({err})")
        return None
    if image_name is None:
        rejections.reject("image", f"{origin}: no image {stem}{{{','.join(IMAGE_SUFFIXES[:3])}}} beside it")
        return None
    try:
        with Image.open(io.BytesIO(files[image_name])) as image:
            width, height = image.size
    except Exception as err:  # PIL raises several types for corrupt files
        rejections.reject("image", f"{origin}: {image_name}: corrupt or unsupported image ({first_line(err)})")
        return None
    declared = (voc_size_field(tree, "width"), voc_size_field(tree, "height"))
    if None not in declared and declared != (width, height):
        size = f"{declared[0]}x{declared[1]}"
        rejections.reject("image", f"{origin}: declared size {size} but {image_name} is {width}x{height}")
        return None
    scene = Scene(stem, origin, PurePosixPath(image_name).suffix, files[image_name], width, height, [], [])
    for index, node in enumerate(tree.findall("object")):
        obj = parse_voc_object(node)
        problem = obj.problem or _label_problem(obj.name) or _box_problem(obj.box, width, height)
        if problem:
            rejections.reject("annotation", f"{origin}: object #{index}: {problem}")
            continue
        scene.boxes.append(_clip(obj.box, (0, 0, width, height)))
        scene.source_ids.append(f"{stem}#{index}")
    return scene


def _label_problem(name: str) -> str:
    return "" if name in LABELS else f"unknown class {name!r} (expected one of {', '.join(LABELS)})"


def _box_problem(box: Box, width: int, height: int) -> str:
    """Why ``box`` is unusable in a ``width x height`` scene ("" when it is fine)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return f"degenerate box {list(box)} (needs x2 > x1 and y2 > y1)"
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return f"box {list(box)} lies outside the {width}x{height} image"
    return ""


# --------------------------------------------------------------------------------------------
# tiling


def tile_edges(length: int, tile: int) -> list[int]:
    """Cut points ``0 = e_0 < ... < e_n = length`` of ``n = max(1, round(length / tile))`` equal parts.

    ``tile == 0`` gives one part; ``round`` takes halves to even (1000 px at 400 is two parts).
    """
    parts = max(1, round(length / tile)) if tile else 1
    return [round(i * length / parts) for i in range(parts + 1)]


def tile_scene(scene: Scene, tile: int, min_visible: float) -> list[Tile]:
    """The scene's tiles that keep at least one box, in row-major order."""
    xs, ys = tile_edges(scene.width, tile), tile_edges(scene.height, tile)
    tiles = []
    for row, (y0, y1) in enumerate(zip(ys, ys[1:])):
        for col, (x0, x1) in enumerate(zip(xs, xs[1:])):
            clipped = [clip_box(box, (x0, y0, x1, y1), min_visible) for box in scene.boxes]
            kept = [(box, sid) for box, sid in zip(clipped, scene.source_ids) if box is not None]
            if kept:
                boxes, ids = zip(*kept)
                tiles.append(Tile(scene, row, col, x0, y0, x1, y1, boxes, ids))
    return tiles


def clip_box(box: Box, rect: tuple[int, int, int, int], min_visible: float) -> Box | None:
    """``box`` clipped to ``rect`` (both scene xyxy) in rect-local pixels; None for a sliver.

    A sliver shows less than ``min_visible`` of the box's area inside ``rect`` (or nothing at all).
    """
    x1, y1, x2, y2 = _clip(box, rect)
    if x2 <= x1 or y2 <= y1:
        return None
    area = (box[2] - box[0]) * (box[3] - box[1])
    if (x2 - x1) * (y2 - y1) < min_visible * area:
        return None
    return x1 - rect[0], y1 - rect[1], x2 - rect[0], y2 - rect[1]


def _clip(box: Box, rect: tuple[float, float, float, float]) -> Box:
    """Intersection of two xyxy rectangles (may be empty: x2 <= x1)."""
    return max(box[0], rect[0]), max(box[1], rect[1]), min(box[2], rect[2]), min(box[3], rect[3])


# --------------------------------------------------------------------------------------------
# split by region


def split_by_region(tiles: list[Tile]) -> dict[str, list[Tile]]:
    """Train/val/test by the rule in the module docstring; every split non-empty.

    Args:
        tiles: tiles that keep boxes, grouped by scene and in row-major order within each scene.

    Raises:
        DatasetError: fewer than 3 tiles, or scenes too few to give every split one.
    """
    by_scene: dict[str, list[Tile]] = {}
    for t in tiles:
        by_scene.setdefault(t.scene.name, []).append(t)
    splits: dict[str, list[Tile]] = {split: [] for split in SPLITS}
    small = []
    for name in sorted(by_scene):
        scene_tiles = by_scene[name]
        if len(scene_tiles) < 3:
            small.append(scene_tiles)
            continue
        for split, part in _cut_scene(scene_tiles).items():
            splits[split].extend(part)
    for scene_tiles in small:
        splits[_neediest_split(splits, len(scene_tiles))].extend(scene_tiles)
    empty = [split for split in SPLITS if not splits[split]]
    if empty:
        raise DatasetError(
            f"neon-trees: {len(tiles)} tiles with boxes in {len(by_scene)} scenes leave split {empty[0]!r} empty; "
            "use a smaller --tile"
        )
    return splits


def _cut_scene(tiles: list[Tile]) -> dict[str, list[Tile]]:
    """Row-major ``tiles`` (at least 3) cut into train (first), val, test (last) at 70/15/15."""
    num_test = max(1, round(len(tiles) * SPLIT_SHARES["test"]))
    num_val = max(1, round(len(tiles) * SPLIT_SHARES["val"]))
    num_train = len(tiles) - num_val - num_test
    return {
        "train": tiles[:num_train],
        "val": tiles[num_train : num_train + num_val],
        "test": tiles[num_train + num_val :],
    }


def _neediest_split(splits: dict[str, list[Tile]], adding: int) -> str:
    """An empty split if any (in SPLITS order), else the one furthest below its share once ``adding`` more exist."""
    for split in SPLITS:
        if not splits[split]:
            return split
    total = sum(len(tiles) for tiles in splits.values()) + adding
    return max(SPLITS, key=lambda split: SPLIT_SHARES[split] * total - len(splits[split]))


# --------------------------------------------------------------------------------------------
# the wheel and the CLI


def deepforest_data_files(
    wheel: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, dict[str, bytes]]:
    """The verified deepforest wheel (``wheel``, else cached/downloaded) and its ``deepforest/data/*`` files.

    Raises:
        DatasetError: the wheel is missing, not the pinned one (sha256), or cannot be fetched.
    """
    try:
        if wheel is not None:
            path = Path(wheel)
            if not path.is_file():
                raise DatasetError(f"{path}: wheel file not found")
            wheels.check_sha256(path, DEEPFOREST_WHEEL.sha256)
        else:
            path = wheels.cached_wheel(DEEPFOREST_WHEEL, cache_dir)
        members = wheels.read_wheel_members(path, DATA_PREFIX)
    except wheels.WheelError as err:
        raise DatasetError(f"{err} ({DEEPFOREST_WHEEL.requirement})") from None
    return path, {name[len(DATA_PREFIX) :]: data for name, data in members.items()}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help=f"cut scenes into tiles of about this many px, 0 = keep them whole (default {DEFAULT_TILE})",
    )
    parser.add_argument(
        "--min-visible",
        type=float,
        default=DEFAULT_MIN_VISIBLE,
        help="keep a clipped box in a tile only if this share of its area is inside (default 0.5)",
    )
    parser.add_argument(
        "--wheel", default=None, help=f"use this {DEEPFOREST_WHEEL.requirement} wheel file instead of downloading it"
    )
    parser.add_argument("--cache", default=None, help=f"wheel cache folder (default {wheels.default_cache_dir()})")


def _load(args: argparse.Namespace, rejections: Rejections) -> SourceData:
    check_options(args.tile, args.min_visible)  # before any download
    wheel, files = deepforest_data_files(args.wheel, args.cache)
    stderr_log(f"neon-trees: reading {DATA_PREFIX}* from {wheel}")
    return neon_source_data(files, rejections, origin=wheel.name, tile=args.tile, min_visible=args.min_visible)


register_source(
    DatasetSource(
        name="neon-trees",
        help=(
            "NEON tree crowns (real aerial RGB, one class Tree; Alive/Dead map to Tree) from the "
            "deepforest==2.1.0 wheel, tiled and split by region"
        ),
        add_arguments=_add_arguments,
        load=_load,
    )
)
