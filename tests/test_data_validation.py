"""Bad inputs fail before anything trains: one line naming file and id, exit code 2, no DIR left."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_data_coco import coco_input
from test_data_voc import write_voc

PREPARE = Path(__file__).resolve().parents[1] / "launch" / "prepare_data.py"
NAN, INF = float("nan"), float("inf")


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *args], capture_output=True, text=True, timeout=120)


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    """A mutation ``data[key][index][field] = value`` of the COCO input."""
    key, index, field = path.split(".")

    def mutate(data: dict[str, Any], root: Path) -> None:
        data[key][int(index)][field] = value

    return mutate


def _append_annotation(**fields: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(data: dict[str, Any], root: Path) -> None:
        data["annotations"].append(
            {"id": 999, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0, **fields}
        )

    return mutate


def _delete_image_file(data: dict[str, Any], root: Path) -> None:
    (root / "images" / "img2.png").unlink()


def _truncate_image_file(data: dict[str, Any], root: Path) -> None:
    path = root / "images" / "img3.png"
    path.write_bytes(path.read_bytes()[:200])


# case -> (mutation of the valid input, pattern the one-line message must match; {file} = the COCO file)
BAD_COCO_INPUTS: dict[str, tuple[Callable[[dict[str, Any], Path], None], str]] = {
    "non-positive width": (_set("images.0.width", 0), r"{file}: image 1 .*non-positive"),
    "negative height": (_set("images.1.height", -48), r"{file}: image 2 .*non-positive"),
    "size differs from the file": (
        _set("images.0.width", 65),
        r"{file}: image 1 .*declared size 65x48 but the image is 64x48",
    ),
    "NaN coordinate": (
        _set("annotations.0.bbox", [NAN, 6, 20, 10]),
        r"{file}: image 1: annotation 10: .*NaN or infinite",
    ),
    "infinite coordinate": (
        _set("annotations.2.bbox", [4, 6, INF, 10]),
        r"{file}: image 2: annotation 20: .*NaN or infinite",
    ),
    "box outside the image": (
        _set("annotations.1.bbox", [50, 20, 20, 8]),
        r"{file}: image 1: annotation 11: .*outside the 64x48 image",
    ),
    "degenerate box": (_set("annotations.3.bbox", [30, 20, 0, 8]), r"{file}: image 2: annotation 21: degenerate box"),
    "annotation of a missing image": (
        _append_annotation(image_id=77),
        r"{file}: annotation 999: image 77 is not in the file",
    ),
    "unknown category": (_append_annotation(category_id=42), r"{file}: annotation 999: image 1: unknown category 42"),
    "missing image file": (_delete_image_file, r"{file}: image 2 \('img2.png'\): image file .*img2.png is missing"),
    "corrupt image file": (_truncate_image_file, r"{file}: image 3 \('img3.png'\): corrupt or unsupported image file"),
    "duplicate image id": (_set("images.1.id", 1), r"{file}: image 1: duplicate image id"),
    "duplicate annotation id": (_set("annotations.1.id", 10), r"{file}: annotation 10: duplicate annotation id"),
    "file name escaping the folder": (
        _set("images.0.file_name", "../img1.png"),
        r"{file}: image 1 .*plain relative path",
    ),
}


def _prepare_bad_input(
    root: Path, mutate: Callable[[dict[str, Any], Path], None], num_images: int = 6
) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    data = coco_input(root, num_images=num_images)
    mutate(data, root)
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(data))  # NaN/Infinity literals are what Python writes
    return annotation_file, root / "out" / "prepared"


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    leftovers = list(out.parent.glob(f".{out.name}.*")) if out.parent.exists() else []
    assert leftovers == []


def _error_line(stderr: str) -> str:
    """The one ``error:`` line, which ends stderr (progress lines may come before it)."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr
    return lines[-1]


@pytest.fixture(scope="module")
def bad_coco_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    """Every bad COCO input through the CLI, the processes run side by side to save wall time."""
    started = {}
    for index, (case, (mutate, _)) in enumerate(BAD_COCO_INPUTS.items()):
        root = tmp_path_factory.mktemp(f"bad{index}")
        annotation_file, out = _prepare_bad_input(root, mutate)
        command = [
            sys.executable,
            str(PREPARE),
            "coco",
            "--images",
            str(root / "images"),
            "--annotations",
            str(annotation_file),
            "--out",
            str(out),
        ]
        started[case] = (
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            annotation_file,
            out,
        )
    runs = {}
    for case, (process, annotation_file, out) in started.items():
        stdout, stderr = process.communicate(timeout=120)
        runs[case] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            annotation_file,
            out,
        )
    return runs


@pytest.mark.parametrize("case", list(BAD_COCO_INPUTS))
def test_each_bad_coco_input_fails_with_its_message_and_exit_code_2(bad_coco_runs: dict, case: str) -> None:
    done, annotation_file, out = bad_coco_runs[case]
    assert done.returncode == 2, done.stderr
    line = _error_line(done.stderr)
    assert re.search(BAD_COCO_INPUTS[case][1].format(file=re.escape(str(annotation_file))), line), line
    _assert_nothing_left(out)


def test_a_voc_coordinate_that_is_not_a_number_names_the_xml_file(tmp_path: Path) -> None:
    voc = write_voc(tmp_path / "voc")
    xml = voc / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<xmax>60</xmax>", "<xmax>sixty</xmax>"))
    out = tmp_path / "prepared"
    done = run_prepare(
        "voc", "--voc-root", str(voc), "--out", str(out), "--val-fraction", "0.25", "--test-fraction", "0.25"
    )
    assert done.returncode == 2
    assert _error_line(done.stderr) == f"error: {xml}: image 2: object #0: xmax is missing or not a number ('sixty')"
    _assert_nothing_left(out)


def test_an_empty_split_is_an_error(tmp_path: Path) -> None:
    annotation_file, out = _prepare_bad_input(tmp_path, lambda data, root: None)
    done = run_prepare(
        "coco",
        "--images",
        str(tmp_path / "images"),
        "--annotations",
        str(annotation_file),
        "--out",
        str(out),
        "--val-fraction",
        "0",
    )
    assert done.returncode == 2 and "split 'val' is empty" in _error_line(done.stderr)
    _assert_nothing_left(out)


def test_drop_invalid_drops_and_reports_the_count(tmp_path: Path) -> None:
    def several_problems(data: dict[str, Any], root: Path) -> None:
        data["annotations"][0]["bbox"] = [NAN, 6, 20, 10]
        data["annotations"][3]["category_id"] = 42
        _truncate_image_file(data, root)  # image 3 and its 2 annotations go

    annotation_file, out = _prepare_bad_input(tmp_path, several_problems, num_images=10)
    done = run_prepare(
        "coco",
        "--images",
        str(tmp_path / "images"),
        "--annotations",
        str(annotation_file),
        "--out",
        str(out),
        "--drop-invalid",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("dropped 1 invalid images and 2 invalid annotations")
    assert done.stderr.count("dropped: ") == 3
    counts = json.loads((out / "dataset.json").read_text())
    assert counts["dropped"] == {"images": 1, "annotations": 2}
    assert sum(s["images"] for s in counts["splits"].values()) == 9
    assert sum(s["boxes"] for s in counts["splits"].values()) == 20 - 2 - 2


def test_a_box_overhanging_by_less_than_a_pixel_is_clipped_not_rejected(tmp_path: Path) -> None:
    annotation_file, out = _prepare_bad_input(tmp_path, _set("annotations.1.bbox", [50, 20, 14.6, 8]))  # x2 = 64.6
    done = run_prepare(
        "coco", "--images", str(tmp_path / "images"), "--annotations", str(annotation_file), "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    boxes = [
        a["bbox"]
        for s in ("train", "val", "test")
        for a in json.loads((out / "annotations" / f"{s}.json").read_text())["annotations"]
        if a["image_id"] == 1
    ]
    assert [50.0, 20.0, 14.0, 8.0] in boxes


def test_a_non_empty_output_folder_is_refused_and_overwrite_replaces_only_a_dataset(tmp_path: Path) -> None:
    annotation_file, out = _prepare_bad_input(tmp_path, lambda data, root: None)
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    args = ("coco", "--images", str(tmp_path / "images"), "--annotations", str(annotation_file), "--out", str(out))
    refused = run_prepare(*args)
    assert refused.returncode == 2 and "not empty; pass --overwrite" in _error_line(refused.stderr)
    refused = run_prepare(*args, "--overwrite")  # a folder of the user's, not a dataset: never deleted
    assert refused.returncode == 2 and "not a prepared dataset" in _error_line(refused.stderr)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_prepare(*args).returncode == 0  # an empty folder is fine
    (out / "images" / "stale.png").write_bytes(b"old")
    replaced = run_prepare(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "images" / "stale.png").exists() and (out / "dataset.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]  # no staging or trash folder left
