"""COCO conversion: contiguous category ids, area repair, crowd flags, split files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from conftest import write_image

from gankd_ray.data import SPLITS, Rejections, read_dataset_info, read_split, write_dataset
from gankd_ray.data.sources.coco import coco_source_data


def coco_input(root: Path, num_images: int = 6, first_id: int = 1) -> dict[str, Any]:
    """A COCO dict over ``num_images`` 64x48 PNGs written under ``root/images``; categories 3, 7, 10."""
    images, annotations = [], []
    for index in range(num_images):
        image_id = first_id + index
        write_image(root / "images" / f"img{image_id}.png", 64, 48, seed=image_id)
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "width": 64, "height": 48})
        annotations.append(
            {
                "id": 10 * image_id,
                "image_id": image_id,
                "category_id": 7,
                "bbox": [4, 6, 20, 10],
                "area": 200.0,
                "iscrowd": 0,
            }
        )
        annotations.append(
            {"id": 10 * image_id + 1, "image_id": image_id, "category_id": 10, "bbox": [30.5, 20, 12, 8], "iscrowd": 0}
        )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def all_annotations(out: Path) -> list[dict[str, Any]]:
    return [
        a for split in SPLITS for a in json.loads((out / "annotations" / f"{split}.json").read_text())["annotations"]
    ]


def test_categories_become_contiguous_and_area_and_crowd_are_kept_or_repaired(tmp_path: Path) -> None:
    data = coco_input(tmp_path)
    data["annotations"][0]["area"] = 150.0  # a plausible segmentation area (< box area 200): kept
    data["annotations"][2]["area"] = 9999.0  # larger than its 20x10 box: recomputed
    data["annotations"][4]["area"] = -1  # impossible: recomputed
    data["annotations"][6]["iscrowd"] = 1
    source = coco_source_data(
        {"all": write_json(tmp_path / "in.json", data)}, {"all": tmp_path / "images"}, Rejections()
    )
    out = tmp_path / "out"
    write_dataset(out, source, Rejections(), log=lambda _: None)

    assert read_dataset_info(str(out))["classes"] == ["three", "seven", "ten"]  # input ids 3, 7, 10 -> 1, 2, 3
    by_box = {(a["image_id"], a["bbox"][0]): a for a in all_annotations(out)}
    assert by_box[(1, 4)]["category_id"] == 2 and by_box[(1, 30.5)]["category_id"] == 3
    assert by_box[(1, 4)]["area"] == 150.0
    assert by_box[(2, 4)]["area"] == 200.0
    assert by_box[(3, 4)]["area"] == 200.0
    assert by_box[(1, 30.5)]["area"] == 96.0  # missing: w * h
    assert by_box[(4, 4)]["iscrowd"] == 1 and sum(a["iscrowd"] for a in by_box.values()) == 1
    rows = {r["image_id"]: r for split in SPLITS for r in read_split(str(out), split)}
    np.testing.assert_allclose(rows[1]["boxes"], [[4, 6, 24, 16], [30.5, 20, 42.5, 28]])
    assert rows[4]["iscrowd"].tolist() == [True, False]
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # image ids kept


def test_split_files_keep_their_split_and_carve_the_missing_one_from_train(tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json", coco_input(tmp_path, num_images=8, first_id=1))
    val = write_json(tmp_path / "val.json", coco_input(tmp_path, num_images=3, first_id=100))
    source = coco_source_data(
        {"train": train, "val": val},
        {"train": tmp_path / "images", "val": tmp_path / "images"},
        Rejections(),
        test_fraction=0.25,
    )
    out = tmp_path / "out"
    write_dataset(out, source, Rejections(), log=lambda _: None)
    ids = {split: sorted(r["image_id"] for r in read_split(str(out), split)) for split in SPLITS}
    assert ids["val"] == [100, 101, 102]
    assert len(ids["test"]) == 2 and len(ids["train"]) == 6
    assert sorted(ids["train"] + ids["test"]) == list(range(1, 9))


def test_images_without_a_declared_size_take_it_from_the_file(tmp_path: Path) -> None:
    data = coco_input(tmp_path, num_images=3)
    del data["images"][0]["width"], data["images"][0]["height"]
    source = coco_source_data(
        {"all": write_json(tmp_path / "in.json", data)},
        {"all": tmp_path / "images"},
        Rejections(),
        val_fraction=0.3,
        test_fraction=0.3,
    )
    out = tmp_path / "out"
    write_dataset(out, source, Rejections(), log=lambda _: None)
    rows = {r["image_id"]: r for split in SPLITS for r in read_split(str(out), split)}
    assert (rows[1]["width"], rows[1]["height"]) == (64, 48)
