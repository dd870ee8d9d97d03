"""Runs on every kind of location, through the real CLIs and a real local Ray: relative paths typed in
another working directory, ``file://`` URIs, and a real S3 API server (moto, on 127.0.0.1) holding the
dataset, the teacher and the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import S3_BUCKET, flags, upload

from gankd_ray import storage
from gankd_ray.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FAST = ["optim.batch_size=8", "data.loader_workers=0", "detector.backbone=mobilenet_v2_0.35"]


def cli(
    script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_train_from_another_directory_with_relative_paths(synthetic_data, untrained_teacher, tmp_path):
    workdir = tmp_path / "D"
    workdir.mkdir()
    data, teacher = os.path.relpath(synthetic_data, workdir), os.path.relpath(untrained_teacher, workdir)
    proc = cli(
        "train",
        "--role",
        "gankd",
        "--data",
        data,
        "--teacher",
        teacher,
        "--storage",
        "out",
        "--name",
        "kd",
        "--epochs",
        "1",
        "--workers",
        "1",
        *FAST,
        cwd=workdir,
    )
    _assert_ok(proc)
    records = read_metrics(str(workdir / "out" / "kd"))
    assert [r["epoch"] for r in records] == [1] and records[0]["status"] == "completed"
    assert Path(records[0]["checkpoint"]).is_relative_to(workdir / "out" / "kd"), records[0]["checkpoint"]


def test_train_with_file_uris(synthetic_data, untrained_teacher, tmp_path):
    proc = cli(
        "train",
        "--role",
        "gankd",
        "--data",
        f"file://{synthetic_data}",
        "--teacher",
        f"file://{untrained_teacher}",
        "--storage",
        f"file://{tmp_path}/runs",
        "--name",
        "kd",
        "--epochs",
        "1",
        "--workers",
        "1",
        *FAST,
        cwd=ROOT,
    )
    _assert_ok(proc)
    records = read_metrics(f"file://{tmp_path}/runs/kd")
    assert records and records[0]["status"] == "completed"
    assert (Path(records[0]["checkpoint"].removeprefix("file://")) / "model.pt").is_file()


@pytest.fixture(scope="module")
def s3_inputs(s3, synthetic_data, untrained_teacher):
    """The test dataset and the untrained teacher, uploaded to the S3 server."""
    return {
        "data": upload(synthetic_data, f"s3://{S3_BUCKET}/data/synthetic"),
        "teacher": upload(untrained_teacher, f"s3://{S3_BUCKET}/teacher/best/model.pt").rsplit("/", 1)[0],
    }


def test_train_on_s3(s3, s3_inputs, tmp_path):
    runs = f"s3://{S3_BUCKET}/train-runs"
    kd_run = flags(role="gankd", data=s3_inputs["data"], teacher=s3_inputs["teacher"], storage=runs, name="kd")
    proc = cli("train", *kd_run, *flags(epochs=2, workers=1), *FAST, cwd=tmp_path)
    _assert_ok(proc)
    records = read_metrics(f"{runs}/kd")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["checkpoint"].startswith(f"{runs}/kd/") for r in records), records
    assert storage.is_file(storage.join(records[-1]["checkpoint"], "model.pt"))
    assert storage.is_file(f"{runs}/kd/resolved_config.yaml")
    assert not list(tmp_path.iterdir()), "an S3 run wrote into the working directory"


# --------------------------------------------------------------------------------------------
# a search on S3: killed, resumed, then its results exported, evaluated and used from S3


def _trials_metrics(trials_uri: str) -> dict[str, list[dict]]:
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(trials_uri)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    runs = [info.base_name for info in infos if info.type == pafs.FileType.Directory]
    return {run: read_metrics(storage.join(trials_uri, run)) for run in runs}


def _kill_when_one_trial_finished(proc: subprocess.Popen, trials_uri: str, timeout: float) -> dict[str, list[dict]]:
    import signal
    import time

    deadline = time.time() + timeout
    logs: dict[str, list[dict]] = {}
    while time.time() < deadline and proc.poll() is None:
        logs = _trials_metrics(trials_uri)
        finished = [t for t, lines in logs.items() if lines and lines[-1]["status"] == "completed"]
        if finished and any(lines and lines[-1]["status"] == "running" for lines in logs.values()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {t: logs[t] for t in finished}
        time.sleep(1)
    proc.kill()
    raise AssertionError(f"no point to kill at: search exited {proc.poll()} or timed out; trials {logs}")


@pytest.fixture(scope="module")
def s3_search(s3, s3_inputs, tmp_path_factory):
    """A --smoke search whose data, teacher and storage are all on S3, SIGKILLed once a trial has finished
    while another runs, then resumed with ``--resume``."""
    workdir = tmp_path_factory.mktemp("s3_search")
    runs = f"s3://{S3_BUCKET}/searches"
    args = [
        "--smoke",
        "--data",
        s3_inputs["data"],
        "--teacher",
        s3_inputs["teacher"],
        "--storage",
        runs,
        "--name",
        "smoke",
        *FAST,
    ]
    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "search.py"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
        finished_before = _kill_when_one_trial_finished(first, f"{runs}/smoke/trials", timeout=600)
    resumed = cli("search", "--storage", runs, "--name", "smoke", "--resume", cwd=workdir, timeout=900)
    return {
        "experiment": f"{runs}/smoke",
        "finished_before": finished_before,
        "resumed": resumed,
        "workdir": workdir,
        **s3_inputs,
    }


def _read_parquet(uri: str) -> pd.DataFrame:
    import io

    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))


def test_s3_search_resumes_without_rerunning_finished_trials(s3_search):
    _assert_ok(s3_search["resumed"])
    assert "resuming the search" in s3_search["resumed"].stdout
    experiment = s3_search["experiment"]
    trials = _read_parquet(f"{experiment}/trials.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique, trials
    summary = trials[["trial_id", "status", "epochs", "error"]]
    assert set(trials["status"]) <= {"completed", "stopped_early"} and (trials["status"] == "completed").any(), summary
    for trial_id, records in s3_search["finished_before"].items():  # not one more epoch, nor a rerun of one
        assert read_metrics(f"{experiment}/trials/{trial_id}") == records, trial_id
    assert all(str(c).startswith(f"{experiment}/trials/") for c in trials["best_checkpoint"]), trials["best_checkpoint"]
    assert storage.read_text(f"{experiment}/report/report.md").startswith("# gankd-ray search report")
    assert storage.is_file(f"{experiment}/report/learning_curves.png")
    card = storage.read_json(f"{experiment}/best/card.json")
    assert card["trial_id"] in set(trials["trial_id"]) and card["teacher"] == s3_search["teacher"]
    assert not list(s3_search["workdir"].glob("*/")), "an S3 search wrote folders into the working directory"


def test_s3_search_keeps_tensorboard_files_under_the_experiment(s3_search):
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(f"{s3_search['experiment']}/tune")
    files = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    events = [f.path for f in files if f.base_name.startswith("events.out.tfevents")]
    assert len(events) >= 6, events  # one per trial


def test_export_evaluate_predict_read_the_experiment_from_s3(s3_search, synthetic_data, tmp_path):
    experiment, data = s3_search["experiment"], s3_search["data"]
    trials = _read_parquet(f"{experiment}/trials.parquet")
    other = str(trials.sort_values("best_map")["trial_id"].iloc[0])
    out = f"s3://{S3_BUCKET}/exports/{other}"
    _assert_ok(cli("export", "--experiment", experiment, "--out", out, "--trial", other, cwd=tmp_path))
    assert storage.read_json(f"{out}/card.json")["trial_id"] == other
    evaluated = cli(
        "evaluate",
        "--model",
        f"{experiment}/best",
        "--data",
        data,
        "--split",
        "val",
        "--batch-size",
        "8",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    _assert_ok(evaluated)
    card = storage.read_json(f"{experiment}/best/card.json")
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["map"] == pytest.approx(card["val_map"], abs=5e-3)
    image = next(Path(synthetic_data, "images", "test").iterdir())
    remote_image = upload(image, f"s3://{S3_BUCKET}/photos/{image.name}")
    predicted = f"s3://{S3_BUCKET}/predictions"
    _assert_ok(
        cli(
            "predict",
            "--model",
            f"{experiment}/best",
            "--images",
            remote_image,
            str(image),
            "--out",
            predicted,
            "--score-thresh",
            "0",
            cwd=tmp_path,
        )
    )
    detections = storage.read_json(f"{predicted}/detections.json")
    assert {d["image_id"] for d in detections} == {1, 2}
    assert storage.is_file(f"{predicted}/{image.stem}.png")
    assert not list(tmp_path.iterdir()), "export/evaluate/predict on S3 wrote into the working directory"


# --------------------------------------------------------------------------------------------
# an outage of the object storage during a run


def test_an_s3_outage_ends_the_run_with_one_error_line_and_a_rerun_resumes(s3, s3_inputs, tmp_path):
    import time

    from conftest import TcpProxy

    proxy = TcpProxy(s3["port"])  # the run reaches S3 through it: cutting it is the outage
    runs = f"s3://{S3_BUCKET}/outage-runs"
    kd_run = flags(role="gankd", data=s3_inputs["data"], teacher=s3_inputs["teacher"], storage=runs, name="kd")
    command = [sys.executable, str(ROOT / "launch" / "train.py"), *kd_run, *flags(epochs=3, workers=1, max_failures=0)]
    command += FAST
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
        deadline = time.time() + 300
        while not read_metrics(f"{runs}/kd") and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert read_metrics(f"{runs}/kd"), f"no epoch reported: exit {first.poll()}"
        proxy.cut()
        _, stderr = first.communicate(timeout=600)
    epoch_one = read_metrics(f"{runs}/kd")
    assert first.returncode == 4, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --storage {runs}: storage failed during the run"), stderr[-3000:]
    assert "run the same command again to resume" in last and len(last) < 600, last

    proxy.restore()
    rerun = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    _assert_ok(rerun)
    records = read_metrics(f"{runs}/kd")
    assert [r["epoch"] for r in records] == [1, 2, 3], records
    assert records[: len(epoch_one)] == epoch_one, "epochs done before the outage were run again"
