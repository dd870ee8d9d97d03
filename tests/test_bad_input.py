"""The bad-input catalogue (issue 7): every bad input fails fast, clearly and cleanly, through the real CLIs.

Each case runs a CLI (``launch/search.py``, ``prepare_data.py``, ``evaluate.py``, ``predict.py``) as a
subprocess and must: exit 2; print exactly one stderr line, ``error: ...``, that names the culprit (file,
key or value); finish within seconds; start no Ray (the one case that needs the cluster aside); and leave
its working folder exactly as it was (no partial output). The cases run two at a time to save wall time.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from test_data_coco import coco_input

ROOT = Path(__file__).resolve().parents[1]
CLIS = {name: ROOT / "launch" / f"{name}.py" for name in ("search", "train", "prepare_data", "evaluate", "predict")}
EXIT_BAD_INPUT = 2
EXIT_STORAGE_FULL = 4
MAX_SECONDS = 20  # a refused input costs the imports and the checks, nothing more
MAX_SECONDS_WITH_RAY = 90  # starting a local Ray on a loaded 2-core machine takes a while, but never hangs
PARALLEL = 2
SEARCH_OPTIONS = ("--storage", "{work}/runs", "--name", "bad", "--teacher-epochs", "1",
                  "optim.batch_size=8", "data.loader_workers=0")
Setup = Callable[[Path, dict[str, str]], None]


@dataclass(frozen=True)
class Case:
    """One bad input. ``{names}`` in ``args`` and ``culprit`` are filled from the inputs and ``{work}``."""

    cli: str
    args: tuple[str, ...]
    culprit: tuple[str, ...]  # words the error line must contain
    setup: Setup | None = None  # writes the case's own files into its (otherwise empty) working folder
    env: dict[str, str] = field(default_factory=dict)


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


PREPARE_COCO = ("coco", "--images", "{work}/coco/images", "--annotations", "{work}/coco/instances.json",
                "--out", "{work}/prepared")
SPACE = ("--space", "{work}/space.yaml")

CASES: dict[str, Case] = {
    "space file: malformed YAML": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "invalid YAML"), write_file("space.yaml", "params: [1, 2")),
    "space file: inverted range": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "params.adv_weight", "inverted range"),
        write_file("space.yaml", "params: {adv_weight: {type: loguniform, low: 2, high: 1}}")),
    "space file: unknown parameter": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "params.bogus", "unknown parameter"),
        write_file("space.yaml", "params: {bogus: 1}")),
    "space file: levels the detector lacks": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "params.levels", "'level9'"),
        write_file("space.yaml", "params: {levels: {type: categorical, choices: [all, [level0, level9]]}}")),
    "config: levels the detector lacks": Case(
        "search", search("distill.levels=[level0,level9]"), ("distill.levels", "'level9'")),
    "missing data path": Case("search", search(data="{work}/no_such_dataset"), ("--data", "{work}/no_such_dataset")),
    "teacher/data class mismatch": Case(
        "search", search("--teacher", "{teacher}", data="{three_classes}"), ("--teacher", "5 classes", "has 3")),
    "teacher: not a detector checkpoint": Case(
        "search", search("--teacher", "{classifier}"), ("{classifier}", "not a gankd-ray model checkpoint")),
    "teacher: weights of another architecture": Case(
        "search", search("--teacher", "{mismatched}"), ("{mismatched}", "do not match backbone 'resnet18'")),
    "unknown backbone": Case("search", search("detector.backbone=nope_net"), ("detector.backbone", "nope_net")),
    "zero learning rate": Case("search", search("optim.lr=0"), ("optim.lr=0",)),
    "negative learning rate": Case("search", search("optim.lr=-0.001"), ("optim.lr=-0.001",)),
    "--resume of an unknown name": Case("search", search("--name", "nope", "--resume"), ("--resume", "'nope'")),
    "storage under a file": Case(
        "search", search("--storage", "{work}/afile/runs"), ("--storage", "{work}/afile is not a folder"),
        write_file("afile", "not a folder")),
    "storage in /proc": Case(
        "search", search("--storage", "/proc/gankd-ray-test/runs"), ("/proc/gankd-ray-test/runs", "not writable")),
    "corrupt image": Case(
        "prepare_data", PREPARE_COCO, ("{work}/coco/instances.json", "img3.png", "corrupt"),
        bad_coco(truncate_image)),
    "invalid box": Case(
        "prepare_data", PREPARE_COCO, ("{work}/coco/instances.json", "annotation 11", "outside the 64x48 image"),
        bad_coco(box_outside_image)),
    "export missing student.ts (evaluate)": Case(
        "evaluate", ("--model", "{work}/model", "--data", "{data}"), ("{work}/model", "missing student.ts"),
        export_without("student.ts")),
    "export missing student.pt (evaluate --torchscript)": Case(
        "evaluate", ("--model", "{work}/model", "--data", "{data}", "--torchscript"),
        ("{work}/model", "missing student.pt"), export_without("student.pt")),
    "export missing card.json (predict)": Case(
        "predict", ("--model", "{work}/model", "--images", "{image}", "--out", "{work}/predictions"),
        ("{work}/model", "missing card.json"), export_without("card.json")),
}


# --------------------------------------------------------------------------------------------
# inputs shared by the cases


@pytest.fixture(scope="module")
def inputs(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Valid and broken files the cases point at (paths as strings, for ``str.format``)."""
    from gankd_ray.config import RunConfig
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch
    from gankd_ray.tune.export import export_model

    root = tmp_path_factory.mktemp("bad_input_files")
    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35"])
    cfg.role, cfg.data.path, cfg.detector.num_classes = "teacher", synthetic_data, 5
    detector = build_detector(cfg.detector)
    teacher = save_torch(model_payload(detector, cfg), root / "teacher" / "model.pt")
    # The same weights under a config that names another backbone.
    mismatched_payload = model_payload(detector, cfg)
    mismatched_payload["config"]["detector"]["backbone"] = "resnet18"
    mismatched = save_torch(mismatched_payload, root / "mismatched.pt")
    classifier = root / "classifier.pt"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.35).state_dict(), classifier)  # an ImageNet-style file
    three_classes = root / "three_classes"
    shutil.copytree(synthetic_data, three_classes)
    info = json.loads((three_classes / "dataset.json").read_text())
    info["classes"] = info["classes"][:3]
    (three_classes / "dataset.json").write_text(json.dumps(info))
    export = export_model(teacher, root / "export", {"trial_id": "t1"})
    image = next((Path(synthetic_data) / "images" / "test").iterdir())
    return {"data": synthetic_data, "teacher": str(teacher), "mismatched": str(mismatched),
            "classifier": str(classifier), "three_classes": str(three_classes), "export": str(export),
            "image": str(image)}


# --------------------------------------------------------------------------------------------
# running the cases


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    seconds: float
    work: Path
    before: dict[str, bytes]
    values: dict[str, str]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its content; folders as empty entries."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


def run_cli(cli: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    import os

    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(CLIS[cli]), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return proc, time.monotonic() - started


def start_case(case: Case, work: Path, inputs: dict[str, str]) -> Callable[[], Outcome]:
    """Prepare the case's folder now; the returned callable runs the CLI (in a pool thread)."""
    work.mkdir(parents=True)
    if case.setup is not None:
        case.setup(work, inputs)
    values = {**inputs, "work": str(work)}
    before = snapshot(work)

    def run() -> Outcome:
        proc, seconds = run_cli(case.cli, [a.format(**values) for a in case.args], work, case.env)
        return Outcome(proc, seconds, work, before, values)

    return run


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The selected cases, started together at most ``PARALLEL`` at a time: name -> Future[Outcome]."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
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
    for word in culprit:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_ray(proc: subprocess.CompletedProcess) -> None:
    assert "dashboard" not in proc.stdout.lower(), proc.stdout[-2000:]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_fast_with_one_line_and_no_output(case: str, outcomes: dict[str, Future]) -> None:
    outcome: Outcome = outcomes[case].result(timeout=600)
    assert_refused(outcome.proc, [word.format(**outcome.values) for word in CASES[case].culprit])
    assert outcome.seconds < MAX_SECONDS, f"took {outcome.seconds:.1f} s: must be refused before any work starts"
    assert_no_ray(outcome.proc)
    assert snapshot(outcome.work) == outcome.before, "the refused command left files behind"


# --------------------------------------------------------------------------------------------
# cases that need more than a folder: the cluster itself, a full file system


def test_resources_the_cluster_can_never_hold_exit_2_without_writing(synthetic_data: str, tmp_path: Path) -> None:
    """A trial that can never be placed must not wait forever for resources: exit 2 once Ray reports its size."""
    proc, seconds = run_cli("search", [a.format(data=synthetic_data, work=tmp_path) for a in search()]
                            + ["--cpus-per-worker", "1000"], tmp_path, timeout=300)
    line = assert_refused(proc, ["--cpus-per-worker", "one trial needs 1000 CPU"])
    assert "the cluster has" in line
    assert seconds < MAX_SECONDS_WITH_RAY, f"took {seconds:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "search.json or run folders written before the check"


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``mount(size) -> folder``: a fresh tmpfs of that size (needs root; the test is skipped otherwise)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
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
    proc, seconds = run_cli("search", args, tmp_path)
    assert_refused(proc, ["--storage", str(full), "No space left on device"])
    assert seconds < MAX_SECONDS
    assert_no_ray(proc)
    assert snapshot(full) == before


@pytest.mark.slow
def test_storage_filling_up_during_training_ends_with_a_clear_error(synthetic_data: str, tmpfs, tmp_path) -> None:
    """Room for the run's small files but not for its first checkpoint: Ray's worker error becomes one
    closing ``error:`` line naming the storage, exit 4, instead of a traceback (or a hang)."""
    small = tmpfs("256k")
    args = ["--role", "student", "--data", synthetic_data, "--epochs", "1", "--workers", "1", "--max-failures", "0",
            "--storage", str(small / "runs"), "--name", "full", "detector.backbone=mobilenet_v2_0.35",
            "optim.batch_size=8", "data.loader_workers=0"]
    proc, _ = run_cli("train", args, tmp_path, timeout=600)
    assert proc.returncode == EXIT_STORAGE_FULL, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]  # after Ray's forwarded worker tracebacks
    assert last.startswith(f"error: --storage {small / 'runs'}: no space left while writing"), proc.stderr[-3000:]
