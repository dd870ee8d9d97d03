"""The TorchTrainer every run uses: Ray's, with two of Ray Train V2's per-run helpers swapped.

1. No Ray Data machinery when a run has no Ray Datasets. Ray Train V2 starts a DatasetManager actor for every
   run, datasets or not. gankd-ray reads its parquet shards itself, so that actor only costs a fresh Python
   process (importing ray.data) on each trial's start-up path; on a 2-core machine with the other core busy,
   dropping it (and Ray Train's metrics callbacks, see gankd_ray.cluster) cut the time from trial start to
   training function by a sixth (bench/trial_startup.py).
2. A placement-group reaper that works without the dashboard. The controller actor creates each worker
   group's placement group, so Ray frees it only when the controller *and* the whole job are gone. Every
   trial ASHA stops is a killed trial driver, hence a dead controller in a job that lives on: Ray Train's
   PlacementGroupCleaner asks the State API (served by the dashboard) whether the controller is alive, and on
   a cluster without a dashboard it never learns, so the trial's CPUs stay reserved and later trials wait
   for workers until they time out (and each such cleaner, a detached actor, polls forever). The reaper
   (gankd_ray.cluster.PlacementGroupReaper) asks the controller itself, through its actor handle (Ray core,
   no dashboard); the callback below starts it from the controller in place of Ray's cleaner.

Both rely on private hooks of Ray 2.60 (pinned in pyproject), all imported here, at the top, so that an
upgrade that moves them fails at import. tests/test_train_ray.py checks that no DatasetManager and no Ray
PlacementGroupCleaner actor is started and that a dead controller's CPUs come back; tests/test_cluster.py
runs a search on a cluster without a dashboard.
"""

from __future__ import annotations

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from gankd_ray.cluster import HEAD_NODE_RESOURCE, PlacementGroupReaper

# The reaper is a light process (gankd_ray.cluster imports no torch); one that cannot start in this long
# fails the run with this timeout in its error, rather than hanging it.
REAPER_REGISTER_TIMEOUT_S = 60.0


class GankdTorchTrainer(TorchTrainer):
    def _create_default_callbacks(self):
        kept = [callback for callback in super()._create_default_callbacks() if self._keeps(callback)]
        return [*kept, PlacementGroupReaperCallback()]

    def _keeps(self, callback) -> bool:
        if isinstance(callback, PlacementGroupCleanerCallback):
            return False  # replaced by the reaper
        return bool(self.datasets) or not isinstance(callback, DatasetsCallback)


class PlacementGroupReaperCallback(ControllerCallback, WorkerGroupCallback):
    """Runs in the Train controller: starts its reaper, tells it each worker group's placement group, and kills
    it on a normal shutdown (after the controller has shut the worker group, and so its group, down).

    An aborted controller (Ctrl-C) exits without that: its reaper sees it die and removes what is left.
    """

    def __init__(self):
        self._reaper: ray.actor.ActorHandle | None = None

    def after_controller_start(self, train_run_context) -> None:
        reaper_class = ray.remote(num_cpus=0)(PlacementGroupReaper)
        self._reaper = reaper_class.options(
            lifetime="detached",
            # On the head node, like Ray's cleaner and the trial drivers: losing a worker node must not lose it.
            resources={HEAD_NODE_RESOURCE: 0.001},
            # Outside the Tune trial's placement group, which Ray would otherwise capture it into, and where it
            # never fits (seen: the run waited on its reaper for good).
            scheduling_strategy="DEFAULT",
        ).remote(ray.get_runtime_context().current_actor)
        self._reaper.watch.remote()

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        # Waited for: registered before training starts, so a controller killed mid-run never leaves it out.
        ray.get(self._reaper.register.remote(group), timeout=REAPER_REGISTER_TIMEOUT_S)

    async def before_controller_shutdown(self) -> None:
        if self._reaper is not None:
            ray.kill(self._reaper)
            self._reaper = None
