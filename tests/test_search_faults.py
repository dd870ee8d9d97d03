"""Searches that meet faults, on a real local Ray: diverging and raising trials inside a search, and a
search driver killed with SIGKILL that ``--resume`` completes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from conftest import read_trials_metrics

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [sys.executable, str(ROOT / "launch" / "search.py")]
FAST = ["optim.batch_size=8", "data.loader_workers=0", "detector.backbone=mobilenet_v2_0.35"]
# Two faults a real space can produce: an adversarial weight so large the loss is not finite, and a
# batch larger than a worker's share of the 48 training images (raises in the worker, every attempt).
FAULTY_SPACE = """
params:
  adv_weight: {type: categorical, choices: [0.1, 1.0e+300]}
  batch_size: {type: categorical, choices: [8, 4096]}
  adv_loss: lsgan
  levels: [level1, level2]
"""


def search(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([*SEARCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def test_diverging_and_raising_trials_do_not_stop_the_search(synthetic_data, untrained_teacher, tmp_path):
    space = tmp_path / "faulty.yaml"
    space.write_text(FAULTY_SPACE)
    # file:// URIs for every location (a search must take them as it takes paths).
    proc = search(
        "--data",
        f"file://{synthetic_data}",
        "--storage",
        f"file://{tmp_path}/runs",
        "--name",
        "faults",
        "--teacher",
        f"file://{untrained_teacher}",
        "--space",
        str(space),
        "--num-samples",
        "4",
        "--max-epochs",
        "2",
        "--seed",
        "4",
        "--scheduler",
        "fifo",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "runs" / "faults" / "trials.parquet")
    summary = trials[["trial_id", "status", "adv_weight", "batch_size", "best_map", "error"]]
    raising = trials[trials["batch_size"] == 4096]
    diverging = trials[(trials["batch_size"] == 8) & (trials["adv_weight"] > 1.0)]
    healthy = trials[(trials["batch_size"] == 8) & (trials["adv_weight"] < 1.0)]
    assert len(raising) and len(diverging) and len(healthy), f"seed 4 no longer samples every case:\n{summary}"
    assert (raising["status"] == "error").all(), summary
    assert raising["error"].str.contains("optim.batch_size=4096").all(), summary
    assert (diverging["status"] == "diverged").all() and diverging["best_map"].isna().all(), summary
    # FIFO (no early stopping; the same seeded sampler as ASHA): every healthy trial runs all its epochs.
    assert (healthy["status"] == "completed").all() and healthy["error"].isna().all(), summary
    assert (trials.loc[healthy.index, "epochs"] == 2).all(), trials[["trial_id", "status", "epochs"]]
    # The searcher and ASHA saw a zero for the diverged trials, not their last finite weights' score.
    epochs = pd.read_parquet(tmp_path / "runs" / "faults" / "epochs.parquet")
    diverged_epochs = epochs[epochs["trial_id"].isin(diverging["trial_id"])]
    assert (diverged_epochs["status"] == "diverged").any() and (diverged_epochs["map"] == 0.0).all()
    # Train's FailureConfig (max_failures=1) retried the raising trial once before Tune recorded the error: Train's
    # controller logs it, which the search keeps out of the console, in the experiment's copy of Ray's logs.
    ray_logs = tmp_path / "runs" / "faults" / "logs" / "ray"
    logged = "".join(p.read_text(errors="replace") for p in ray_logs.rglob("*") if p.is_file())
    assert "Error count: 2 (max allowed: 1)" in logged
    card = json.loads((tmp_path / "runs" / "faults" / "best" / "card.json").read_text())
    assert card["trial_id"] in set(healthy["trial_id"]), (card["trial_id"], summary)


def _kill_when_one_trial_finished(proc: subprocess.Popen, trials_dir: Path, timeout: float) -> dict[str, str]:
    """SIGKILL the search's whole process group (driver and its local Ray) once a trial has finished while
    another is still running; returns the finished trials' metrics.jsonl texts as they were."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        logs = read_trials_metrics(trials_dir)
        finished = [t for t, lines in logs.items() if lines and lines[-1]["status"] == "completed"]
        running = [t for t, lines in logs.items() if not lines or lines[-1]["status"] == "running"]
        if finished and running:
            snapshot = {t: (trials_dir / t / "metrics.jsonl").read_text() for t in finished}
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return snapshot
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no point to kill at: search exited {proc.poll()} or timed out; trials {logs}")


def test_killed_search_resumes_without_rerunning_finished_trials(synthetic_data, untrained_teacher, tmp_path):
    storage = tmp_path / "runs"
    trials_dir = storage / "resume" / "trials"
    # The Optuna study in a database named by reference: its URL (here a path standing in for a password) must
    # reach no file of the experiment, Tune's pickles included, and the resume must find the study again.
    secret = "s3cret-db-location"
    (tmp_path / secret).mkdir()
    env = {**os.environ, "GANKD_STUDY_DB": f"sqlite:///{tmp_path / secret}/study.db"}
    args = [
        "--data",
        synthetic_data,
        "--storage",
        str(storage),
        "--name",
        "resume",
        "--teacher",
        untrained_teacher,
        "--num-samples",
        "4",
        "--max-epochs",
        "2",
        "--grace-period",
        "2",
        "--optuna-storage",
        "env:GANKD_STUDY_DB",
        *FAST,
    ]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [*SEARCH, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env
        )
        finished_before = _kill_when_one_trial_finished(first, trials_dir, timeout=400)
    assert not (storage / "resume" / "trials.parquet").exists()

    proc = search("--storage", str(storage), "--name", "resume", "--resume", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    leaks = [p for p in (storage / "resume").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, f"the Optuna storage URL was written to {leaks}"
    assert "env:GANKD_STUDY_DB" in (storage / "resume" / "search.yaml").read_text()
    import optuna

    study = optuna.load_study(study_name="resume", storage=env["GANKD_STUDY_DB"])
    assert len([t for t in study.trials if t.state.is_finished()]) >= 2, study.trials  # reconnected on resume
    assert "resuming the search" in proc.stdout
    trials = pd.read_parquet(storage / "resume" / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique, trials
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "epochs", "error"]]
    for trial_id, text in finished_before.items():  # not one more epoch, nor a rerun of one
        assert (trials_dir / trial_id / "metrics.jsonl").read_text() == text, trial_id
    epochs = pd.read_parquet(storage / "resume" / "epochs.parquet")
    assert sorted(epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2]] * 4
    assert (storage / "resume" / "report" / "report.md").exists()
    assert torch.load(storage / "resume" / "best" / "student.pt", weights_only=True)["state_dict"]


# Critics made to win: a 10x critic learning rate against a student that barely answers them (adv_weight 1e-4).
SATURATING_SPACE = """
params:
  adv_weight: 1.0e-4
  lr_ratio: 10.0
  adv_loss: lsgan
  levels: [level1, level2]
"""


def test_a_trial_whose_critics_saturate_stops_as_gan_failed(synthetic_data, untrained_teacher, tmp_path):
    space = tmp_path / "saturating.yaml"
    space.write_text(SATURATING_SPACE)
    max_epochs = 6
    proc = search(
        "--data",
        synthetic_data,
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "sat",
        "--teacher",
        untrained_teacher,
        "--space",
        str(space),
        "--num-samples",
        "1",
        "--max-epochs",
        str(max_epochs),
        "--scheduler",
        "fifo",
        "--gan-patience",
        "2",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "runs" / "sat" / "trials.parquet")
    (row,) = trials.itertuples()
    assert row.status == "gan_failed" and "saturated" in row.gan_reason, trials.T
    assert row.epochs < max_epochs, "the search spent no more epochs on it"
    epochs = pd.read_parquet(tmp_path / "runs" / "sat" / "epochs.parquet").sort_values("epoch")
    last = epochs.tail(2)
    assert (last[["disc/acc/level1", "disc/acc/level2"]] >= 0.98).all().all(), last.T
