"""gankd_ray.ray_compat: the private Ray hooks are on for this Ray, and an unknown Ray gets stock behaviour.

The version ``ray_compat`` sees is its seam (``ray_compat.ray_version``): patched to an unknown one, the run must
use Ray's stock TorchTrainer and still train. Real local Ray, a real tiny Tune run, one real Ray Train epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

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


# A trial driver's imports and trainer (as gankd_ray.tune.search.trial_driver builds it), then what Ray Train sends
# its controller: the run's context (holding the backend config) and the default callbacks.
_TRIAL_DRIVER = """
import pickle, sys
import ray.cloudpickle, ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
import gankd_ray.tune.search
from gankd_ray.cluster import apply_train_env_defaults
from gankd_ray.config import RunConfig
from gankd_ray.train.run import build_trainer
from gankd_ray.train.spec import Resources, TrainJob

apply_train_env_defaults()
job = TrainJob(config=RunConfig(), storage=sys.argv[2], name="driver", resources=Resources(workers=2))
trainer = build_trainer(job)
from ray.train.v2._internal.execution.failure_handling import create_failure_policy
from gankd_ray import ray_compat
from gankd_ray.data.records import UnreadableRows
policy = ray_compat.BadInputIsFinal(create_failure_policy(trainer.run_config.failure_config))
bad_rows = UnreadableRows("rows: cannot read (why)", reason="why")  # what a worker's failure sends back
with open(sys.argv[1], "wb") as out:
    ray.cloudpickle.dump((trainer.train_run_context, trainer._create_default_callbacks(), policy, bad_rows), out)
print("torch" in sys.modules)
"""
_TRAIN_CONTROLLER = """
import json, pickle, sys
context, callbacks, policy, bad_rows = pickle.load(open(sys.argv[1], "rb"))
print(json.dumps({
    "torch": "torch" in sys.modules,
    "policy": type(policy).__name__,
    "bad_rows_reason": bad_rows.reason,
    "backend": context.backend_config.backend,
    "workers": context.scaling_config.num_workers,
    "callbacks": [type(c).__name__ for c in callbacks],
}))
"""


def _python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's gankd_ray, in a fresh process
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_trial_drivers_and_train_controllers_never_import_torch(tmp_path):
    """Only the training workers need torch: a trial driver building its trainer and the Train controller
    unpickling what the driver sends it load none (torch costs seconds of each trial's start-up on a loaded
    machine, and ~250 MiB of private memory per process on the head node)."""
    sent = tmp_path / "controller_args.pkl"
    assert _python(_TRIAL_DRIVER, str(sent), str(tmp_path)) == "False", "the trial driver imported torch"
    controller = json.loads(_python(_TRAIN_CONTROLLER, str(sent)))
    assert controller["torch"] is False, "the Train controller imported torch"
    assert (controller["backend"], controller["workers"]) == ("gloo", 2), controller
    assert "PlacementGroupReaperCallback" in controller["callbacks"], controller
    assert (controller["policy"], controller["bad_rows_reason"]) == ("BadInputIsFinal", "why"), controller


def test_a_worker_failing_on_bad_input_is_not_restarted():
    """Ray Train restarts a failed worker group ``max_failures`` times; a worker that failed on bad input (a
    ``UserError``) would meet the same data again, so the run ends at once. Other failures keep Ray's policy."""
    import inspect

    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, create_failure_policy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    from gankd_ray.data.records import UnreadableRows

    def decision(policy, error: BaseException) -> FailureDecision:
        return policy.make_decision(WorkerGroupError("worker 0 failed", worker_failures={0: error}))

    bad_rows = UnreadableRows("rows: cannot read (why)", reason="why")
    stock = create_failure_policy(FailureConfig(max_failures=2))
    assert decision(stock, bad_rows) == FailureDecision.RETRY  # what the wrapper is for
    ours = ray_compat.BadInputIsFinal(create_failure_policy(FailureConfig(max_failures=2)))
    assert decision(ours, bad_rows) == FailureDecision.RAISE
    assert [decision(ours, RuntimeError("a crash")) for _ in range(3)] == [
        FailureDecision.RETRY,
        FailureDecision.RETRY,
        FailureDecision.RAISE,
    ]
    # The seam: Ray's fit hands the policy to the controller through the method GankdTorchTrainer overrides.
    assert "failure_policy=create_failure_policy(" in inspect.getsource(DataParallelTrainer.fit)
    assert "_initialize_and_run_controller" in vars(ray_compat.GankdTorchTrainer)


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
