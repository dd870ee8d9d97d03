"""The search end to end with a real local Ray: a --smoke search, its tables, report and export,
and the bad-input checks that must fail before Ray starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import flags

from gankd_ray.tune.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [sys.executable, str(ROOT / "launch" / "search.py")]
LEVELS = ["level0", "level1", "level2", "level3", "level4"]
FAST = ["optim.batch_size=8", "data.loader_workers=0"]


def run_search(*args: str, timeout: float = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*SEARCH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def smoke_search(synthetic_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search")
    # Relative --data and --storage on purpose: Tune runs trial drivers (and Train its workers) in other working
    # directories.
    data = os.path.relpath(synthetic_data, workdir)
    proc = run_search(
        "--smoke",
        "--data",
        data,
        "--storage",
        "runs",
        "--name",
        "smoke",
        "--teacher-epochs",
        "1",
        "--mlflow",
        "mlruns",  # a local file store, relative like the rest
        *FAST,
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / "smoke", proc


def test_smoke_search_tables(smoke_search):
    experiment, proc = smoke_search
    trials = pd.read_parquet(experiment / "trials.parquet")
    for column in [
        "trial_id",
        "status",
        "epochs",
        "best_map",
        "best_ap50",
        "last_map",
        "wall_s",
        "node",
        "adv_weight",
        "adv_loss",
        "disc_depth",
        "disc_norm",
        "levels",
        "lr_ratio",
    ]:
        assert column in trials.columns, column
    assert len(trials) >= 6 and trials["trial_id"].is_unique
    assert (trials["epochs"] >= 1).all() and trials["best_map"].notna().all(), trials
    assert (trials["status"] == "stopped_early").any(), trials[["trial_id", "status", "epochs"]]
    assert (trials["status"] == "completed").any()
    assert set(trials["status"]) <= {"completed", "stopped_early", "diverged", "error"}
    stopped = trials[trials["status"] == "stopped_early"]
    assert (stopped["epochs"] < 3).all()
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    per_trial = epochs.groupby("trial_id")["epoch"].apply(list)
    for trial_id, seen in per_trial.items():  # every epoch reported once, in order
        assert seen == list(range(1, len(seen) + 1)), (trial_id, seen)
    assert "Ray dashboard: http://127.0.0.1:" in proc.stdout
    assert "baseline student (no KD)" in proc.stdout and "best GAN-KD trial" in proc.stdout


def test_teacher_and_baseline_train_at_once(smoke_search):
    """Neither needs the other and a 2-CPU Ray holds both, so their runs overlap in time; the progress lines
    say which run each epoch belongs to."""
    from gankd_ray.records import read_metrics

    experiment, proc = smoke_search

    def span(run_dir: Path) -> tuple[float, float]:
        records = read_metrics(str(run_dir))
        return records[0]["worker_started_at"], records[-1]["reported_at"]

    teacher, baseline = span(experiment.parent / "smoke-teacher"), span(experiment / "baseline")
    assert max(teacher[0], baseline[0]) < min(teacher[1], baseline[1]), (teacher, baseline)
    log = proc.stdout + proc.stderr
    assert "smoke-teacher: epoch 1/1" in log and "baseline: epoch 3/3" in log


def test_smoke_search_console_is_ours_and_ray_logs_are_kept(smoke_search):
    """The console holds our lines (one per trial and epoch, a compact status table), not Ray's: its result
    dicts and checkpoint notices are in the experiment's copy of Ray's logs."""
    experiment, proc = smoke_search
    longest = max(proc.stdout.splitlines(), key=len)
    assert len(longest) <= 300, longest
    assert "Reporting training result" not in proc.stdout and "Checkpoint successfully created" not in proc.stdout
    # Tune's experiment box and result paths (printed by Ray 2.60's reporter at every verbosity) stay out too.
    assert "Configuration for experiment" not in proc.stdout and "View detailed results" not in proc.stdout
    epoch_line = r"\[gankd-ray\] trial \w+ epoch 1/3  val mAP \d\.\d{4}  AP50 \d\.\d{4}  critic acc \S+  status running"
    assert re.search(epoch_line, proc.stdout), proc.stdout[-3000:]
    assert re.search(r"^trial +status +epoch +val mAP +best$", proc.stdout, re.MULTILINE), proc.stdout[-3000:]
    ray_logs = "".join(p.read_text(errors="replace") for p in (experiment / "logs" / "ray").rglob("*") if p.is_file())
    assert "Reporting training result" in ray_logs


def test_smoke_search_report_and_export(smoke_search):
    experiment, _ = smoke_search
    report = experiment / "report"
    assert (report / "report.md").read_text().startswith("# gankd-ray search report")
    assert (report / "learning_curves.png").stat().st_size > 1000
    assert (report / "optimisation_history.png").stat().st_size > 1000
    best = experiment / "best"
    payload = torch.load(best / "student.pt", weights_only=True)
    assert payload["format"] == "gankd-ray-model" and payload["state_dict"]
    code = (
        "import torch,torchvision,sys; m=torch.jit.load(sys.argv[1]); out=m([torch.rand(3,120,200)]);"
        "print(type(out).__name__, sorted(out[1][0].keys()) if isinstance(out, tuple) else sorted(out[0].keys()))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(best / "student.ts")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "boxes" in proc.stdout and "scores" in proc.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("params: {adv_weight: {type: loguniform, low: 1.0, high: 0.1}}", "inverted range"),
        ("params: {adv_weight: {type: loguniform, low: 0.1, high: 0.1}}", "empty or inverted range"),
        ("params: {bogus: 1}", "params.bogus: unknown parameter"),
        ("params: {disc_norm: {type: categorical, choices: [none, wavelet]}}", "discriminator.norm"),
        ("params: {disc_depth: {type: int, low: one, high: 3}}", "'low' must be a finite number"),
        ("params: {levels: {type: categorical, choices: [[level0, level9]]}}", "'level9' is not a level"),
        ("params: {lr: {type: loguniform, low: -1, high: 0.1}}", "log range needs low > 0"),
        ("params: [1, 2", "invalid YAML"),
        ("extra: 1\nparams: {n_critic: 1}", "unknown top-level key 'extra'"),
    ],
)
def test_bad_space_files(tmp_path, content, message):
    path = tmp_path / "space.yaml"
    path.write_text(content)
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        load_space(path, level_names=LEVELS)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_shipped_spaces_are_valid():
    for name in ("default", "paper", "wide"):
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml", level_names=LEVELS)
        assert space.keys


# A KD configuration that cannot help: one fixed trial whose adversarial term is negligible and that has no
# imitation term, over one epoch.
USELESS_KD_SPACE = """
params:
  adv_weight: 1.0e-6
  adv_loss: lsgan
  feat_weight: 0.0
  levels: [level1]
"""


def _space_search(data: str, teacher: str, tmp_path: Path, name: str, space_text: str) -> list[str]:
    """A search's inputs with its own space file (written under ``tmp_path``) and a given teacher."""
    space = tmp_path / f"{name}.yaml"
    space.write_text(space_text)
    return flags(data=data, storage=tmp_path / "runs", name=name, teacher=teacher, space=space)


def test_confirm_seeds_finds_no_gain_from_useless_kd(synthetic_data, untrained_teacher, tmp_path):
    inputs = _space_search(synthetic_data, untrained_teacher, tmp_path, "useless", USELESS_KD_SPACE)
    proc = run_search(*inputs, *flags(num_samples=1, max_epochs=1, grace_period=1, confirm_seeds=2), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"GAN-KD(: no measurable effect| hurts)", proc.stdout), proc.stdout[-3000:]
    experiment = tmp_path / "runs" / "useless"
    confirm = pd.read_parquet(experiment / "confirm.parquet")
    runs = sorted(zip(confirm["arm"], confirm["seed"]))
    assert runs == [("baseline", 1), ("baseline", 2), ("gankd", 1), ("gankd", 2)], confirm
    assert (confirm["status"] == "completed").all(), confirm
    card = json.loads((experiment / "best" / "card.json").read_text())
    assert card["kd_verdict"]["verdict"] in ("no_effect", "hurts") and card["kd_verdict"]["seeds"] == 2
    assert "## Is the KD gain real?" in (experiment / "report" / "report.md").read_text()


def test_smoke_search_trials_are_mlflow_runs(smoke_search):
    from mlflow.tracking import MlflowClient

    experiment, _ = smoke_search
    trials = pd.read_parquet(experiment / "trials.parquet")
    client = MlflowClient(tracking_uri=f"sqlite:///{experiment.parents[1] / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == len(trials)
    # Every reported epoch is a step of the run's val mAP, and the run's parameters are the trial's sample.
    epochs = sorted(len(client.get_metric_history(run.info.run_id, "map")) for run in runs)
    assert epochs == sorted(trials["epochs"])
    sampled = sorted(round(float(run.data.params["adv_weight"]), 6) for run in runs)
    assert sampled == sorted(round(float(value), 6) for value in trials["adv_weight"])
    assert {run.info.status for run in runs} == {"FINISHED"}


def test_an_unwritable_mlflow_store_fails_before_ray(synthetic_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_search(
        "--data", synthetic_data, "--storage", str(tmp_path / "runs"), "--mlflow", str(blocker / "mlruns")
    )
    assert proc.returncode == 2 and "--mlflow" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "dashboard" not in proc.stdout


# CLI-level refusals (bad space, --resume of an unknown name, ...) live in tests/test_bad_input.py.


# Two student widths and nothing else searched: the accuracy/latency search's trials differ in cost.
TWO_STUDENTS_SPACE = """
params:
  backbone: {type: categorical, choices: [mobilenet_v2_0.35, mobilenet_v2]}
  adv_weight: 0.1
  adv_loss: lsgan
  feat_weight: 1.0
  levels: [level1]
"""


def test_an_accuracy_latency_search_marks_its_front_and_picks_in_budget(synthetic_data, untrained_teacher, tmp_path):
    inputs = _space_search(synthetic_data, untrained_teacher, tmp_path, "front", TWO_STUDENTS_SPACE)
    budget = flags(num_samples=4, max_epochs=1, scheduler="fifo", objectives="map,latency", pick="latency_ms<=99999")
    proc = run_search(*inputs, *budget, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    experiment = tmp_path / "runs" / "front"
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 4 and (trials["latency_ms"] > 0).all() and trials["latency_threads"].notna().all()
    # Measured per architecture: the full-width MobileNetV2 has more parameters and FLOPs than the 0.35 one.
    by_backbone = trials.groupby("backbone")["student_gflops"].mean()
    if len(by_backbone) == 2:
        assert by_backbone["mobilenet_v2"] > by_backbone["mobilenet_v2_0.35"]
    front = trials[trials["is_pareto"]]
    assert not front.empty
    # The fastest trial and the most accurate one are always on the front; every other trial is beaten by one.
    most_accurate = trials.sort_values(["best_map", "latency_ms"], ascending=[False, True]).iloc[0]  # fastest of ties
    assert trials.loc[trials["latency_ms"].idxmin(), "is_pareto"] and most_accurate["is_pareto"]
    for _, row in trials[~trials["is_pareto"]].iterrows():
        assert ((front["best_map"] >= row["best_map"]) & (front["latency_ms"] <= row["latency_ms"])).any()
    card = json.loads((experiment / "best" / "card.json").read_text())
    assert card["latency_ms"] > 0 and card["is_pareto"] is True
    top = trials[trials["best_map"] == trials["best_map"].max()]
    assert card["trial_id"] in set(top["trial_id"])  # every trial is within that budget
    assert (experiment / "report" / "pareto_front.png").is_file()


def test_a_bad_pick_rule_fails_before_ray(synthetic_data, tmp_path):
    proc = run_search("--data", synthetic_data, "--storage", str(tmp_path / "runs"), "--pick", "fps>=30")
    assert proc.returncode == 2 and "--pick fps>=30" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "dashboard" not in proc.stdout


def test_missing_teacher_weights_file_fails_before_ray(synthetic_data, tmp_path):
    proc = run_search(
        "--data", synthetic_data, "--storage", str(tmp_path / "runs"), "--teacher-weights", str(tmp_path / "nope.pth")
    )
    assert proc.returncode == 2 and "--teacher-weights" in proc.stderr and "nope.pth" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "dashboard" not in proc.stdout
