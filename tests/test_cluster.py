"""Multi-node operation on one machine: a Ray cluster of two raylets (``ray start --head`` plus
``ray start --address``), the search submitted as a Ray Job, trials spread over both nodes, and the
second node killed mid-search: its trial restarts on the head node and the search completes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import read_trials_metrics

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
FAST = ["optim.batch_size=8", "data.loader_workers=0", "detector.backbone=mobilenet_v2_0.35"]
# Ray's token authentication stays on: every ray CLI client and joining node presents ~/.ray/auth_token.
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


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


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head (1 CPU, dashboard on 127.0.0.1) and a second raylet (1 CPU) in its own process group."""
    gcs_port, dashboard_port = _free_port(), _free_port()
    head = _ray("start", "--head", "--port", str(gcs_port), "--num-cpus", "1", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port), "--disable-usage-stats")
    assert head.returncode == 0, head.stderr[-2000:]
    log = open(tmp_path_factory.mktemp("node2") / "raylet.log", "w")
    worker = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "1", "--block"],
                              stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 90
        while len(_nodes(dashboard)) < 2:
            assert time.time() < deadline and worker.poll() is None, "the second raylet did not join"
            time.sleep(1)
        second = next(n["node_id"] for n in _nodes(dashboard) if not n["is_head_node"])
        yield {"dashboard": dashboard, "worker": worker, "second_node": second[:12]}
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        _ray("stop", "--force")
        log.close()


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


def test_search_job_spreads_over_nodes_and_survives_losing_one(two_node_cluster, synthetic_data,
                                                               untrained_teacher, tmp_path):
    storage = tmp_path / "runs"
    search = [sys.executable, str(ROOT / "launch" / "search.py"), "--address", "auto", "--data", synthetic_data,
              "--storage", str(storage), "--name", "cluster", "--teacher", untrained_teacher, "--num-samples", "4",
              "--max-epochs", "3", "--grace-period", "3", *FAST]
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen([RAY, "job", "submit", "--address", two_node_cluster["dashboard"], "--", *search],
                               stdout=log, stderr=subprocess.STDOUT, env=ENV)
        _wait_for_trial_mid_run_on(job, storage / "cluster" / "trials", two_node_cluster["second_node"], 420)
        os.killpg(two_node_cluster["worker"].pid, signal.SIGKILL)  # the node crashes: raylet and its workers
        job.wait(timeout=600)
    output = (tmp_path / "job.log").read_text()
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]
    trials = pd.read_parquet(storage / "cluster" / "trials.parquet")
    assert len(trials) == 4 and (trials["status"] == "completed").all(), trials[["trial_id", "status", "error"]]
    logs = read_trials_metrics(storage / "cluster" / "trials")
    # The trial running on the lost node finished on the head, every epoch reported once.
    for trial_id, records in logs.items():
        assert [r["epoch"] for r in records] == [1, 2, 3], _brief(logs)
    second = two_node_cluster["second_node"]
    moved = [t for t, r in logs.items() if r[0]["node"] == second != r[-1]["node"]]
    assert moved, f"no trial restarted on the remaining node: {_brief(logs)}"
    # trials.parquet names every node a trial ran on, in order: two nodes, and the moved trial's two.
    nodes = trials.set_index("trial_id")["node"]
    assert set(",".join(nodes).split(",")) == {second, logs[moved[0]][-1]["node"]}, nodes
    assert nodes[moved[0]] == f"{second},{logs[moved[0]][-1]['node']}", nodes
