"""bench/gpu.py, the GPU readiness benchmark, runs end to end on a CPU (``--device cpu --quick``): every
throughput part, the DDP Ray Train run and the 2-trial search. GPU figures come only from a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, str(ROOT / "bench" / "gpu.py")]


def test_cpu_smoke_run_reports_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [*BENCH, "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gpu" and result["device"] == "cpu" and "machine" in result
    assert result["bf16_skipped"], "bf16 is CUDA-only: a CPU run records it as skipped, with the reason"
    measured = {(row["size"], row["amp"], row["part"]): row.get("images_per_s", 0.0) for row in result["throughput"]}
    assert set(measured) == {(160, "none", part) for part in ("teacher_forward", "student_step", "gankd_step")}
    assert all(value > 0 for value in measured.values()), measured
    ddp = result["ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 2 and ddp["status"] == "completed"
    assert ddp["images_per_s"] > 0
    search = result["search"]
    assert search["num_trials"] == 2 and len(search["trials"]) == 2
    assert all(trial["epochs"] >= 1 for trial in search["trials"]), search
    assert 0.0 <= search["best_val_map"] <= 1.0 and search["wall_s"] > 0
    assert str(tmp_path) not in out.read_text(), "no absolute (temporary) path in the result"
    assert "images/s" in proc.stdout and "DDP (gloo, world size 2" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [*BENCH, "--device", "cuda", "--out", str(tmp_path / "gpu.json")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --device cuda"), proc.stderr
    assert not (tmp_path / "gpu.json").exists()
