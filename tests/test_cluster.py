"""Multi-node operation on one machine: a Ray cluster of two raylets (``ray start --head`` plus
``ray start --address``), the search submitted as a Ray Job, trials spread over both nodes, and the
second node killed mid-search: its trial restarts on the head node and the search completes. Then the
same cluster started without a dashboard: a --smoke search, whose ASHA-stopped trials must give their
CPUs back, completes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import read_trials_metrics

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
FAST = ["optim.batch_size=8", "data.loader_workers=0", "detector.backbone=mobilenet_v2_0.35"]
# Ray's token authentication stays on: every ray CLI client and joining node presents ~/.ray/auth_token.
# The nodes' workers import gankd_ray from this checkout (as a cluster's nodes import the installed package),
# not from wherever the virtualenv's editable install points.
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
# A --smoke search on two 1-CPU raylets took 2.5 min here (3.3 min with the cluster); a leaked CPU makes it hang.
SMOKE_SEARCH_TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def _nodes(dashboard: str) -> list[dict]:
    """The cluster's alive nodes, from the state API through the ray CLI (which presents the token)."""
    proc = _ray("list", "nodes", "--format", "json", "--address", dashboard)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [n for n in json.loads(proc.stdout) if n["state"] == "ALIVE"]


def _alive_node_count(gcs_address: str) -> int:
    """From ``ray status``, which asks the GCS (it works with or without a dashboard)."""
    proc = _ray("status", "--address", gcs_address)
    if proc.returncode != 0:
        return 0
    active = proc.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if " node_" in line)


@contextmanager
def _two_raylets(log_dir: Path, *head_options: str):
    """A head (1 CPU) and a second raylet (1 CPU) in its own process group; yields the GCS address and
    the second raylet's process once both are up, and stops every Ray process of the machine after."""
    _ray("get-auth-token", "--generate")  # ray start needs ~/.ray/auth_token; a fresh machine has none
    gcs = f"127.0.0.1:{_free_port()}"
    head = _ray(
        "start", "--head", "--port", gcs.split(":")[1], "--num-cpus", "1", "--disable-usage-stats", *head_options
    )
    assert head.returncode == 0, head.stderr[-2000:]
    log = open(log_dir / "raylet.log", "w")
    worker = subprocess.Popen(
        [RAY, "start", "--address", gcs, "--num-cpus", "1", "--block"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while _alive_node_count(gcs) < 2:
            assert time.time() < deadline and worker.poll() is None, "the second raylet did not join"
            time.sleep(1)
        yield gcs, worker
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        _ray("stop", "--force")
        log.close()


# Function-scoped clusters: each test has its own, stopped before the next one starts.
@pytest.fixture
def two_node_cluster(tmp_path_factory):
    """Two raylets, the head's dashboard on 127.0.0.1 (where the search is submitted as a Ray Job)."""
    dashboard_port = _free_port()
    with _two_raylets(
        tmp_path_factory.mktemp("node2"), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)
    ) as (_, worker):
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        second = next(n["node_id"] for n in _nodes(dashboard) if not n["is_head_node"])
        yield {"dashboard": dashboard, "worker": worker, "second_node": second[:12]}


@pytest.fixture
def cluster_without_dashboard(tmp_path_factory):
    """Two raylets, the head started with ``--include-dashboard false``: no State API, no Ray Jobs."""
    with _two_raylets(tmp_path_factory.mktemp("nodash"), "--include-dashboard", "false") as (gcs, _):
        yield gcs


def _brief(logs: dict[str, list[dict]]) -> dict[str, list[tuple]]:
    return {t: [(r["epoch"], r["node"], r["status"]) for r in records] for t, records in logs.items()}


def _wait_for_trial_mid_run_on(job: subprocess.Popen, trials_dir: Path, node: str, timeout: float) -> None:
    """Until a trial on ``node`` has reported an epoch and has more to run."""
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        logs = read_trials_metrics(trials_dir)
        if any(r and r[-1]["node"] == node and r[-1]["status"] == "running" for r in logs.values()):
            return
        time.sleep(0.3)
    raise AssertionError(f"no trial mid-run on {node}: job {job.poll()}, {_brief(read_trials_metrics(trials_dir))}")


def test_search_job_spreads_over_nodes_and_survives_losing_one(
    two_node_cluster, synthetic_data, untrained_teacher, tmp_path
):
    storage = tmp_path / "runs"
    search = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--address",
        "auto",
        "--data",
        synthetic_data,
        "--storage",
        str(storage),
        "--name",
        "cluster",
        "--teacher",
        untrained_teacher,
        "--num-samples",
        "4",
        "--max-epochs",
        "3",
        "--grace-period",
        "3",
        *FAST,
    ]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [RAY, "job", "submit", "--address", two_node_cluster["dashboard"], "--", *search],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        _wait_for_trial_mid_run_on(job, storage / "cluster" / "trials", two_node_cluster["second_node"], 420)
        os.killpg(two_node_cluster["worker"].pid, signal.SIGKILL)  # the node crashes: raylet and its workers
        job.wait(timeout=600)
    output = (tmp_path / "job.log").read_text()
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]
    trials = pd.read_parquet(storage / "cluster" / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "completed").all(), trials[["trial_id", "status", "error"]]
    logs = read_trials_metrics(storage / "cluster" / "trials")
    # The trial running on the lost node finished on the head, every epoch reported once.
    for records in logs.values():
        assert [r["epoch"] for r in records] == [1, 2, 3], _brief(logs)
    second = two_node_cluster["second_node"]
    moved = [t for t, r in logs.items() if r[0]["node"] == second != r[-1]["node"]]
    assert moved, f"no trial restarted on the remaining node: {_brief(logs)}"
    # trials.parquet names every node a trial ran on, in order: two nodes, and the moved trial's two.
    nodes = trials.set_index("trial_id")["node"]
    assert set(",".join(nodes).split(",")) == {second, logs[moved[0]][-1]["node"]}, nodes
    assert nodes[moved[0]] == f"{second},{logs[moved[0]][-1]['node']}", nodes


def test_smoke_search_on_a_cluster_without_dashboard(
    cluster_without_dashboard, synthetic_data, untrained_teacher, tmp_path
):
    """Every trial ASHA stops is a killed trial driver, so a dead Train controller whose workers' placement
    group Ray frees only when the whole job ends. Ray Train's own cleaner asks the dashboard's State API
    whether the controller died; without a dashboard only gankd-ray's reaper frees the CPU, and without it
    the next trials waited for workers forever (Train retries a worker start-up timeout without limit)."""
    storage = tmp_path / "runs"
    search = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--address",
        cluster_without_dashboard,
        "--smoke",
        "--data",
        synthetic_data,
        "--storage",
        str(storage),
        "--name",
        "nodash",
        "--teacher",
        untrained_teacher,
        *FAST,
    ]
    with open(tmp_path / "search.log", "w") as log:
        proc = subprocess.Popen(search, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=tmp_path)
        try:
            proc.wait(timeout=SMOKE_SEARCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = (tmp_path / "search.log").read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "Ray dashboard: none" in output  # the search really ran without one
    trials = pd.read_parquet(storage / "nodash" / "trials.parquet")
    assert set(trials["status"]) <= {"completed", "stopped_early"}, trials[["trial_id", "status", "error"]]
    assert (trials["status"] == "stopped_early").any(), trials[["trial_id", "status", "epochs"]]
