"""bench/scale_sim.py's core at a tiny size: Tune's own ASHA scheduler on simulated learning curves, the load
figures derived from them, and Optuna's TPE timing. Ray-free (no ray.init)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scale_sim(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # bench scripts import their siblings by name, as scripts
    import scale_sim

    return scale_sim


def test_asha_one_trial_at_a_time_keeps_about_one_in_reduction_factor_at_each_rung(scale_sim):
    a = scale_sim.Assumptions(trials_per_gpu=64)
    sim = scale_sim.simulate_search(1, a, seed=0)
    rungs = [sim["rungs"][str(m)] for m in (4, 8, 16)]
    assert rungs[0] == sim["trials"] == 64
    assert all(0.35 <= later / earlier <= 0.65 for earlier, later in zip(rungs, rungs[1:])), rungs
    assert 0.35 <= sim["epochs_share"] <= 0.65  # cut at 4, 8 or run 16 of 16: about half the epochs
    assert sim["trials_cut_otherwise_than_one_at_a_time"] == 0  # the reference is this very order
    assert sim["gpu_busy_share"] == pytest.approx(1.0)  # one slot, never idle


def test_high_concurrency_stays_within_budget_and_finds_the_best_of_non_crossing_curves(scale_sim):
    # No noise and one learning rate: curves never cross, so every rung's ranking is the final one.
    a = scale_sim.Assumptions(trials_per_gpu=4, noise_sd=0.0, rate_range=(0.3, 0.3))
    sim = scale_sim.simulate_search(16, a, seed=1)
    assert sim["trials"] == 64 and sim["epochs_share"] <= 1.0
    assert list(sim["rungs"].values()) == sorted(sim["rungs"].values(), reverse=True)
    assert sim["best_minus_true_best_points"] == 0.0 and sim["found_trial_true_rank"] == 1
    assert sim["true_best_trial_epochs"] == a.max_t
    assert 0.0 < sim["gpu_busy_share"] < 1.0  # the last promoted trials run while other slots idle
    assert sim["one_at_a_time"]["rungs"]["4"] == 64


def test_load_figures_count_multipart_uploads_and_scale_with_epoch_time(scale_sim):
    sim = scale_sim.simulate_search(8, scale_sim.Assumptions(), seed=0)
    measured = {
        "checkpoint_files": {"model.pt": 1 << 20, "train_state.pt": 25 << 20},  # 1 PUT; create + 3 parts + complete
        "record_bytes": 2000,
        "process_memory_mib": {"one": {"rss_mib": 600.0, "anon_mib": 300.0}},
        "optuna": {"cells": [{"completed": 100, "running": 8, "ask_s": 0.02, "tell_s": 0.001}], "params_json_bytes": 9},
    }
    slow = scale_sim.load_figures(sim, measured, scale_sim.Assumptions(epoch_s=60.0))
    fast = scale_sim.load_figures(sim, measured, scale_sim.Assumptions(epoch_s=30.0))
    assert slow["s3_put_per_s"] == pytest.approx(slow["epochs_per_min_steady"] * (1 + 5 + 4) / 60)
    assert fast["s3_put_per_s"] == pytest.approx(2 * slow["s3_put_per_s"])
    assert slow["head_processes"] == 8 * len(scale_sim.HEAD_PROCESSES)
    assert slow["head_private_gib_floor"] == pytest.approx(8 * 300 / 1024)
    assert slow["result_kib_per_min"] == pytest.approx(3 * slow["epochs_per_min_steady"] * 2009 / 1024)


def test_tpe_suggestions_get_slower_as_the_history_grows(scale_sim):
    timing = scale_sim.time_optuna(completed=(20, 800), running=(4,), repeats=5)
    small, large = timing["cells"]
    assert (small["completed"], large["completed"]) == (20, 800)
    assert large["ask_s"] > small["ask_s"] > 0
    assert timing["study_pickle"][1]["pickle_bytes"] > timing["study_pickle"][0]["pickle_bytes"]
    assert timing["params_json_bytes"] > 100  # a sampled trial of the default space, as JSON
