"""The generated dataset: deterministic, shape-defined classes, sane boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import make_synthetic_dataset
from PIL import Image

from gankd_ray.data import read_dataset_info
from gankd_ray.data.sources.synthetic import CLASSES, SyntheticSpec

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
    assert 1 <= per_image.min() and per_image.max() <= 6
    assert per_image.mean() > 2.5  # placement rarely gives up: most images get their drawn count
    assert set(a["category_id"] for a in coco["annotations"]) == set(range(1, len(CLASSES) + 1))
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    assert sides.min() >= 10 and sides.max() <= 100 and np.ptp(sides) > 30  # varied scale
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
    spec = SyntheticSpec(seed=5, image_size=96, num_train=4, num_val=2, num_test=2)
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
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"prepared synthetic at {tmp_path / 'cli'}: 5 classes; train 4 images")
    assert _data_files(tmp_path / "cli") == _data_files(library)
