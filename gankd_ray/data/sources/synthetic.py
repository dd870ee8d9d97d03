"""A generated detection set: shape classes on plain or textured backgrounds, with optional clutter.

Made to be the embedded default of the demo and the tests. The defaults are the *easy* setting that
a from-scratch student learns measurably in about a CPU minute while an ImageNet-pretrained teacher
gets far ahead (``bench/calibrate.py``: AP50 about 0.1 vs 0.85). The clutter knobs give back the
hard mix (``HARD``: ``--objects 1 6 --object-px 14 70 --distractors 2 7 --lines 1 3
--background-contrast 1``), on which the teacher still reaches AP50 about 0.5 in two CPU minutes
but a from-scratch student stays near 0 for many minutes.

- Five classes told apart by *shape* only: ``disc``, ``square``, ``triangle``, ``ring``, ``cross``.
  Every class draws its colour (and its two-tone stripe fill) from the same distribution.
- ``min_objects..max_objects`` objects per image (default 1-3), longer side about
  ``min_object_px..max_object_px`` (default 32-72 px at 160 px, scaled with the image size), aspect
  0.7-1.4, small rotations (any for triangles); partial occlusion, but every object keeps at least
  ``MIN_VISIBLE`` of its pixels.
- Distractors that are not classes (default none): hexagons and pentagons (disc-like), stars,
  crescents, arcs (ring-like), half discs, blobs; and thin lines, some drawn across the objects.
- Backgrounds: smooth colour noise, linear gradients or stripes, scaled about their mean colour by
  ``background_contrast`` (default 0: a flat colour); then a slight blur and pixel noise.

Boxes are the tight bounds of each object's whole shape, occluded part included (at least
``MIN_VISIBLE`` of it shows, so the extent stays inferable). Image ``i`` of a split is drawn from its
own generator seeded with ``(seed, split, i)``, so the output is byte-identical for a seed and a
split's images do not depend on the sizes of the other splits.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gankd_ray.data.records import SPLITS, Annotation, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.sources import DatasetSource, register_source

CLASSES = ("disc", "square", "triangle", "ring", "cross")
DISTRACTORS = ("hexagon", "pentagon", "star", "crescent", "arc", "half_disc", "blob")
# Bumped whenever the drawing changes, so inputs_sha256 tells datasets of two generator versions apart.
GENERATOR_VERSION = 2
MIN_VISIBLE = 0.6  # share of an object's pixels that must stay visible after occlusion
MAX_BOX_IOU = 0.5  # two objects' boxes overlap at most this much (keeps NMS from merging them)
MIN_COLOUR_DISTANCE = 110.0  # L1 over RGB between an object's colour and the background under it
PLACEMENT_TRIES = 25

Polygon = list[tuple[float, float]]

# The cluttered mix (generator version 1's defaults): ``SyntheticSpec(**HARD)``.
HARD = {
    "min_objects": 1,
    "max_objects": 6,
    "min_object_px": 14.0,
    "max_object_px": 70.0,
    "min_distractors": 2,
    "max_distractors": 7,
    "min_lines": 1,
    "max_lines": 3,
    "background_contrast": 1.0,
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters (all of them go into ``inputs_sha256``).

    Object sizes are given for 160 px images and scale with ``image_size``, so a larger image shows
    the same scene at a higher resolution.
    """

    seed: int = 0
    image_size: int = 160
    num_train: int = 512
    num_val: int = 128
    num_test: int = 128
    min_objects: int = 1
    max_objects: int = 3
    min_object_px: float = 32.0
    max_object_px: float = 72.0
    min_distractors: int = 0
    max_distractors: int = 0
    min_lines: int = 0
    max_lines: int = 0
    background_contrast: float = 0.0

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def object_px(self) -> tuple[float, float]:
        """(smallest, largest) object extent in pixels of this image size."""
        scale = self.image_size / 160
        return self.min_object_px * scale, self.max_object_px * scale


def synthetic_source_data(spec: SyntheticSpec) -> SourceData:
    """Lazy records for every split (images are drawn while the writer consumes them)."""
    check_spec(spec)
    params = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(spec)}, sort_keys=True)
    return SourceData(
        source="synthetic",
        classes=list(CLASSES),
        splits={split: _split_records(spec, split) for split in SPLITS},
        inputs_digest=hashlib.sha256(params.encode()).hexdigest(),
    )


def check_spec(spec: SyntheticSpec) -> None:
    """Raise ``DatasetError`` naming the first generator parameter out of range."""
    if spec.image_size < 64:
        raise DatasetError(f"synthetic: image size {spec.image_size} px is too small (>= 64)")
    for low, high, floor in (
        ("min_objects", "max_objects", 1),
        ("min_object_px", "max_object_px", 4),
        ("min_distractors", "max_distractors", 0),
        ("min_lines", "max_lines", 0),
    ):
        if getattr(spec, low) < floor or getattr(spec, high) < getattr(spec, low):
            raise DatasetError(
                f"synthetic: {low}={getattr(spec, low)}, {high}={getattr(spec, high)}: need {floor} <= {low} <= {high}"
            )
    if not 0.0 <= spec.background_contrast <= 1.0:
        raise DatasetError(f"synthetic: background_contrast={spec.background_contrast}: must be in [0, 1]")


def _split_records(spec: SyntheticSpec, split: str) -> Iterator[ImageRecord]:
    # Ids are unique over the dataset: train 1..N, then val, then test.
    first_id = 1 + sum(spec.count(s) for s in SPLITS[: SPLITS.index(split)])
    for index in range(spec.count(split)):
        rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
        png, annotations = render_image(rng, spec)
        yield ImageRecord(
            image_id=first_id + index,
            file_name=f"{split}_{index:06d}.png",
            width=spec.image_size,
            height=spec.image_size,
            origin="synthetic",
            annotations=annotations,
            data=png,
        )


def render_image(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[bytes, list[Annotation]]:
    """One PNG and its annotations (category ids ``1..5`` in ``CLASSES`` order)."""
    size = spec.image_size
    canvas = _background(rng, size, spec.background_contrast)
    for _ in range(rng.integers(spec.min_distractors, spec.max_distractors + 1)):
        _paint(canvas, _distractor_mask(rng, size, spec), rng)
    annotations = _place_objects(canvas, rng, spec)
    for _ in range(rng.integers(spec.min_lines, spec.max_lines + 1)):
        _paint(canvas, _line_mask(rng, size, width=int(rng.integers(1, 3))), rng)
    return _encode_png(canvas, rng), annotations


# --------------------------------------------------------------------------------------------
# objects


def _place_objects(canvas: np.ndarray, rng: np.random.Generator, spec: SyntheticSpec) -> list[Annotation]:
    """Draw the objects back to front; each new one may hide at most ``1 - MIN_VISIBLE`` of the others."""
    size = canvas.shape[0]
    owner = np.full((size, size), -1, dtype=np.int16)  # which object a pixel shows, -1 = none
    full_areas: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
        label = int(rng.integers(len(CLASSES)))
        for _ in range(PLACEMENT_TRIES):
            mask = _object_mask(rng, CLASSES[label], size, spec)
            box = _mask_box(mask)
            if box is not None and _fits(mask, box, owner, full_areas, boxes):
                owner[mask] = len(boxes)
                full_areas.append(int(mask.sum()))
                boxes.append(box)
                labels.append(label + 1)
                _paint(canvas, mask, rng)
                break
    return [Annotation(box=box, category_id=label) for box, label in zip(boxes, labels)]


def _fits(mask: np.ndarray, box: tuple[float, ...], owner: np.ndarray, full_areas: list[int], boxes: list) -> bool:
    if any(_box_iou(box, other) > MAX_BOX_IOU for other in boxes):
        return False
    for index, area in enumerate(full_areas):
        still_visible = np.count_nonzero((owner == index) & ~mask)
        if still_visible < MIN_VISIBLE * area:
            return False
    return True


def _object_mask(rng: np.random.Generator, kind: str, size: int, spec: SyntheticSpec) -> np.ndarray:
    # Log-uniform scale: as many small objects as large ones, the hard part for small students.
    smallest, largest = spec.object_px()
    extent = math.exp(rng.uniform(math.log(smallest), math.log(largest)))
    aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    width, height = extent * min(1.0, aspect), extent * min(1.0, 1 / aspect)
    angle = rng.uniform(0, 2 * math.pi) if kind == "triangle" else rng.uniform(-0.45, 0.45)
    margin = extent / 2
    centre = rng.uniform(margin, size - margin, size=2) if size > extent else np.array([size / 2, size / 2])
    layers = _shape_layers(kind, rng)
    placed = [(_transform(points, width, height, angle, centre), fill) for points, fill in layers]
    return _rasterise(size, placed)


def _shape_layers(kind: str, rng: np.random.Generator) -> list[tuple[Polygon, bool]]:
    """Polygons in the unit box ``[-1, 1]^2``; ``True`` adds pixels, ``False`` cuts a hole."""
    if kind == "disc":
        return [(_ellipse(), True)]
    if kind == "square":
        return [([(-1, -1), (1, -1), (1, 1), (-1, 1)], True)]
    if kind == "triangle":
        return [([(0, -1), (1, 1), (-1, 1)], True)]
    if kind == "ring":
        hole = rng.uniform(0.45, 0.7)
        return [(_ellipse(), True), (_ellipse(hole), False)]
    if kind == "cross":
        arm = rng.uniform(0.28, 0.42)
        return [
            ([(-arm, -1), (arm, -1), (arm, 1), (-arm, 1)], True),
            ([(-1, -arm), (1, -arm), (1, arm), (-1, arm)], True),
        ]
    raise ValueError(f"unknown shape {kind!r}")


# --------------------------------------------------------------------------------------------
# clutter


def _distractor_mask(rng: np.random.Generator, size: int, spec: SyntheticSpec) -> np.ndarray:
    kind = DISTRACTORS[rng.integers(len(DISTRACTORS))]
    smallest, largest = spec.object_px()
    extent = math.exp(rng.uniform(math.log(smallest * 0.8), math.log(largest)))
    centre = rng.uniform(0, size, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    layers = _distractor_layers(kind, rng)
    placed = [(_transform(points, extent, extent, angle, centre), fill) for points, fill in layers]
    return _rasterise(size, placed)


def _distractor_layers(kind: str, rng: np.random.Generator) -> list[tuple[Polygon, bool]]:
    if kind in ("hexagon", "pentagon"):
        return [(_regular_polygon(6 if kind == "hexagon" else 5), True)]
    if kind == "star":
        return [(_star(points=5, inner=rng.uniform(0.35, 0.55)), True)]
    if kind == "crescent":
        offset = rng.uniform(0.35, 0.6)
        return [(_ellipse(), True), ([(x + offset, y) for x, y in _ellipse()], False)]
    if kind == "arc":
        return [(_arc(rng.uniform(0.6, 1.4) * math.pi, inner=rng.uniform(0.5, 0.7)), True)]
    if kind == "half_disc":
        return [(_arc(math.pi, inner=0.0), True)]
    radii = rng.uniform(0.45, 1.0, size=11)  # blob: a lumpy polygon
    return [
        (
            [
                (r * math.cos(a), r * math.sin(a))
                for r, a in zip(radii, np.linspace(0, 2 * math.pi, 11, endpoint=False))
            ],
            True,
        )
    ]


def _line_mask(rng: np.random.Generator, size: int, width: int) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    start, end = rng.uniform(0, size, size=2), rng.uniform(0, size, size=2)
    ImageDraw.Draw(image).line([tuple(start), tuple(end)], fill=255, width=width)
    return np.asarray(image) > 0


# --------------------------------------------------------------------------------------------
# geometry


def _ellipse(scale: float = 1.0, points: int = 40) -> Polygon:
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    return [(scale * math.cos(a), scale * math.sin(a)) for a in angles]


def _regular_polygon(sides: int) -> Polygon:
    return [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, sides, endpoint=False)]


def _star(points: int, inner: float) -> Polygon:
    angles = np.linspace(0, 2 * math.pi, 2 * points, endpoint=False)
    return [
        ((1 if i % 2 == 0 else inner) * math.cos(a), (1 if i % 2 == 0 else inner) * math.sin(a))
        for i, a in enumerate(angles)
    ]


def _arc(sweep: float, inner: float, points: int = 24) -> Polygon:
    angles = np.linspace(0, sweep, points)
    outer = [(math.cos(a), math.sin(a)) for a in angles]
    return outer + [(inner * math.cos(a), inner * math.sin(a)) for a in angles[::-1]]


def _transform(points: Polygon, width: float, height: float, angle: float, centre: np.ndarray) -> Polygon:
    """Scale the unit shape to ``width x height``, rotate by ``angle`` and move it to ``centre``."""
    cos, sin = math.cos(angle), math.sin(angle)
    out = []
    for x, y in points:
        x, y = x * width / 2, y * height / 2
        out.append((centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos))
    return out


def _rasterise(size: int, layers: list[tuple[Polygon, bool]]) -> np.ndarray:
    """Bool[size, size] pixels covered by the layers (later layers add or cut)."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for points, adds in layers:
        draw.polygon(points, fill=255 if adds else 0)
    return np.asarray(image) > 0


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight xyxy pixel-edge box of ``mask``, or None when (almost) nothing was drawn."""
    if np.count_nonzero(mask) < 20:  # a shape pushed almost entirely off the canvas
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------------------------
# colour


def _background(rng: np.random.Generator, size: int, contrast: float = 1.0) -> np.ndarray:
    """Float32[size, size, 3] in 0..255: smooth colour noise, a gradient or stripes.

    ``contrast`` scales the pattern about its mean colour (0 = flat, 1 = as drawn).
    """
    pattern = _background_pattern(rng, size)
    if contrast == 1.0:  # as drawn, bit for bit
        return pattern
    mean = pattern.mean(axis=(0, 1), keepdims=True)
    return (mean + (pattern - mean) * np.float32(contrast)).astype(np.float32)


def _background_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        cells = int(rng.integers(3, 10))
        coarse = Image.fromarray(rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8))
        return np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
    first, second = _random_colour(rng), _random_colour(rng)
    phase = _directional_coordinate(rng, size)
    if kind == 1:
        blend = (phase - phase.min()) / max(float(np.ptp(phase)), 1e-6)
    else:
        period = rng.uniform(6, 28)
        blend = 0.5 + 0.5 * np.sin(2 * math.pi * phase / period)
        second = first + (second - first) * rng.uniform(0.2, 0.6)  # stripes stay softer than objects
    return first + blend[..., None] * (second - first)


def _paint(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` with a colour far from the background under it, solid or in two-tone stripes."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    # Work inside the mask's bounding box: boolean indexing of the whole canvas dominated the run time.
    region = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    patch, inside = canvas[region], mask[region]
    under = patch[inside]
    colour = _contrasting_colour(rng, under)
    if rng.random() < 0.7:
        patch[inside] = colour
        return
    other = _contrasting_colour(rng, under)
    stripes = np.sin(2 * math.pi * _directional_coordinate(rng, canvas.shape[0])[region] / rng.uniform(3, 8)) > 0
    patch[inside & stripes] = colour
    patch[inside & ~stripes] = other


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour whose mean L1 distance to the pixels ``under`` (float[P, 3]) is at least ``MIN_COLOUR_DISTANCE``.

    Per pixel, not to their mean: on stripes, a colour far from the mean can match one stripe.
    """
    for _ in range(20):
        colour = _random_colour(rng)
        if np.abs(under - colour).sum(axis=1).mean() >= MIN_COLOUR_DISTANCE:
            return colour
    return 255.0 - under.mean(axis=0)  # the complement of the mean: the best a flat colour can do


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _directional_coordinate(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32[size, size]: distance along a random direction, in pixels."""
    angle = rng.uniform(0, math.pi)
    ys, xs = _pixel_grid(size)
    return xs * math.cos(angle) + ys * math.sin(angle)


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> np.ndarray:
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False  # shared between calls
    return grid


def _encode_png(canvas: np.ndarray, rng: np.random.Generator) -> bytes:
    """Blur, pixel noise, quantise; PNG with fixed settings and no metadata (byte-identical output)."""
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    # A 3x3 blur of random strength softens the drawn edges (a Gaussian blur cost 3x more here).
    centre = float(rng.uniform(4, 16))
    image = image.filter(ImageFilter.Kernel((3, 3), [1, 2, 1, 2, centre, 2, 1, 2, 1]))
    # Sensor-like noise, mostly in luminance: as hard for the detector, cheaper to compress than RGB noise.
    grain = rng.standard_normal(size=canvas.shape[:2] + (1,), dtype=np.float32) * rng.uniform(2, 8)
    noisy = np.asarray(image, dtype=np.float32) + grain
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# CLI


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SyntheticSpec()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="generator seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="square image size in px (default 160)"
    )
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="train images (default 512)")
    parser.add_argument("--num-val", type=int, default=defaults.num_val, help="val images (default 128)")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="test images (default 128)")
    difficulty = parser.add_argument_group("difficulty (ranges are inclusive; sizes are for 160 px images)")
    for flag, low, high, kind, what in (
        ("--objects", "min_objects", "max_objects", int, "objects per image"),
        ("--object-px", "min_object_px", "max_object_px", float, "object extent in px"),
        ("--distractors", "min_distractors", "max_distractors", int, "non-class shapes per image"),
        ("--lines", "min_lines", "max_lines", int, "thin lines per image"),
    ):
        lo, hi = getattr(defaults, low), getattr(defaults, high)
        difficulty.add_argument(
            flag, type=kind, nargs=2, metavar=("MIN", "MAX"), default=(lo, hi), help=f"{what} (default {lo:g} {hi:g})"
        )
    difficulty.add_argument(
        "--background-contrast",
        type=float,
        default=defaults.background_contrast,
        help="background pattern strength, 0 = flat colour (default 1)",
    )


def _load(args: argparse.Namespace, rejections: Rejections) -> SourceData:
    spec = SyntheticSpec(
        seed=args.seed,
        image_size=args.image_size,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        min_objects=args.objects[0],
        max_objects=args.objects[1],
        min_object_px=args.object_px[0],
        max_object_px=args.object_px[1],
        min_distractors=args.distractors[0],
        max_distractors=args.distractors[1],
        min_lines=args.lines[0],
        max_lines=args.lines[1],
        background_contrast=args.background_contrast,
    )
    return synthetic_source_data(spec)


register_source(
    DatasetSource(
        name="synthetic",
        help="generated shapes on cluttered backgrounds (the demo's and tests' default)",
        add_arguments=_add_arguments,
        load=_load,
    )
)
