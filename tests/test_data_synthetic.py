"""The generated dataset: deterministic, shape-defined classes, sane boxes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic_dataset
from PIL import Image

from gankd_ray.data import read_dataset_info
from gankd_ray.data.records import DatasetError
from gankd_ray.data.sources.synthetic import CLASSES, HARD, SyntheticSpec, render_image, synthetic_source_data

PREPARE = Path(__file__).resolve().parents[1] / "launch" / "prepare_data.py"
SMALL = SyntheticSpec(seed=0, num_train=12, num_val=4, num_test=4)


def _data_files(root: Path) -> dict[str, bytes]:
    """Every file except dataset.json (which carries a creation date): images, annotations, parquet."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "dataset.json"
    }


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = _data_files(make_synthetic_dataset(tmp_path / "a", SMALL, rows_per_shard=8))
    again = _data_files(make_synthetic_dataset(tmp_path / "b", SMALL, rows_per_shard=8))
    other = _data_files(
        make_synthetic_dataset(
            tmp_path / "c", SyntheticSpec(seed=1, num_train=12, num_val=4, num_test=4), rows_per_shard=8
        )
    )

    kinds = {name.split("/")[0] for name in first}
    assert kinds == {"images", "annotations", "parquet"}
    assert len(first) == 20 + 3 + 4  # images, COCO files, parquet shards (12 train rows = 8 + 4)
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.startswith(("images", "parquet")))

    info_a = read_dataset_info(str(tmp_path / "a"))
    info_b = read_dataset_info(str(tmp_path / "b"))
    info_c = read_dataset_info(str(tmp_path / "c"))
    assert info_a["inputs_sha256"] == info_b["inputs_sha256"] != info_c["inputs_sha256"]


def test_a_split_does_not_depend_on_the_size_of_another(tmp_path: Path) -> None:
    small = make_synthetic_dataset(tmp_path / "small", SMALL)
    bigger_train = make_synthetic_dataset(tmp_path / "big", SyntheticSpec(seed=0, num_train=20, num_val=4, num_test=4))
    for name in ("val_000000.png", "val_000003.png"):
        assert (small / "images" / "val" / name).read_bytes() == (bigger_train / "images" / "val" / name).read_bytes()


def test_classes_objects_and_boxes_follow_the_spec(synthetic_data: str) -> None:
    info = read_dataset_info(synthetic_data)
    assert info["source"] == "synthetic"
    assert info["classes"] == list(CLASSES)
    assert {s: c["images"] for s, c in info["splits"].items()} == {"train": 48, "val": 16, "test": 16}

    coco = json.loads((Path(synthetic_data) / "annotations" / "train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=49)[1:]
    assert 1 <= per_image.min() and per_image.max() <= 3  # the default 1-3 objects
    assert per_image.mean() > 1.7  # drawn uniformly from 1-3 (mean 2): placement rarely gives up
    assert set(a["category_id"] for a in coco["annotations"]) == set(range(1, len(CLASSES) + 1))
    # Extents 32-72 px; the box of a rotated shape can be up to ~1.4x its extent, a squashed one 0.7x.
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    assert sides.min() >= 22 and sides.max() <= 105 and np.ptp(sides) > 30  # varied scale
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 160 and w > 0 and h > 0
    with Image.open(Path(synthetic_data) / "images" / "train" / coco["images"][0]["file_name"]) as image:
        assert image.format == "PNG" and image.size == (160, 160) and image.mode == "RGB"


def test_colour_does_not_identify_the_class(synthetic_data: str) -> None:
    """The mean colour inside each box is spread alike for every class (shape, not colour, decides)."""
    root = Path(synthetic_data)
    coco = json.loads((root / "annotations" / "train.json").read_text())
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    colours: dict[int, list[np.ndarray]] = {}
    for annotation in coco["annotations"]:
        x, y, w, h = (int(round(v)) for v in annotation["bbox"])
        pixels = np.asarray(Image.open(root / "images" / "train" / files[annotation["image_id"]]))[y : y + h, x : x + w]
        colours.setdefault(annotation["category_id"], []).append(pixels.reshape(-1, 3).mean(axis=0))
    spreads = [np.std(np.stack(c), axis=0).mean() for c in colours.values()]
    assert min(spreads) > 25  # every class comes in many colours


def test_the_cli_writes_what_the_library_writes(tmp_path: Path) -> None:
    spec = SyntheticSpec(
        seed=5,
        image_size=96,
        num_train=4,
        num_val=2,
        num_test=2,
        min_objects=2,
        max_objects=4,
        min_object_px=20.0,
        max_object_px=60.0,
        min_distractors=1,
        max_distractors=2,
        min_lines=0,
        max_lines=1,
        background_contrast=0.5,
    )
    library = make_synthetic_dataset(tmp_path / "library", spec, rows_per_shard=256)
    done = subprocess.run(
        [
            sys.executable,
            str(PREPARE),
            "synthetic",
            "--out",
            str(tmp_path / "cli"),
            "--seed",
            "5",
            "--image-size",
            "96",
            "--num-train",
            "4",
            "--num-val",
            "2",
            "--num-test",
            "2",
            *("--objects", "2", "4", "--object-px", "20", "60", "--distractors", "1", "2"),
            *("--lines", "0", "1", "--background-contrast", "0.5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(
        f"prepared synthetic at {tmp_path / 'cli'}: 5 classes; train 4 images"
    )
    assert _data_files(tmp_path / "cli") == _data_files(library)


def _background_spread(spec: SyntheticSpec, images: int = 6) -> float:
    """Mean per-image std of the pixels outside every box (background, distractors, lines)."""
    spreads = []
    for index in range(images):
        png, annotations = render_image(np.random.default_rng([spec.seed, 0, index]), spec)
        pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for annotation in annotations:
            x1, y1, x2, y2 = (int(round(v)) for v in annotation.box)
            outside[y1:y2, x1:x2] = False
        spreads.append(float(pixels[outside].std(axis=0).mean()))
    return float(np.mean(spreads))


def test_difficulty_knobs_change_the_scene() -> None:
    """Defaults: flat background, no clutter (only pixel noise); the hard mix adds texture and clutter."""
    easy = _background_spread(SyntheticSpec())
    hard = _background_spread(SyntheticSpec(**HARD))
    assert easy < 10 < 30 < hard, (easy, hard)
    half = _background_spread(SyntheticSpec(background_contrast=0.5))
    assert easy < half < _background_spread(SyntheticSpec(background_contrast=1.0))


def test_hard_mix_still_gives_many_small_and_large_objects() -> None:
    spec = SyntheticSpec(**HARD)
    counts, sides = [], []
    for index in range(12):
        _, annotations = render_image(np.random.default_rng([0, 0, index]), spec)
        counts.append(len(annotations))
        sides.extend(max(a.box[2] - a.box[0], a.box[3] - a.box[1]) for a in annotations)
    assert max(counts) > 3 and min(sides) < 22 and max(sides) > 50


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"min_objects": 0}, "min_objects=0"),
        ({"min_object_px": 40.0, "max_object_px": 30.0}, "min_object_px=40.0, max_object_px=30.0"),
        ({"min_distractors": 3, "max_distractors": 1}, "min_distractors=3"),
        ({"min_lines": -1}, "min_lines=-1"),
        ({"background_contrast": 1.5}, "background_contrast=1.5"),
    ],
)
def test_out_of_range_parameters_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        synthetic_source_data(SyntheticSpec(**fields))


def test_the_cli_refuses_a_bad_range_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    done = subprocess.run(
        [sys.executable, str(PREPARE), "synthetic", "--out", str(out), "--num-train", "2", "--objects", "3", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    expected = "error: synthetic: min_objects=3, max_objects=1: need 1 <= min_objects <= max_objects"
    assert done.stderr.strip().splitlines() == [expected]
    assert not out.exists()
