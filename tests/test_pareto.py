"""The accuracy/latency front and the pick rule (tables), and latency measured on real students."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from gankd_ray.errors import InputError
from gankd_ray.tune.pareto import pareto_mask, parse_objectives, parse_pick


def _trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["fast", "balanced", "slow_best", "dominated", "broken", "tied"],
            "status": ["completed", "stopped_early", "completed", "completed", "error", "completed"],
            "best_map": [0.30, 0.40, 0.50, 0.35, 0.90, 0.40],
            "latency_ms": [4.0, 6.0, 20.0, 7.0, 1.0, 6.0],
        }
    )


def test_the_front_holds_the_trials_no_other_healthy_trial_beats_on_both():
    trials = _trials()
    front = trials.loc[pareto_mask(trials, ["map", "latency"]), "trial_id"].tolist()
    # "dominated" is slower and worse than "balanced"; "broken" errored, so it neither joins nor hides others;
    # "tied" equals "balanced" (neither dominates the other).
    assert front == ["fast", "balanced", "slow_best", "tied"]
    assert trials.loc[pareto_mask(trials, ["map"]), "trial_id"].tolist() == ["slow_best"]


def test_pick_takes_the_best_map_within_a_budget():
    trials = _trials()
    assert parse_pick("map").choose(trials)["trial_id"] == "slow_best"
    assert parse_pick("latency_ms<=6.5").choose(trials)["trial_id"] == "balanced"
    assert parse_pick("latency_ms <= 4").choose(trials)["trial_id"] == "fast"
    assert parse_pick("latency_ms<=0.5").choose(trials) is None


def test_a_tie_on_map_goes_to_the_faster_trial_so_the_pick_is_on_the_front():
    trials = pd.DataFrame(
        {
            "trial_id": ["slow_zero", "fast_zero", "mid_zero"],
            "status": ["completed"] * 3,
            "best_map": [0.0, 0.0, 0.0],
            "latency_ms": [20.0, 3.0, 9.0],
        }
    )
    for rule in ("map", "latency_ms<=99999"):
        picked = parse_pick(rule).choose(trials)
        assert picked["trial_id"] == "fast_zero"
        assert pareto_mask(trials, ["map", "latency"])[picked.name]


def test_size_budgets_read_the_student_size_columns_of_trials_parquet():
    trials = _trials().assign(student_params=[1e6, 2e6, 9e6, 3e6, 1e5, 2e6], student_gflops=[0.5, 1, 4, 1.5, 0.1, 1])
    assert parse_pick("params<=2500000").choose(trials)["trial_id"] == "balanced"
    assert parse_pick("gflops<=0.6").choose(trials)["trial_id"] == "fast"


@pytest.mark.parametrize("text", ["latency<5", "map,latency_ms<=", "fps>=30", "latency_ms<=abc"])
def test_a_bad_pick_rule_is_one_clear_error(text):
    with pytest.raises(InputError, match="--pick"):
        parse_pick(text)


@pytest.mark.parametrize("text", ["latency", "map,speed", "map,map"])
def test_objectives_must_include_map_once_and_be_known(text):
    with pytest.raises(InputError, match="--objectives"):
        parse_objectives(text)
    assert parse_objectives("map, latency") == ["map", "latency"]


def test_latency_is_measured_on_the_prediction_path_and_orders_students_by_size():
    from gankd_ray.config import DetectorConfig
    from gankd_ray.export.latency import measure_latency
    from gankd_ray.models import build_detector

    def student(backbone: str):
        return build_detector(DetectorConfig(backbone=backbone, num_classes=3, image_size=160)).eval()

    threads_before = torch.get_num_threads()
    small = measure_latency(student("mobilenet_v2_0.35"), 160, runs=7, warmup=2, threads=1)
    large = measure_latency(student("mobilenet_v2"), 160, runs=7, warmup=2, threads=1)
    assert torch.get_num_threads() == threads_before  # the pinned count is for the measurement only
    assert small.threads == large.threads == 1 and small.device == "cpu" and small.runs == 7
    assert small.params < large.params and small.gflops < large.gflops
    assert 0 < small.latency_ms <= small.latency_p90_ms
    # The wider student costs several times the FLOPs; its median latency is higher too.
    assert large.latency_ms > small.latency_ms
