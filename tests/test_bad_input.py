"""The bad-input catalogue (issue 7): every bad input fails fast, clearly and cleanly, through the real CLIs.

Each case runs a CLI (``launch/search.py``, ``prepare_data.py``, ``evaluate.py``, ``predict.py``) as a
subprocess and must: exit 2; print exactly one short stderr line, ``error: ...``, that names the culprit
(file, key or value); finish within seconds and bounded memory; start no Ray (the one case that needs the
cluster aside); and leave its working folder exactly as it was (no partial output, no file of the user's
touched; every file a case points at lives in that folder). The cases run two at a time to save wall time.

Hostile input (issue 16) has its own cases: path traversal, aliases that expand to gigabytes, image bombs,
values that overflow or confuse types, an unauthenticated dashboard, a model folder whose TorchScript
writes files, a killed or SIGTERMed ``prepare_data``.

Then the cases that need more: per-trial resources the cluster can never hold (a real local Ray; exit 2,
nothing written), and storage on a real tmpfs that is full from the start (refused before Ray) or fills
up during training (exit 4, the error line last; marked slow).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_data_coco import coco_input
from test_data_voc import write_voc

ROOT = Path(__file__).resolve().parents[1]
CLIS = {name: ROOT / "launch" / f"{name}.py" for name in ("search", "train", "prepare_data", "evaluate", "predict")}
EXIT_BAD_INPUT = 2
EXIT_STORAGE_FULL = 4
# "Within seconds", measured as the CLI's own CPU time (imports and checks only; no training) so that a
# machine loaded by other work cannot fail it; the wall-clock bounds only catch hangs.
MAX_CPU_SECONDS = 20
MAX_WALL_SECONDS = 60
MAX_WALL_SECONDS_WITH_RAY = 120  # a local Ray starts in ~10 s, more on a loaded 2-core machine
MAX_RSS_MB = 1500  # torch and ray imported, no data loaded; a decoded image bomb or expanded YAML is far more
MAX_ERROR_CHARS = 600  # a path or two and a short echo of the value: never the user's whole input
PARALLEL = 2
SEARCH_OPTIONS = (
    "--storage",
    "{work}/runs",
    "--name",
    "bad",
    "--teacher-epochs",
    "1",
    "optim.batch_size=8",
    "data.loader_workers=0",
)
Setup = Callable[[Path, dict[str, str]], None]


@dataclass(frozen=True)
class Case:
    """One bad input. ``{names}`` in ``args`` and ``culprit`` are filled from the inputs and ``{work}``."""

    cli: str
    args: tuple[str, ...]
    culprit: tuple[str, ...]  # words the error line must contain
    setup: Setup | None = None  # writes the case's own files into its (otherwise empty) working folder
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables of the CLI


def search(*args: str, data: str = "{data}") -> tuple[str, ...]:
    return ("--data", data, *SEARCH_OPTIONS, *args)


def write_file(name: str, text: str) -> Setup:
    def setup(work: Path, inputs: dict[str, str]) -> None:
        (work / name).write_text(text)

    return setup


def bad_coco(mutate: Callable[[dict[str, Any], Path], None]) -> Setup:
    """A small valid COCO input in ``work/coco`` (6 PNGs, 64x48), then ``mutate(data, folder)``."""

    def setup(work: Path, inputs: dict[str, str]) -> None:
        folder = work / "coco"
        data = coco_input(folder)
        mutate(data, folder)
        (folder / "instances.json").write_text(json.dumps(data))

    return setup


def truncate_image(data: dict[str, Any], folder: Path) -> None:
    path = folder / "images" / "img3.png"
    path.write_bytes(path.read_bytes()[:200])


def box_outside_image(data: dict[str, Any], folder: Path) -> None:
    data["annotations"][1]["bbox"] = [50, 20, 20, 8]  # annotation 11 of image 1: x up to 70 in a 64 px image


def export_without(name: str) -> Setup:
    """A copy of the complete export at ``work/model``, less ``name``."""

    def setup(work: Path, inputs: dict[str, str]) -> None:
        shutil.copytree(inputs["export"], work / "model")
        (work / "model" / name).unlink()

    return setup


# hostile input (issue 16): setups


def write_files(**files: str | bytes) -> Setup:
    """Several files at once (``name=content``; ``__`` in a name stands for a ``/``)."""

    def setup(work: Path, inputs: dict[str, str]) -> None:
        for name, content in files.items():
            path = work / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def saved_search(mode: int | None = None, owner: int | None = None, **fields: Any) -> Setup:
    """A search experiment at ``work/runs/bad`` as ``--resume`` finds it (``search.yaml`` + Tune's pickle), then
    the pickle's mode or owner changed. ``fields``: request fields saved besides data and teacher."""

    def setup(work: Path, inputs: dict[str, str]) -> None:
        from gankd_ray.tune.request import SearchRequest

        folder = work / "runs" / "bad"
        (folder / "tune").mkdir(parents=True)
        request = SearchRequest(
            data=inputs["data"], teacher=inputs["teacher"], storage=str(work / "runs"), name="bad", **fields
        )
        (folder / "search.yaml").write_text(request.to_yaml())
        pickle = folder / "tune" / "tuner.pkl"
        pickle.write_bytes(b"never unpickled by a refused resume")
        if mode is not None:
            pickle.chmod(mode)
        if owner is not None:
            os.chown(pickle, owner, owner)  # the suite runs as root (CI too)

    return setup


RESUME = ("--storage", "{work}/runs", "--name", "bad", "--resume")


def both(*setups: Setup) -> Setup:
    def setup(work: Path, inputs: dict[str, str]) -> None:
        for one in setups:
            one(work, inputs)

    return setup


def set_field(key: str, index: int, field: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    """A COCO mutation: ``data[key][index][field] = value``."""

    def mutate(data: dict[str, Any], folder: Path) -> None:
        data[key][index][field] = value

    return mutate


def renumber_image_1(new_id: int) -> Callable[[dict[str, Any], Path], None]:
    """Image 1 and its two annotations get ``new_id`` (so only the id itself can be wrong)."""

    def mutate(data: dict[str, Any], folder: Path) -> None:
        data["images"][0]["id"] = new_id
        for annotation in data["annotations"][:2]:
            annotation["image_id"] = new_id

    return mutate


def replace_image(name: str, picture: Callable[[Path], None]) -> Callable[[dict[str, Any], Path], None]:
    """Image 2 becomes ``images/<name>``, written by ``picture(path)``."""

    def mutate(data: dict[str, Any], folder: Path) -> None:
        picture(folder / "images" / name)
        data["images"][1]["file_name"] = name

    return mutate


def sixteen_bit_png(path: Path) -> None:
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(path)  # PIL mode I;16


def float_tiff(path: Path) -> None:
    Image.fromarray(np.full((48, 64), 0.5, dtype=np.float32)).save(path)  # PIL mode F


def png_bomb(path: Path, side: int = 7000) -> None:
    """A valid all-black greyscale PNG of ``side x side`` pixels (49 megapixels in ~50 KB), streamed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def picture(name: str, write: Callable[[Path], None]) -> Setup:
    def setup(work: Path, inputs: dict[str, str]) -> None:
        write(work / name)

    return setup


def voc_with(filename: str = "a.jpg", difficult: str = "0") -> Setup:
    """The VOC set of test_data_voc in ``work/voc``; ``a.xml`` names ``filename`` (``{work}`` filled in) and its
    first object has ``<difficult>difficult</difficult>``. A valid image lies outside ``JPEGImages/`` to be read."""

    def setup(work: Path, inputs: dict[str, str]) -> None:
        root = write_voc(work / "voc")
        shutil.copy(root / "JPEGImages" / "b.jpg", work / "outside.jpg")
        shutil.copy(root / "JPEGImages" / "b.jpg", root / "outside.jpg")
        xml = root / "Annotations" / "a.xml"
        text = xml.read_text().replace(
            "<filename>a.jpg</filename>", f"<filename>{filename.format(work=work)}</filename>"
        )
        xml.write_text(text.replace("<difficult>0</difficult>", f"<difficult>{difficult}</difficult>", 1))

    return setup


def user_folder(name: str, files: dict[str, str]) -> Setup:
    return write_files(**{f"{name}__{file}": text for file, text in files.items()})


def nested_aliases(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to ``width ** levels`` values ("billion laughs")."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


def inline_aliases(levels: int = 5, width: int = 10) -> str:
    """The same as one flow sequence, for a ``key=value`` override."""
    items = [f"&a0 [{', '.join(['x'] * width)}]"]
    items += [f"&a{k} [{', '.join([f'*a{k - 1}'] * width)}]" for k in range(1, levels)]
    return "[" + ", ".join(items) + "]"


PREPARE_VOC = ("voc", "--voc-root", "{work}/voc", "--out", "{work}/prepared")
PREDICT = ("--model", "{export}", "--out", "{work}/predictions", "--images")
HUGE = 10**400  # an integer JSON accepts and float() cannot hold
NO_AUTH = (("RAY_AUTH_MODE", "disabled"),)


PREPARE_COCO = (
    "coco",
    "--images",
    "{work}/coco/images",
    "--annotations",
    "{work}/coco/instances.json",
    "--out",
    "{work}/prepared",
)
SPACE = ("--space", "{work}/space.yaml")

CASES: dict[str, Case] = {
    "space file: malformed YAML": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "invalid YAML"), write_file("space.yaml", "params: [1, 2")
    ),
    "space file: inverted range": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "params.adv_weight", "inverted range"),
        write_file("space.yaml", "params: {adv_weight: {type: loguniform, low: 2, high: 1}}"),
    ),
    "space file: levels the detector lacks": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "params.levels", "'level9'"),
        write_file("space.yaml", "params: {levels: {type: categorical, choices: [all, [level0, level9]]}}"),
    ),
    "config: levels the detector lacks": Case(
        "search", search("distill.levels=[level0,level9]"), ("distill.levels", "'level9'")
    ),
    "missing data path": Case("search", search(data="{work}/no_such_dataset"), ("--data", "{work}/no_such_dataset")),
    "teacher/data class mismatch": Case(
        "search", search("--teacher", "{teacher}", data="{three_classes}"), ("--teacher", "5 classes", "has 3")
    ),
    "teacher: weights of another architecture": Case(
        "search", search("--teacher", "{mismatched}"), ("{mismatched}", "do not match backbone 'resnet18'")
    ),
    "unknown backbone": Case("search", search("detector.backbone=nope_net"), ("detector.backbone", "nope_net")),
    "zero learning rate": Case("search", search("optim.lr=0"), ("optim.lr=0",)),
    "grace period beyond the budget": Case(
        "search", search("--max-epochs", "2", "--grace-period", "3"), ("--grace-period 3", "--max-epochs (2)")
    ),
    "one confirmation seed (no spread to judge by)": Case(
        "search", search("--confirm-seeds", "1"), ("--confirm-seeds 1", "at least 2")
    ),
    "negative learning rate (config file)": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("optim.lr=-0.001",),
        write_file("run.yaml", "optim: {lr: -0.001}\n"),
    ),
    "--resume of an unknown name": Case("search", search("--name", "nope", "--resume"), ("--resume", "'nope'")),
    "--resume from a folder others may write": Case(
        "search",
        RESUME,
        ("--resume", "{work}/runs/bad/tune/tuner.pkl", "writable by others", "refused"),
        saved_search(mode=0o666),
    ),
    "--resume from another user's folder": Case(
        "search", RESUME, ("--resume", "tuner.pkl", "belongs to uid 4242", "refused"), saved_search(owner=4242)
    ),
    "--resume of a search whose Optuna password was not saved": Case(
        "search",
        RESUME,
        ("--optuna-storage postgresql://gankd:***@db.example/study", "give --optuna-storage again"),
        saved_search(optuna_storage="postgresql://gankd:***@db.example/study"),
    ),
    "--optuna-storage env: of an unset variable": Case(
        "search",
        search("--optuna-storage", "env:GANKD_TEST_UNSET_DB"),
        ("--optuna-storage env:GANKD_TEST_UNSET_DB", "GANKD_TEST_UNSET_DB is not set"),
    ),
    "--optuna-storage file: that does not exist": Case(
        "search", search("--optuna-storage", "file:{work}/db-url.txt"), ("--optuna-storage file:", "cannot read")
    ),
    "--optuna-storage env: holding no URL": Case(
        "search",
        search("--optuna-storage", "env:GANKD_TEST_DB"),
        ("--optuna-storage env:GANKD_TEST_DB", "not a database URL"),
        env=(("GANKD_TEST_DB", "only-a-password"),),
    ),
    "storage under a file": Case(
        "search",
        search("--storage", "{work}/afile/runs"),
        ("--storage", "{work}/afile is not a folder"),
        write_file("afile", "not a folder"),
    ),
    "corrupt image": Case(
        "prepare_data", PREPARE_COCO, ("{work}/coco/instances.json", "img3.png", "corrupt"), bad_coco(truncate_image)
    ),
    "invalid box": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "annotation 11", "outside the 64x48 image"),
        bad_coco(box_outside_image),
    ),
    "export missing student.pt (evaluate)": Case(
        "evaluate",
        ("--model", "{work}/model", "--data", "{data}"),
        ("{work}/model", "missing student.pt"),
        export_without("student.pt"),
    ),
    "export missing student.ts (evaluate --torchscript)": Case(
        "evaluate",
        ("--model", "{work}/model", "--data", "{data}", "--torchscript"),
        ("{work}/model", "missing student.ts"),
        export_without("student.ts"),
    ),
    "export missing card.json (predict)": Case(
        "predict",
        ("--model", "{work}/model", "--images", "{image}", "--out", "{work}/predictions"),
        ("{work}/model", "missing card.json"),
        export_without("card.json"),
    ),
    # --- issue 16: hostile and careless input ---------------------------------------------------
    # traversal: a VOC <filename> is read from JPEGImages/ only; COCO file names the same
    **{
        f"VOC <filename> {name}": Case(
            "prepare_data",
            PREPARE_VOC,
            ("{work}/voc/Annotations/a.xml", "<filename>", "plain relative path"),
            voc_with(name),
        )
        for name in (
            "../outside.jpg",
            "../../outside.jpg",
            "{work}/outside.jpg",
            "sub/../../outside.jpg",
            "..\\outside.jpg",
        )
    },
    "COCO file_name absolute": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 1", "plain relative path"),
        bad_coco(set_field("images", 0, "file_name", "/etc/hostname")),
    ),
    "COCO file_name with a NUL byte": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 1", "x00", "plain relative path"),
        bad_coco(set_field("images", 0, "file_name", "img1.png\x00.txt")),
    ),
    "COCO file_name with a newline": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 1", "plain relative path"),
        bad_coco(set_field("images", 0, "file_name", "img1\n.png")),
    ),
    # --overwrite replaces only a prepared dataset (or an empty folder)
    "--overwrite of a user's folder": Case(
        "prepare_data",
        (*PREPARE_COCO[:-1], "{work}/mine", "--overwrite"),
        ("{work}/mine", "not a prepared dataset"),
        both(bad_coco(lambda d, f: None), user_folder("mine", {"notes.txt": "x"})),
    ),
    "--overwrite of the current folder": Case(
        "prepare_data",
        (*PREPARE_COCO[:-1], ".", "--overwrite"),
        ("{work}:", "not a prepared dataset"),
        bad_coco(lambda d, f: None),
    ),
    "--overwrite of a folder spelled with ..": Case(
        "prepare_data",
        (*PREPARE_COCO[:-1], "{work}/coco/images/..", "--overwrite"),
        ("{work}/coco:", "not a prepared dataset"),
        bad_coco(lambda d, f: None),
    ),
    "--overwrite of a folder with a foreign dataset.json": Case(
        "prepare_data",
        (*PREPARE_COCO[:-1], "{work}/mine", "--overwrite"),
        ("{work}/mine", "not a prepared dataset"),
        both(bad_coco(lambda d, f: None), user_folder("mine", {"dataset.json": '{"name": "my notes"}'})),
    ),
    # annotation files that are not files, or JSON that is too deep or too big
    "--annotations naming a folder": Case(
        "prepare_data",
        ("coco", "--images", "{work}/coco/images", "--annotations", "{work}/coco", "--out", "{work}/prepared"),
        ("{work}/coco", "is a folder"),
        bad_coco(lambda d, f: None),
    ),
    "deeply nested JSON": Case(
        "prepare_data",
        ("coco", "--images", "{work}", "--annotations", "{work}/deep.json", "--out", "{work}/out"),
        ("{work}/deep.json", "nested too deeply"),
        write_file("deep.json", "[" * 200_000 + "]" * 200_000),
    ),
    "JSON integer of 5000 digits": Case(
        "prepare_data",
        ("coco", "--images", "{work}", "--annotations", "{work}/big.json", "--out", "{work}/out"),
        ("{work}/big.json", "invalid JSON", "4300 digits"),
        write_file("big.json", '{"images": [' + "7" * 5000 + "]}"),
    ),
    # values that overflow
    "image id 2**63": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 9223372036854775808", "64 bits"),
        bad_coco(renumber_image_1(2**63)),
    ),
    "image id below -2**63": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "64 bits"),
        bad_coco(renumber_image_1(-(2**63) - 1)),
    ),
    "image id of 400 digits": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 1000", "64 bits"),
        bad_coco(renumber_image_1(HUGE)),
    ),
    "bbox value beyond float": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "annotation 10", "NaN or infinite"),
        bad_coco(set_field("annotations", 0, "bbox", [4, 6, HUGE, 10])),
    ),
    "width beyond float": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "image 1", "declared size 1000"),
        bad_coco(set_field("images", 0, "width", HUGE)),
    ),
    # silent coercions: refused, and the message says which value
    **{
        f"iscrowd {value!r}": Case(
            "prepare_data",
            PREPARE_COCO,
            ("{work}/coco/instances.json", "annotation 10", f"iscrowd {value!r}", "0 or 1"),
            bad_coco(set_field("annotations", 0, "iscrowd", value)),
        )
        for value in ("no", "1", 2, 0.5, None)
    },
    "annotation image_id true": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "annotation 10", "image True"),
        bad_coco(set_field("annotations", 0, "image_id", True)),
    ),
    "annotation category_id true": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "annotation 10", "unknown category True"),
        bad_coco(set_field("annotations", 0, "category_id", True)),
    ),
    "VOC difficult 'no'": Case(
        "prepare_data",
        PREPARE_VOC,
        ("{work}/voc/Annotations/a.xml", "object #0", "difficult 'no'", "0 or 1"),
        voc_with(difficult="no"),
    ),
    "16-bit image": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "img16.png", "'I;16'", "8 bits"),
        bad_coco(replace_image("img16.png", sixteen_bit_png)),
    ),
    "float image": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "float.tif", "'F'", "8 bits"),
        bad_coco(replace_image("float.tif", float_tiff)),
    ),
    # image bombs: refused from the header, never decoded
    "image bomb (49 megapixels)": Case(
        "prepare_data",
        PREPARE_COCO,
        ("{work}/coco/instances.json", "bomb.png", "7000x7000", "--max-pixels"),
        bad_coco(replace_image("bomb.png", png_bomb)),
    ),
    "image above a given --max-pixels": Case(
        "prepare_data",
        (*PREPARE_COCO, "--max-pixels", "1000"),
        ("{work}/coco/instances.json", "64x48", "above the limit of 1000"),
        bad_coco(lambda d, f: None),
    ),
    "predict: image bomb": Case(
        "predict",
        (*PREDICT, "{work}/bomb.png"),
        ("{work}/bomb.png", "7000x7000", "--max-pixels"),
        picture("bomb.png", png_bomb),
    ),
    "predict: 16-bit image": Case(
        "predict",
        (*PREDICT, "{image}", "{work}/deep.png"),
        ("{work}/deep.png", "'I;16'", "8 bits"),
        picture("deep.png", sixteen_bit_png),
    ),
    "predict: image above a given --max-pixels": Case(
        "predict", (*PREDICT, "{image}", "--max-pixels", "100"), ("{image}", "above the limit of 100")
    ),
    # YAML: aliases that expand to gigabytes, nesting, values too big to echo
    "space file: nested aliases": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "aliases expand to more than"),
        write_file("space.yaml", nested_aliases() + "params: {adv_weight: *a8}\n"),
    ),
    "config file: nested aliases": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("{work}/run.yaml", "aliases expand to more than"),
        write_file("run.yaml", nested_aliases() + "distill: {levels: *a8}\n"),
    ),
    "override: nested aliases": Case(
        "search", search("distill.levels=" + inline_aliases()), ("override", "distill.levels", "aliases expand")
    ),
    "config file: a recursive alias": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("{work}/run.yaml", "refers to the value that contains it"),
        write_file("run.yaml", "optim: &loop {lr: *loop}\n"),
    ),
    "space file: deeply nested": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "nested too deeply"),
        write_file("space.yaml", "params: " + "[" * 50_000 + "]" * 50_000 + "\n"),
    ),
    "config file: a 1 MB value": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("optim.optimizer='xxx", "must be one of"),
        write_file("run.yaml", "optim: {optimizer: " + "x" * 1_000_000 + "}\n"),
    ),
    "space file: a 1 MB choice": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "params.adv_loss", "must be one of"),
        write_file("space.yaml", "params: {adv_loss: {type: categorical, choices: [" + "y" * 1_000_000 + "]}}\n"),
    ),
    "config file: a 1 MB key": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("{work}/run.yaml", "unknown key 'zzz"),
        write_file("run.yaml", "optim:\n  ? " + "z" * 1_000_000 + "\n  : 1\n"),
    ),  # explicit: plain keys stop at 1024
    "override: an integer of 5000 digits": Case(
        "search", search("optim.epochs=" + "9" * 5000), ("override", "optim.epochs", "4300 digits")
    ),
    "space file: log 'no'": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "params.lr", "'log' must be true or false", "'no'"),
        write_file("space.yaml", "params: {lr: {type: uniform, low: 0.001, high: 0.1, log: 'no'}}\n"),
    ),
    "space file: levels of the wrong type": Case(
        "search",
        search(*SPACE),
        ("{work}/space.yaml", "params.levels", "not 'all' or a list of level names"),
        write_file("space.yaml", "params: {levels: {type: categorical, choices: [all, [1, 2]]}}\n"),
    ),
    "config file: keys of mixed types": Case(
        "search",
        search("--config", "{work}/run.yaml"),
        ("{work}/run.yaml", "unknown key"),
        write_file("run.yaml", "optim: {1: 2, zz: 3}\n"),
    ),
    # an unauthenticated dashboard beyond loopback: refused before Ray starts
    **{
        f"dashboard on {host} without auth": Case(
            "search",
            search("--dashboard-host", host),
            (f"--dashboard-host {host}", "RAY_AUTH_MODE=", "unauthenticated"),
            env=(("RAY_AUTH_MODE", mode),),
        )
        for host, mode in (
            ("0.0.0.0", "disabled"),
            ("::", "disabled"),
            ("192.168.1.20", "DISABLED"),
            ("head.example.org", "none"),
        )
    },
}


# --------------------------------------------------------------------------------------------
# inputs shared by the cases


@pytest.fixture(scope="module")
def inputs(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Valid and broken files the cases point at (paths as strings, for ``str.format``)."""
    from gankd_ray.config import RunConfig
    from gankd_ray.export import export_model
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch

    root = tmp_path_factory.mktemp("bad_input_files")
    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35"])
    cfg.role, cfg.data.path, cfg.detector.num_classes = "teacher", synthetic_data, 5
    detector = build_detector(cfg.detector)
    teacher = save_torch(model_payload(detector, cfg), root / "teacher" / "model.pt")
    # The same weights under a config that names another backbone.
    mismatched_payload = model_payload(detector, cfg)
    mismatched_payload["config"]["detector"]["backbone"] = "resnet18"
    mismatched = save_torch(mismatched_payload, root / "mismatched.pt")
    three_classes = root / "three_classes"
    shutil.copytree(synthetic_data, three_classes)
    info = json.loads((three_classes / "dataset.json").read_text())
    info["classes"] = info["classes"][:3]
    (three_classes / "dataset.json").write_text(json.dumps(info))
    export = export_model(teacher, root / "export", {"trial_id": "t1"})
    image = next((Path(synthetic_data) / "images" / "test").iterdir())
    return {
        "data": synthetic_data,
        "teacher": str(teacher),
        "mismatched": str(mismatched),
        "three_classes": str(three_classes),
        "export": str(export),
        "image": str(image),
    }


# --------------------------------------------------------------------------------------------
# running the cases


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    wall_seconds: float
    cpu_seconds: float  # the CLI's own user + system time
    max_rss_mb: float  # the CLI's peak resident memory


@dataclass
class Outcome:
    run: Run
    work: Path
    before: dict[str, bytes]
    values: dict[str, str]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its content; folders as empty entries."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


def run_cli(cli: str, args: list[str], cwd: Path, timeout: float = 120, env: dict[str, str] | None = None) -> Run:
    """Run ``launch/<cli>.py`` to the end (killed after ``timeout`` s); reaps it with ``wait4`` for its CPU
    time and peak memory."""
    command = [sys.executable, str(CLIS[cli]), *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as readers:
            stdout, stderr = readers.submit(proc.stdout.read), readers.submit(proc.stderr.read)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            done = subprocess.CompletedProcess(command, proc.returncode, stdout.result(), stderr.result())
    finally:
        killer.cancel()
        proc.stdout.close()
        proc.stderr.close()
    return Run(done, time.monotonic() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def start_case(case: Case, work: Path, inputs: dict[str, str]) -> Callable[[], Outcome]:
    """Prepare the case's folder now; the returned callable runs the CLI (in a pool thread)."""
    work.mkdir(parents=True)
    if case.setup is not None:
        case.setup(work, inputs)
    values = {**inputs, "work": str(work)}
    before = snapshot(work)

    def run() -> Outcome:
        args = [a.format(**values) for a in case.args]
        return Outcome(run_cli(case.cli, args, work, env=dict(case.env)), work, before, values)

    return run


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The selected cases, started together at most ``PARALLEL`` at a time: name -> Future[Outcome]."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    root = tmp_path_factory.mktemp("bad_input_runs")
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    futures: dict[str, Future] = {}
    for index, name in enumerate(dict.fromkeys(selected)):
        futures[name] = pool.submit(start_case(CASES[name], root / f"case{index}", inputs))
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def assert_refused(proc: subprocess.CompletedProcess, culprit: list[str]) -> str:
    """Exit 2 and exactly one stderr line, ``error: ...``, containing every culprit word."""
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-4000:]
    assert len(lines[0]) <= MAX_ERROR_CHARS, f"an error line of {len(lines[0])} characters: {lines[0][:300]}..."
    for word in culprit:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_ray(proc: subprocess.CompletedProcess) -> None:
    assert "dashboard" not in proc.stdout.lower(), proc.stdout[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def assert_quick(run: Run, max_wall: float = MAX_WALL_SECONDS) -> None:
    assert run.cpu_seconds < MAX_CPU_SECONDS, f"used {run.cpu_seconds:.1f} s of CPU: must be refused before any work"
    assert run.wall_seconds < max_wall, f"took {run.wall_seconds:.1f} s"
    assert run.max_rss_mb < MAX_RSS_MB, f"peaked at {run.max_rss_mb:.0f} MB of memory"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_fast_with_one_line_and_no_output(case: str, outcomes: dict[str, Future]) -> None:
    outcome: Outcome = outcomes[case].result(timeout=600)
    assert_refused(outcome.run.proc, [word.format(**outcome.values) for word in CASES[case].culprit])
    assert_quick(outcome.run)
    assert_no_ray(outcome.run.proc)
    assert snapshot(outcome.work) == outcome.before, "the refused command left files behind"


# --------------------------------------------------------------------------------------------
# cases that need more than a folder: the cluster itself, a full file system


def test_resources_the_cluster_can_never_hold_exit_2_without_writing(synthetic_data: str, tmp_path: Path) -> None:
    """A trial that can never be placed must not wait forever for resources: exit 2 once Ray reports its size."""
    args = [a.format(data=synthetic_data, work=tmp_path) for a in search()] + ["--cpus-per-worker", "1000"]
    run = run_cli("search", args, tmp_path, timeout=300)
    line = assert_refused(run.proc, ["--cpus-per-worker", "one trial needs 1000 CPU"])
    assert "the cluster has" in line
    assert_quick(run, MAX_WALL_SECONDS_WITH_RAY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "search.json or run folders written before the check"


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``mount(size) -> folder``: a fresh tmpfs of that size (needs root; the test is skipped otherwise)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full (unbuffered, so closing cannot fail)."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise


def test_full_storage_is_refused_before_ray(synthetic_data: str, tmpfs, tmp_path: Path) -> None:
    full = tmpfs("256k")
    fill(full / "filler")
    before = snapshot(full)
    args = [a.format(data=synthetic_data, work=tmp_path) for a in search("--storage", str(full / "runs"))]
    run = run_cli("search", args, tmp_path)
    assert_refused(run.proc, ["--storage", str(full), "No space left on device"])
    assert_quick(run)
    assert_no_ray(run.proc)
    assert snapshot(full) == before


@pytest.mark.slow
def test_storage_filling_up_during_training_ends_with_a_clear_error(synthetic_data: str, tmpfs, tmp_path) -> None:
    """Room for the run's small files but not for its first checkpoint: Ray's worker error becomes one
    closing ``error:`` line naming the storage, exit 4, instead of a traceback (or a hang)."""
    small = tmpfs("256k")
    args = [
        "--role",
        "student",
        "--data",
        synthetic_data,
        "--epochs",
        "1",
        "--workers",
        "1",
        "--max-failures",
        "0",
        "--storage",
        str(small / "runs"),
        "--name",
        "full",
        "detector.backbone=mobilenet_v2_0.35",
        "optim.batch_size=8",
        "data.loader_workers=0",
    ]
    proc = run_cli("train", args, tmp_path, timeout=600).proc
    assert proc.returncode == EXIT_STORAGE_FULL, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]  # after Ray's forwarded worker tracebacks
    assert last.startswith(f"error: --storage {small / 'runs'}: no space left while writing"), proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# a hostile model folder: TorchScript is code


HOSTILE_SCRIPT = '''
import sys
from typing import Dict, List, Tuple

import torch


class WritesAFile(torch.nn.Module):
    """Overwrites (or creates) ``target`` in forward via a shared memory map: TorchScript can touch the disk."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, images: List[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        written = torch.from_file(self.target, shared=True, size=6, dtype=torch.uint8)
        written.fill_(33)
        scores = torch.zeros(0) + written.sum().float()  # used, so the write is not dead code
        detections = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": scores}
        return {}, [detections for _ in images]


torch.jit.save(torch.jit.script(WritesAFile(sys.argv[1])), sys.argv[2])
'''


@pytest.fixture(scope="module")
def hostile_model(inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real export whose ``student.ts`` writes ``target`` when run: (model folder, target)."""
    root = tmp_path_factory.mktemp("hostile")
    model, target = root / "model", root / "written_by_the_model"
    shutil.copytree(inputs["export"], model)
    script = root / "make_hostile.py"  # a file: torch.jit.script reads the module's source
    script.write_text(HOSTILE_SCRIPT)
    subprocess.run(
        [sys.executable, str(script), str(target), str(model / "student.ts")], check=True, capture_output=True
    )
    return model, target


@pytest.mark.parametrize("cli", ["predict", "evaluate"])
def test_a_hostile_student_ts_does_not_run_under_the_defaults(cli: str, hostile_model, inputs, tmp_path) -> None:
    model, target = hostile_model
    target.unlink(missing_ok=True)
    args = {
        "predict": ["--images", inputs["image"], "--out", str(tmp_path / "predictions")],
        "evaluate": ["--data", inputs["data"]],
    }[cli]
    run = run_cli(cli, ["--model", str(model), *args], tmp_path)
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert not target.exists(), f"{cli} ran student.ts without --torchscript"
    # The same folder with --torchscript does run the code: the check above is not vacuous.
    run_cli(cli, ["--model", str(model), *args, "--torchscript"], tmp_path)
    assert target.exists()


# --------------------------------------------------------------------------------------------
# careless but valid input, leftovers of killed runs, the dashboard rule's override


def test_relative_input_paths_prepare_like_absolute_ones(tmp_path: Path) -> None:
    """The README's ``--annotations instances.json`` form: paths relative to the working folder."""
    (tmp_path / "instances.json").write_text(json.dumps(coco_input(tmp_path)))
    run = run_cli(
        "prepare_data", ["coco", "--images", "images", "--annotations", "instances.json", "--out", "out"], tmp_path
    )
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    split_files = ["coco", "--images", "images", "--train-annotations", "instances.json", "--out", "split"]
    assert run_cli("prepare_data", split_files, tmp_path).proc.returncode == 0
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["inputs_sha256"] == json.loads((tmp_path / "split" / "dataset.json").read_text())["inputs_sha256"]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_folders_of_dead_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    stale = tmp_path / f".prepared.{dead_pid()}.0badc0de.partial"
    live = tmp_path / f".prepared.{os.getpid()}.0123abcd.partial"  # this test's own process: alive
    other = tmp_path / f".other.{dead_pid()}.0badc0de.partial"  # another output's: not ours to judge
    for folder in (stale, live, other):
        (folder / "images").mkdir(parents=True)
    args = ["synthetic", "--out", str(out), "--num-train", "6", "--num-val", "3", "--num-test", "3"]
    assert run_cli("prepare_data", args, tmp_path).proc.returncode == 0
    assert not stale.exists() and live.is_dir() and other.is_dir() and (out / "dataset.json").is_file()


def test_a_replaced_dataset_left_in_the_trash_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    """Killed between moving the old dataset aside and renaming the new one in: the old one is restored
    on the next start, and the (refused) run leaves it as it was."""
    args = ["synthetic", "--out", str(tmp_path / "prepared"), "--num-train", "6", "--num-val", "3", "--num-test", "3"]
    assert run_cli("prepare_data", args, tmp_path).proc.returncode == 0
    trash = tmp_path / f".prepared.{dead_pid()}.0badc0de.old"
    trash.mkdir()
    (tmp_path / "prepared").rename(trash / "old")
    assert run_cli("prepare_data", args, tmp_path).proc.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_sigterm_during_prepare_leaves_no_staging_folder(tmp_path: Path) -> None:
    args = [
        sys.executable,
        str(CLIS["prepare_data"]),
        "synthetic",
        "--out",
        str(tmp_path / "big"),
        "--num-train",
        "20000",
        "--num-val",
        "10",
        "--num-test",
        "10",
    ]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + MAX_WALL_SECONDS
    while not list(tmp_path.glob(".big.*.partial/images")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "prepare_data ended before it was signalled: make the dataset larger"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=MAX_WALL_SECONDS)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [], "a staging folder was left behind"


def test_the_dashboard_rule_and_its_override(monkeypatch, capsys) -> None:
    from gankd_ray.cluster import check_dashboard_exposure

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        check_dashboard_exposure(host)  # loopback: fine without auth
    check_dashboard_exposure("0.0.0.0", address="auto")  # a cluster's dashboard is the head's
    with pytest.raises(ValueError, match="--dashboard-host 0.0.0.0 with RAY_AUTH_MODE=disabled"):
        check_dashboard_exposure("0.0.0.0")
    check_dashboard_exposure("0.0.0.0", allow_unauthenticated=True)
    assert "WARNING: --dashboard-host 0.0.0.0" in capsys.readouterr().err  # allowed, loudly
    for mode in (None, "token", "TOKEN"):
        if mode is None:
            monkeypatch.delenv("RAY_AUTH_MODE")
        else:
            monkeypatch.setenv("RAY_AUTH_MODE", mode)
        check_dashboard_exposure("0.0.0.0")  # token authentication on: the README's remote setup


# --------------------------------------------------------------------------------------------
# object storage (a real S3 API server on 127.0.0.1): every failure refused before Ray, one line naming the URI

S3_CASES = {
    # name: (--data, --teacher, --storage, env changes, words of the error line)
    "unreachable-endpoint": (
        "{s3data}",
        None,
        "{s3runs}",
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}"},
        ["--data", "{s3data}", "cannot reach the storage endpoint", "127.0.0.1:{closed}"],
    ),
    "missing-bucket": (
        "s3://no-such-bucket/data",
        None,
        "{s3runs}",
        {},
        ["--data", "s3://no-such-bucket/data", "the bucket does not exist"],
    ),
    "invalid-credentials": (
        "{s3data}",
        None,
        "{s3runs}",
        {"AWS_SECRET_ACCESS_KEY": "wrong"},
        ["--data", "{s3data}", "access denied"],
    ),
    "missing-dataset-key": (
        "s3://gankd/no/dataset",
        None,
        "{s3runs}",
        {},
        ["--data", "s3://gankd/no/dataset/dataset.json", "file not found"],
    ),
    "missing-teacher-key": (
        "{s3data}",
        "s3://gankd/no/teacher",
        "{s3runs}",
        {},
        ["--teacher", "s3://gankd/no/teacher", "checkpoint not found"],
    ),
    "storage-not-writable": (
        "{s3data}",
        None,
        "{s3runs}",
        "read_only",
        ["--storage", "{s3runs}", "not writable", "access denied"],
    ),
    "storage-bucket-missing": (
        "{s3data}",
        None,
        "s3://no-such-bucket/runs",
        {},
        ["--storage", "s3://no-such-bucket/runs", "not writable", "the bucket does not exist"],
    ),
}


@pytest.fixture(scope="module")
def s3_dataset(s3, synthetic_data: str) -> str:
    from conftest import upload

    return upload(synthetic_data, "s3://gankd/bad-input/data")


# Both CLIs share the checks (train.resolve_job): every case through the search, the main ones through train.
# (The parameter is not called "case": the catalogue's `outcomes` fixture collects every "case" parameter.)
S3_CLI_CASES = [("search", name) for name in S3_CASES] + [
    ("train", name) for name in ("unreachable-endpoint", "missing-teacher-key", "storage-not-writable")
]


@pytest.mark.parametrize("cli, s3_case", S3_CLI_CASES)
def test_bad_object_storage_is_refused_before_ray(
    s3_case: str, cli: str, s3, s3_dataset: str, inputs, tmp_path: Path, monkeypatch
) -> None:
    from conftest import free_port

    data, teacher, runs, env, words = S3_CASES[s3_case]
    values = {"s3data": s3_dataset, "s3runs": f"s3://gankd/bad-input/runs-{cli}", "closed": str(free_port())}
    for key, value in (s3["read_only"] if env == "read_only" else env).items():
        monkeypatch.setenv(key, value.format(**values))
    args = [
        "--data",
        data.format(**values),
        "--storage",
        runs.format(**values),
        "--name",
        "bad",
        "--teacher",
        (teacher or inputs["teacher"]).format(**values),
    ]
    args += ["--role", "gankd", "--epochs", "1"] if cli == "train" else []
    run = run_cli(cli, args, tmp_path)
    assert_refused(run.proc, [word.format(**values) for word in words])
    assert_quick(run)
    assert_no_ray(run.proc)
    assert not list(tmp_path.iterdir())
