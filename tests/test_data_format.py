"""Prepared-dataset format: parquet round trip, rank shares, URIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gankd_ray.data import SPLITS, count_rows, rank_range, read_dataset_info, read_split
from gankd_ray.data.records import DatasetError


def _coco_boxes(root: Path, split: str) -> dict[int, list[tuple[tuple[float, ...], int, bool]]]:
    coco = json.loads((root / "annotations" / f"{split}.json").read_text())
    boxes: dict[int, list] = {image["id"]: [] for image in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append(((x, y, x + w, y + h), a["category_id"], bool(a["iscrowd"])))
    return boxes


@pytest.mark.parametrize("split", SPLITS)
def test_parquet_rows_keep_every_box_of_the_coco_file(synthetic_data: str, split: str) -> None:
    root = Path(synthetic_data)
    expected = _coco_boxes(root, split)
    rows = read_split(synthetic_data, split)
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["image_id"]]
        assert row["boxes"].dtype == np.float32 and row["boxes"].shape == (len(want), 4)
        np.testing.assert_allclose(row["boxes"], [b for b, _, _ in want], atol=1e-3)
        assert row["labels"].tolist() == [label for _, label, _ in want]
        assert row["iscrowd"].tolist() == [crowd for _, _, crowd in want]
        assert row["image"] == (root / "images" / split / row["file_name"]).read_bytes()
        assert (row["width"], row["height"]) == (160, 160)
    assert sum(len(r["boxes"]) for r in rows) == read_dataset_info(synthetic_data)["splits"][split]["boxes"]


def test_shards_are_bounded_and_the_schema_is_the_documented_one(synthetic_data: str) -> None:
    files = sorted((Path(synthetic_data) / "parquet" / "train").glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [20, 20, 8]
    schema = pq.read_schema(files[0])
    assert str(schema.field("boxes").type) == "list<element: fixed_size_list<element: float>[4]>"
    assert [schema.field(n).type.__str__() for n in ("image_id", "width", "labels", "iscrowd")] == [
        "int64",
        "int32",
        "list<element: int32>",
        "list<element: bool>",
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shares_are_disjoint_and_cover_the_split_once(synthetic_data: str, world_size: int) -> None:
    every_id = [r["image_id"] for r in read_split(synthetic_data, "train")]
    shares = [
        [r["image_id"] for r in read_split(synthetic_data, "train", rank, world_size)] for rank in range(world_size)
    ]
    assert sorted(i for share in shares for i in share) == sorted(every_id)
    assert len(set(every_id)) == len(every_id) == 48
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_rank_ranges_tile_any_row_count() -> None:
    for rows in (0, 1, 5, 48, 257):
        for world_size in (1, 2, 3, 7):
            ranges = [rank_range(rows, r, world_size) for r in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        rank_range(10, 2, 2)


def test_reads_through_a_filesystem_uri(synthetic_data: str) -> None:
    uri = Path(synthetic_data).as_uri()  # file:///...
    assert uri.startswith("file://")
    assert count_rows(uri, "val") == 16
    assert [r["image_id"] for r in read_split(uri, "val", 1, 2)] == [
        r["image_id"] for r in read_split(synthetic_data, "val", 1, 2)
    ]
    assert read_dataset_info(uri)["classes"] == read_dataset_info(synthetic_data)["classes"]


def test_a_folder_that_is_not_a_prepared_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset_info(str(tmp_path))
    with pytest.raises(DatasetError, match="no parquet shards"):
        read_split(str(tmp_path), "train")
