"""Pascal VOC conversion of real-world quirks: floats, empty tags, difficult, missing size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

from gankd_ray.data import SPLITS, DatasetError, Rejections, read_dataset_info, read_split
from gankd_ray.data.sources.voc import voc_source_data

REPO = Path(__file__).resolve().parents[1]

# name -> (image size, <size> element, objects as (name, xmin, ymin, xmax, ymax, difficult tag))
VOC_FILES = {
    "a": (
        (100, 80),
        "<size><width>100</width><height>80</height><depth>3</depth></size>",
        [
            ("cat", "10.5", "20", "50.5", "60", "<difficult>0</difficult>"),
            ("dog", "1", "1", "100", "80", "<difficult>1</difficult>"),
        ],
    ),
    "b": ((90, 70), "", [("dog", "30", "10.25", "60", "40.75", "<difficult/>")]),
    "c": ((64, 64), "<size><width></width><height></height></size>", [("cat", "5", "5", "20", "30", "")]),
    "d": (
        (50, 40),
        "<size><width>50</width><height>40</height></size>",
        [("cat", "0", "0", "50", "40", "<difficult></difficult>")],
    ),
}
# Expected 0-based boxes: (xmin - 1, ymin - 1, xmax, ymax); d's 0-based xmin=0 clips to 0.
EXPECTED = {
    "a": [((9.5, 19.0, 50.5, 60.0), "cat", False), ((0.0, 0.0, 100.0, 80.0), "dog", True)],
    "b": [((29.0, 9.25, 60.0, 40.75), "dog", False)],
    "c": [((4.0, 4.0, 20.0, 30.0), "cat", False)],
    "d": [((0.0, 0.0, 50.0, 40.0), "cat", False)],
}


def write_voc(root: Path) -> Path:
    for index, (stem, ((width, height), size_xml, objects)) in enumerate(VOC_FILES.items()):
        write_image(root / "JPEGImages" / f"{stem}.jpg", width, height, seed=index)
        # c's <filename> is wrong on purpose: the converter falls back to the XML's stem.
        filename = "wrong_name.jpg" if stem == "c" else f"{stem}.jpg"
        objects_xml = "".join(
            f"<object><name>{name}</name><pose/><truncated></truncated>{difficult}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, x1, y1, x2, y2, difficult in objects
        )
        xml = f"<annotation><folder>VOC</folder><filename>{filename}</filename>{size_xml}{objects_xml}</annotation>"
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    return root


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "prepare_data.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_voc_folder_converts_to_the_right_boxes_and_classes(tmp_path: Path) -> None:
    voc = write_voc(tmp_path / "voc")
    out = tmp_path / "prepared"
    done = run_prepare(
        "voc", "--voc-root", str(voc), "--out", str(out), "--val-fraction", "0.25", "--test-fraction", "0.25"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"prepared voc at {out}") and done.stdout.count("prepared voc") == 1

    info = read_dataset_info(str(out))
    assert info["classes"] == ["cat", "dog"]
    assert {split: c["images"] for split, c in info["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    rows = {row["file_name"]: row for split in SPLITS for row in read_split(str(out), split)}
    assert sorted(rows) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for stem, expected in EXPECTED.items():
        row = rows[f"{stem}.jpg"]
        assert (row["width"], row["height"]) == VOC_FILES[stem][0]
        np.testing.assert_allclose(row["boxes"], [box for box, _, _ in expected], atol=1e-4)
        assert [info["classes"][label - 1] for label in row["labels"]] == [name for _, name, _ in expected]
        assert row["iscrowd"].tolist() == [crowd for _, _, crowd in expected]


def test_difficult_objects_are_ignore_regions_in_the_coco_file(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    args = (
        "voc",
        "--voc-root",
        str(write_voc(tmp_path / "voc")),
        "--out",
        str(out),
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
    )
    assert run_prepare(*args).returncode == 0
    annotations = [
        a for split in SPLITS for a in json.loads((out / "annotations" / f"{split}.json").read_text())["annotations"]
    ]
    crowd = [a for a in annotations if a["iscrowd"]]
    assert len(annotations) == 5 and len(crowd) == 1
    assert crowd[0]["bbox"] == [0.0, 0.0, 100.0, 80.0] and crowd[0]["category_id"] == 2
    assert sum(counts["crowd"] for counts in read_dataset_info(str(out))["splits"].values()) == 1


def test_a_fixed_class_list_rejects_other_names(tmp_path: Path) -> None:
    voc = write_voc(tmp_path / "voc")
    with pytest.raises(DatasetError, match=r"a\.xml: image 1: object #1: unknown class 'dog'"):
        voc_source_data(voc, Rejections(), classes=["cat"])
    dropping = Rejections(drop_invalid=True)
    source = voc_source_data(voc, dropping, classes=["cat"])
    assert source.classes == ["cat"] and dropping.annotations == 2  # a's and b's dogs
