"""Ray Train runs on a real local Ray (no mocks): roles, disjoint shares, resume, worker failure, bad input.

Kept small for 2 cores: one CLI subprocess (the teacher, with its own Ray), then one shared in-process
Ray instance for the other runs, which call the train command's ``build_job`` + ``run_training``
(``gankd_ray.cli.train``, behind ``launch/train.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gankd_ray.cli import train as train_cli
from gankd_ray.records import EpochRecord, read_metrics, summarize
from gankd_ray.train.run import run_training
from gankd_ray.tune.results import trial_row

REPO = Path(__file__).resolve().parents[1]
TRAIN_CLI = REPO / "launch" / "train.py"
TINY = ["detector.backbone=mobilenet_v2_0.35", "optim.batch_size=8", "data.loader_workers=0"]
TEACHER = ["detector.backbone=mobilenet_v2_0.5", "optim.batch_size=8", "data.loader_workers=0"]
TRAIN_IMAGES = 48  # synthetic_data: 48 train images; 2 ranks x floor(24 / 8) batches x 8 = 48 per epoch


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_CLI), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _job(role: str, data: str, storage: Path, name: str, epochs: int, *extra: str, teacher: str | None = None):
    argv = [
        "--role",
        role,
        "--data",
        data,
        "--epochs",
        str(epochs),
        "--workers",
        "2",
        "--storage",
        str(storage),
        "--name",
        name,
    ]
    if teacher:
        argv += ["--teacher", teacher]
    return train_cli.build_job(train_cli.parse_args([*argv, *extra]))


def _check_completed_run(run_dir: str, epochs: int, first_epoch: int = 1) -> list[dict]:
    """metrics.jsonl: every epoch 1..epochs exactly once, finite mAP/AP50, world size 2, completed at the end.

    ``first_epoch``: the first epoch this run (``epochs`` long) reported; earlier lines are an earlier run's.
    """
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1)), records
    for record in records:
        assert math.isfinite(record["map"]) and math.isfinite(record["ap50"]), record
        assert 0.0 <= record["map"] <= record["ap50"] <= 1.0, record
        assert record["world_size"] == 2
        assert record["train_images"] == TRAIN_IMAGES
        assert record["train_unique_images"] == TRAIN_IMAGES, "ranks trained on overlapping images"
    this_run = records[first_epoch - 1 :]
    assert all(r["epochs"] == epochs for r in this_run)
    assert [r["status"] for r in this_run] == ["running"] * (len(this_run) - 1) + ["completed"]
    return records


def test_summary_picks_kept_checkpoint_and_prints_missing_metrics(tmp_path):
    """Ties in mAP go to the later epoch (the checkpoint Ray keeps); a log without mAP still prints."""
    lines = [
        {"epoch": 1, "map": 0.0, "ap50": 0.0, "checkpoint": "c1", "status": "running"},
        {"epoch": 2, "map": 0.0, "ap50": 0.0, "checkpoint": "c2", "status": "completed"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert summarize(str(tmp_path)).checkpoint == "c2"
    # The search's trials table names the same kept checkpoint (the best trial is exported from it).
    row = trial_row("t", {}, [EpochRecord.from_dict(line) for line in lines], None, max_epochs=2, keys=[])
    assert row["best_checkpoint"] == "c2" and row["best_epoch"] == 2
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "map": None, "status": "diverged"}) + "\n")
    summary = summarize(str(tmp_path))
    assert summary.best_map is None and summary.status == "diverged"
    assert train_cli._fmt(None) == "n/a" and train_cli._fmt(0.25) == "0.2500"


# --------------------------------------------------------------------------------------------
# bad input: refused before Ray starts


class _CodePayload:
    """Unpickling this would create ``marker``: a weights-only load must refuse it without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, synthetic_data):
    import torch

    from gankd_ray.config import RunConfig
    from gankd_ray.models import build_detector
    from gankd_ray.train import checkpoint as ckpt

    root = tmp_path_factory.mktemp("bad")
    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35"])
    cfg.role, cfg.data.path, cfg.detector.num_classes = "teacher", synthetic_data, 5
    teacher = root / "teacher"
    teacher.mkdir()
    ckpt.save_torch(ckpt.model_payload(build_detector(cfg.detector), cfg), teacher / ckpt.MODEL_FILE)
    three_classes = root / "three_classes"
    shutil.copytree(synthetic_data, three_classes)
    info = json.loads((three_classes / "dataset.json").read_text())
    assert len(info["classes"]) == 5
    info["classes"] = info["classes"][:3]
    (three_classes / "dataset.json").write_text(json.dumps(info))
    plain = root / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    marker = root / "payload_ran"
    evil = root / "evil.pt"
    torch.save({"format": "gankd-ray-model", "payload": _CodePayload(str(marker))}, evil)
    assert not marker.exists()
    return {
        "root": root,
        "teacher": str(teacher),
        "three": str(three_classes),
        "plain": str(plain),
        "evil": str(evil),
        "marker": marker,
    }


BAD_CASES = {
    # name: (role, data key, teacher key, overrides, words the message must contain)
    "gankd-without-teacher": ("gankd", None, None, [], ["--teacher"]),
    "teacher-wrong-classes": ("gankd", "three", "teacher", [], ["--teacher", "5 classes", "3"]),
    "not-gankd-ray-file": ("gankd", None, "plain", [], ["plain.pt", "not a gankd-ray"]),
    "code-payload": ("gankd", None, "evil", [], ["evil.pt", "refused"]),
    "unknown-backbone": ("student", None, None, ["detector.backbone=nope_net"], ["nope_net"]),
    "lr-not-positive": ("student", None, None, ["optim.lr=0"], ["optim.lr"]),
    "missing-data": ("student", "missing", None, [], ["--data", "no_such_dataset"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_before_ray(case, bad_inputs, synthetic_data, tmp_path):
    role, data_key, teacher_key, overrides, words = BAD_CASES[case]
    data = {None: synthetic_data, "three": bad_inputs["three"], "missing": str(tmp_path / "no_such_dataset")}[data_key]
    args = [
        "--role",
        role,
        "--data",
        data,
        "--epochs",
        "1",
        "--workers",
        "2",
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "bad",
        *TINY,
        *overrides,
    ]
    if teacher_key:
        args += ["--teacher", bad_inputs[teacher_key]]
    started = time.monotonic()
    proc = _cli(*args, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert elapsed < 20, f"took {elapsed:.1f} s: bad input must be refused before Ray starts"
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()
    assert not bad_inputs["marker"].exists(), "the checkpoint's pickled code ran"


# --------------------------------------------------------------------------------------------
# the CLI end to end (its own Ray): a 2-worker teacher, reused below as the GAN-KD teacher


@pytest.fixture(scope="module")
def teacher_run(synthetic_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cli_runs")
    proc = _cli(
        "--role",
        "teacher",
        "--data",
        synthetic_data,
        "--epochs",
        "2",
        "--workers",
        "2",
        "--storage",
        str(storage),
        "--name",
        "teacher",
        *TEACHER,
        timeout=400,
    )
    return proc, storage / "teacher"


def test_cli_teacher_run(teacher_run):
    proc, run_dir = teacher_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("[gankd-ray] teacher: ")]
    assert len(summary_lines) == 1, proc.stdout[-4000:]
    assert "status completed, epochs 2, best mAP " in summary_lines[0]
    records = _check_completed_run(str(run_dir), 2)
    summary = summarize(str(run_dir))
    assert summary.best_map == max(r["map"] for r in records)
    assert f"checkpoint {summary.checkpoint}" in summary_lines[0]
    assert (Path(summary.checkpoint) / "model.pt").is_file(), "the summary names a checkpoint Ray deleted"
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "role: teacher" in resolved and "mobilenet_v2_0.5" in resolved and "num_classes: 5" in resolved


# --------------------------------------------------------------------------------------------
# in-process runs on one shared Ray


@pytest.fixture(scope="module")
def local_ray(teacher_run):  # after the CLI run, so two Ray instances never train at once
    import ray

    from gankd_ray.cluster import init_ray

    init_ray(num_cpus=2)  # as the CLIs start it, dashboard included (list_actors below needs its State API)
    yield
    ray.shutdown()


def test_rank_shares_are_disjoint_and_cover_train(synthetic_data):
    from gankd_ray.data import read_split
    from gankd_ray.data.loader import DetectionBatchLoader

    all_ids = {int(row["image_id"]) for row in read_split(synthetic_data, "train")}
    assert len(all_ids) == TRAIN_IMAGES
    per_rank = []
    for rank in range(2):
        loader = DetectionBatchLoader.from_dataset(
            synthetic_data, "train", 160, 8, train=True, rank=rank, world_size=2, seed=0, num_workers=0
        )
        loader.set_epoch(1)
        per_rank.append([m["image_id"] for _, _, metas in loader for m in metas])
    assert len(per_rank[0]) == len(per_rank[1]) == TRAIN_IMAGES // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == all_ids


def test_student_run_then_resume_with_more_epochs(local_ray, synthetic_data, tmp_path):
    job = _job("student", synthetic_data, tmp_path, "student", 2, *TINY)
    summary = run_training(job)
    assert summary.status == "completed" and summary.epochs_done == 2
    first = _check_completed_run(job.run_dir, 2)
    for record in first:  # throughput covers the whole train split once per epoch
        assert record["images_per_s"] * record["train_s"] == pytest.approx(TRAIN_IMAGES, rel=1e-6)
    assert (Path(summary.checkpoint) / "model.pt").is_file()

    started = time.time()
    job3 = _job("student", synthetic_data, tmp_path, "student", 3, *TINY)
    summary3 = run_training(job3)
    assert summary3.status == "completed" and summary3.epochs_done == 3
    records = _check_completed_run(job3.run_dir, 3, first_epoch=3)
    new = [r for r in records if r["reported_at"] >= started]
    assert [r["epoch"] for r in new] == [3], "the rerun must start at epoch 3"
    assert records[:2] == first, "the first run's lines must be kept as they were"


def test_gankd_from_teacher_checkpoint_files(local_ray, teacher_run, synthetic_data, tmp_path):
    proc, run_dir = teacher_run
    assert proc.returncode == 0, "teacher run failed (see test_cli_teacher_run)"
    teacher_ckpt = summarize(str(run_dir)).checkpoint
    job = _job("gankd", synthetic_data, tmp_path, "gankd", 2, *TINY, teacher=teacher_ckpt)
    assert job.config.teacher.backbone == "mobilenet_v2_0.5"
    summary = run_training(job)
    assert summary.status == "completed"
    records = _check_completed_run(job.run_dir, 2)
    assert any(key.startswith("disc/") for key in records[-1]), sorted(records[-1])


def test_a_run_starts_no_ray_data_actor_and_our_reaper(local_ray, synthetic_data, tmp_path):
    """Ray Train V2 starts a DatasetManager process for every run, Ray Datasets or not; GankdTorchTrainer
    drops it (~3 s of each trial's start-up on 2 cores), and swaps Ray's PlacementGroupCleaner (which needs
    the dashboard) for its own reaper. Fails when a Ray upgrade moves the private hook."""
    from ray.util.state import list_actors

    summary = run_training(_job("student", synthetic_data, tmp_path, "lean", 1, *TINY))
    assert summary.status == "completed"
    started = [actor.class_name for actor in list_actors(limit=10_000)]  # dead ones included
    assert "TrainController" in started and "RayTrainWorker" in started
    assert "DatasetManager" not in started
    assert "PlacementGroupReaper" in started and "PlacementGroupCleaner" not in started


def _train_workers() -> list:
    return _processes("RayTrainWorker")


def test_killed_worker_restarts_from_checkpoint(local_ray, synthetic_data, tmp_path):
    epochs = 4
    job = _job("student", synthetic_data, tmp_path, "killed", epochs, *TINY, "optim.batch_size=2")
    outcome: dict = {}

    def fit():
        try:
            outcome["summary"] = run_training(job)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while not [r for r in read_metrics(job.run_dir) if r.get("epoch") == 1]:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    workers = _train_workers()
    assert len(workers) == 2, workers
    victim = workers[0]
    killed_at = time.time()
    victim.kill()  # SIGKILL, during epoch 2
    victim.wait(10)
    thread.join(timeout=300)
    assert not thread.is_alive(), "run did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].status == "completed"
    records = _check_completed_run(job.run_dir, epochs)
    assert records[0]["reported_at"] < killed_at
    assert records[1]["reported_at"] > killed_at, "epoch 2 was already done: the kill was not mid-run"
    assert victim.pid not in {p.pid for p in _train_workers()}


def _processes(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):  # only this test's Ray
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_run_whose_controller_dies_gives_its_cpus_back(local_ray, synthetic_data, tmp_path):
    """What happens to every trial ASHA stops: Tune kills the trial's driver, so its Train controller dies
    mid-run, and Ray keeps the workers' placement group while the job lives. gankd-ray's placement-group
    reaper must then free the workers' CPUs (Ray's own cleaner, which it replaces, needs the dashboard);
    when nothing did, the next trials waited for workers until they timed out."""
    import ray

    job = _job("student", synthetic_data, tmp_path, "orphaned", 6, *TINY, "optim.batch_size=2")
    earlier_controllers = {p.pid for p in _processes("TrainController")}  # ended runs' may linger
    threading.Thread(target=lambda: _ignore_errors(run_training, job), daemon=True).start()
    deadline = time.monotonic() + 240
    while not [r for r in read_metrics(job.run_dir) if r.get("epoch") == 1]:
        assert time.monotonic() < deadline, "no epoch reported"
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0.0) == 0.0  # both CPUs are the run's workers'
    controllers = [p for p in _processes("TrainController") if p.pid not in earlier_controllers]
    assert len(controllers) == 1, controllers
    controllers[0].kill()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < 2.0:
        assert time.monotonic() < deadline, f"CPUs still reserved: {ray.available_resources()}"
        time.sleep(0.5)


def _ignore_errors(fn, *args) -> None:
    try:
        fn(*args)
    except BaseException:  # the run is meant to die with its controller
        pass
