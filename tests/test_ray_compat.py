"""gankd_ray.ray_compat: the private Ray hooks are on for this Ray, and an unknown Ray gets stock behaviour.

The version ``ray_compat`` sees is its seam (``ray_compat.ray_version``): patched to an unknown one, the run must
use Ray's stock TorchTrainer and still train. Real local Ray, a real tiny Tune run, one real Ray Train epoch.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from gankd_ray import ray_compat
from gankd_ray.config import RunConfig
from gankd_ray.records import read_metrics
from gankd_ray.train.run import TrainJob, build_trainer, resolve_job, run_training
from gankd_ray.tune import results

TINY = ["detector.backbone=mobilenet_v2_0.35", "optim.batch_size=8", "data.loader_workers=0"]
UNKNOWN_RAY = "99.0.0"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from gankd_ray.cluster import init_ray

    init_ray(num_cpus=2)  # as the CLIs start it (dashboard included: Ray's stock cleaner uses it)
    yield
    ray.shutdown()


@pytest.fixture
def unknown_ray(monkeypatch):
    """ray_compat sees an unknown Ray; its once-per-process warning is due again."""
    monkeypatch.setattr(ray_compat, "ray_version", lambda: UNKNOWN_RAY)
    ray_compat._warn_hooks_off.cache_clear()
    yield
    ray_compat._warn_hooks_off.cache_clear()


def _job(data: str, storage, name: str, epochs: int = 1) -> TrainJob:
    config = RunConfig().with_overrides(TINY)
    config.role, config.data.path, config.optim.epochs = "student", data, epochs
    return resolve_job(TrainJob(config=config, storage=str(storage), name=name))


def _default_callback_names(trainer) -> set[str]:
    return {type(callback).__name__ for callback in trainer._create_default_callbacks()}


def test_hooks_are_active_on_this_ray(synthetic_data, tmp_path):
    import ray

    assert ray_compat.is_known_good(ray.__version__) and ray_compat.hooks_active()
    trainer = build_trainer(_job(synthetic_data, tmp_path, "hooked"))
    assert type(trainer) is ray_compat.GankdTorchTrainer
    names = _default_callback_names(trainer)
    assert "PlacementGroupReaperCallback" in names
    assert not names & {"PlacementGroupCleanerCallback", "DatasetsCallback"}, names
    assert ray_compat.head_node_share() == {ray_compat.HEAD_NODE_RESOURCE: ray_compat.HEAD_NODE_SHARE}


def test_version_policy():
    assert ray_compat.is_known_good("2.60.0") and ray_compat.is_known_good("2.60.3")
    for other in ("2.6.0", "2.61.0", "2.600.0", "3.0.0.dev0", "2.59.1"):
        assert not ray_compat.is_known_good(other), other


def _tiny_tune_run(storage) -> list:
    """Two trials of a trainable that trains nothing; the second fails before it reports anything."""
    import ray.tune

    def trainable(config):
        if config["fail"]:
            raise RuntimeError("fails before any report")
        ray.tune.report({"score": 1.0})

    tuner = ray.tune.Tuner(
        trainable,
        param_space={"fail": ray.tune.grid_search([False, True])},
        run_config=ray.tune.RunConfig(
            name="tiny", storage_path=str(storage), verbose=0, failure_config=ray.tune.FailureConfig(max_failures=0)
        ),
    )
    return list(tuner.fit())


def test_trial_ids_from_a_real_tune_runs_directory_names(local_ray, tmp_path, request):
    grid = _tiny_tune_run(tmp_path)
    assert len(grid) == 2 and sum(r.error is not None for r in grid) == 1
    ids = set()
    for result in grid:
        trial_id = result.metrics["trial_id"]  # Tune fills it in, reported or not
        ids.add(trial_id)
        assert ray_compat.trial_id_from_dir(result.path) == trial_id, result.path
        assert results._trial_id(dataclasses.replace(result, metrics={})) == trial_id
    assert len(ids) == 2
    request.getfixturevalue("unknown_ray")
    for result in grid:  # hooks off: the public metric still names the trial; without it, the directory does
        assert ray_compat.trial_id_from_dir(result.path) is None
        assert results._trial_id(result) == result.metrics["trial_id"]
        assert results._trial_id(dataclasses.replace(result, metrics={})) == str(result.path)


def test_unknown_ray_trains_with_the_stock_trainer(local_ray, unknown_ray, synthetic_data, tmp_path, capsys):
    from ray.train.torch import TorchTrainer

    job = _job(synthetic_data, tmp_path, "stock")
    trainer = build_trainer(job)
    assert type(trainer) is TorchTrainer
    assert "PlacementGroupCleanerCallback" in _default_callback_names(trainer)
    warning = [line for line in capsys.readouterr().err.splitlines() if "gankd-ray's Ray hooks" in line]
    assert len(warning) == 1 and UNKNOWN_RAY in warning[0] and "placement-group reaper" in warning[0], warning
    assert ray_compat.head_node_share() == {}

    summary = run_training(job)
    assert summary.status == "completed" and summary.epochs_done == 1
    [record] = read_metrics(job.run_dir)
    assert record["status"] == "completed" and math.isfinite(record["map"]) and record["checkpoint"]
    assert "gankd-ray's Ray hooks" not in capsys.readouterr().err, "warned more than once"
