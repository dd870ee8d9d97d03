"""The bad-input catalogue (issue 7): every bad input fails fast, clearly and cleanly, through the real CLIs.

Each case runs a CLI (``launch/search.py``, ``prepare_data.py``, ``evaluate.py``, ``predict.py``) as a
subprocess and must: exit 2; print exactly one stderr line, ``error: ...``, that names the culprit (file,
key or value); finish within seconds; start no Ray (the one case that needs the cluster aside); and leave
its working folder exactly as it was (no partial output). The cases run two at a time to save wall time.

Then the cases that need more: per-trial resources the cluster can never hold (a real local Ray; exit 2,
nothing written), and storage on a real tmpfs that is full from the start (refused before Ray) or fills
up during training (exit 4, the error line last; marked slow).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_data_coco import coco_input

ROOT = Path(__file__).resolve().parents[1]
CLIS = {name: ROOT / "launch" / f"{name}.py" for name in ("search", "train", "prepare_data", "evaluate", "predict")}
EXIT_BAD_INPUT = 2
EXIT_STORAGE_FULL = 4
# "Within seconds", measured as the CLI's own CPU time (imports and checks only; no training) so that a
# machine loaded by other work cannot fail it; the wall-clock bounds only catch hangs.
MAX_CPU_SECONDS = 20
MAX_WALL_SECONDS = 60
MAX_WALL_SECONDS_WITH_RAY = 120  # a local Ray starts in ~10 s, more on a loaded 2-core machine
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
    "space file: levels the detector lacks": Case(
        "search", search(*SPACE), ("{work}/space.yaml", "params.levels", "'level9'"),
        write_file("space.yaml", "params: {levels: {type: categorical, choices: [all, [level0, level9]]}}")),
    "config: levels the detector lacks": Case(
        "search", search("distill.levels=[level0,level9]"), ("distill.levels", "'level9'")),
    "missing data path": Case("search", search(data="{work}/no_such_dataset"), ("--data", "{work}/no_such_dataset")),
    "teacher/data class mismatch": Case(
        "search", search("--teacher", "{teacher}", data="{three_classes}"), ("--teacher", "5 classes", "has 3")),
    "teacher: weights of another architecture": Case(
        "search", search("--teacher", "{mismatched}"), ("{mismatched}", "do not match backbone 'resnet18'")),
    "unknown backbone": Case("search", search("detector.backbone=nope_net"), ("detector.backbone", "nope_net")),
    "zero learning rate": Case("search", search("optim.lr=0"), ("optim.lr=0",)),
    "grace period beyond the budget": Case(
        "search", search("--max-epochs", "2", "--grace-period", "3"), ("--grace-period 3", "--max-epochs (2)")),
    "negative learning rate (config file)": Case(
        "search", search("--config", "{work}/run.yaml"), ("optim.lr=-0.001",),
        write_file("run.yaml", "optim: {lr: -0.001}\n")),
    "--resume of an unknown name": Case("search", search("--name", "nope", "--resume"), ("--resume", "'nope'")),
    "storage under a file": Case(
        "search", search("--storage", "{work}/afile/runs"), ("--storage", "{work}/afile is not a folder"),
        write_file("afile", "not a folder")),
    "corrupt image": Case(
        "prepare_data", PREPARE_COCO, ("{work}/coco/instances.json", "img3.png", "corrupt"),
        bad_coco(truncate_image)),
    "invalid box": Case(
        "prepare_data", PREPARE_COCO, ("{work}/coco/instances.json", "annotation 11", "outside the 64x48 image"),
        bad_coco(box_outside_image)),
    "export missing student.pt (evaluate)": Case(
        "evaluate", ("--model", "{work}/model", "--data", "{data}"), ("{work}/model", "missing student.pt"),
        export_without("student.pt")),
    "export missing student.ts (evaluate --torchscript)": Case(
        "evaluate", ("--model", "{work}/model", "--data", "{data}", "--torchscript"),
        ("{work}/model", "missing student.ts"), export_without("student.ts")),
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
    three_classes = root / "three_classes"
    shutil.copytree(synthetic_data, three_classes)
    info = json.loads((three_classes / "dataset.json").read_text())
    info["classes"] = info["classes"][:3]
    (three_classes / "dataset.json").write_text(json.dumps(info))
    export = export_model(teacher, root / "export", {"trial_id": "t1"})
    image = next((Path(synthetic_data) / "images" / "test").iterdir())
    return {"data": synthetic_data, "teacher": str(teacher), "mismatched": str(mismatched),
            "three_classes": str(three_classes), "export": str(export), "image": str(image)}


# --------------------------------------------------------------------------------------------
# running the cases


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    wall_seconds: float
    cpu_seconds: float  # the CLI's own user + system time


@dataclass
class Outcome:
    run: Run
    work: Path
    before: dict[str, bytes]
    values: dict[str, str]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its content; folders as empty entries."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


def run_cli(cli: str, args: list[str], cwd: Path, timeout: float = 120) -> Run:
    """Run ``launch/<cli>.py`` to the end (killed after ``timeout`` s); reaps it with ``wait4`` for its CPU time."""
    command = [sys.executable, str(CLIS[cli]), *args]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
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
    return Run(done, time.monotonic() - started, usage.ru_utime + usage.ru_stime)


def start_case(case: Case, work: Path, inputs: dict[str, str]) -> Callable[[], Outcome]:
    """Prepare the case's folder now; the returned callable runs the CLI (in a pool thread)."""
    work.mkdir(parents=True)
    if case.setup is not None:
        case.setup(work, inputs)
    values = {**inputs, "work": str(work)}
    before = snapshot(work)

    def run() -> Outcome:
        return Outcome(run_cli(case.cli, [a.format(**values) for a in case.args], work), work, before, values)

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


def assert_quick(run: Run, max_wall: float = MAX_WALL_SECONDS) -> None:
    assert run.cpu_seconds < MAX_CPU_SECONDS, f"used {run.cpu_seconds:.1f} s of CPU: must be refused before any work"
    assert run.wall_seconds < max_wall, f"took {run.wall_seconds:.1f} s"


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
    args = ["--role", "student", "--data", synthetic_data, "--epochs", "1", "--workers", "1", "--max-failures", "0",
            "--storage", str(small / "runs"), "--name", "full", "detector.backbone=mobilenet_v2_0.35",
            "optim.batch_size=8", "data.loader_workers=0"]
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
    subprocess.run([sys.executable, str(script), str(target), str(model / "student.ts")], check=True,
                   capture_output=True)
    return model, target


@pytest.mark.parametrize("cli", ["predict", "evaluate"])
def test_a_hostile_student_ts_does_not_run_under_the_defaults(cli: str, hostile_model, inputs, tmp_path) -> None:
    model, target = hostile_model
    target.unlink(missing_ok=True)
    args = {"predict": ["--images", inputs["image"], "--out", str(tmp_path / "predictions")],
            "evaluate": ["--data", inputs["data"]]}[cli]
    run = run_cli(cli, ["--model", str(model), *args], tmp_path)
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert not target.exists(), f"{cli} ran student.ts without --torchscript"
    # The same folder with --torchscript does run the code: the check above is not vacuous.
    run_cli(cli, ["--model", str(model), *args, "--torchscript"], tmp_path)
    assert target.exists()
