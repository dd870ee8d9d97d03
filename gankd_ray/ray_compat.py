"""Every private or internal Ray hook gankd-ray uses, in one place, and the version check that turns them off.

Nothing else in the project imports ``ray._private``, ``ray.train.v2._internal`` or names Ray's internal
resources, environment variables or directory formats: a Ray upgrade is reviewed here.

Version policy: the hooks were written against, and are tested on, the Ray series in ``KNOWN_GOOD_RAY_SERIES``
(pyproject pins 2.60.0). On any other Ray, ``hooks_active()`` is False, one warning line names the hooks that
are off, and the project runs on Ray's public API and stock behaviour (the stock ``TorchTrainer``) instead of
failing at import. Hooks whose failure is harmless (an environment variable or logger Ray no longer reads, an
exception attribute that is gone) are not gated: they degrade to stock behaviour by themselves.

Gated (off on an unknown Ray):
- ``GankdTorchTrainer``: Ray Train's data-parallel trainer with torch's process group (``TorchProcessGroup``, whose
  controller side imports no torch), without the per-run DatasetManager actor, and with
  ``PlacementGroupReaperCallback`` in place of Ray Train's PlacementGroupCleanerCallback (see those classes).
- ``head_node_share``: the head node's internal resource, which pins trial drivers and reapers to the head.
- ``trial_id_from_dir``: the trial id read from the name of Tune's trial directory.

Not gated: ``TRAIN_ENV_DEFAULTS``, ``AUTH_NOTICE_LOGGER``, ``train_failure_causes``, ``session_logs_dir``,
``actor_ready`` (used only by the reaper, which only runs when the hooks are active).

This module imports nothing heavy at import time (no torch, no ray): ``gankd_ray.cluster`` and its reaper
process use it. The hook classes, which subclass Ray Train internals (hence ray.train and ray.data), are defined
on first use (module ``__getattr__``, PEP 562). None of them imports torch: a trial driver and its Train
controller never need it (only the training workers do).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any

# Ray release series (major.minor) whose internals the hooks below match; patch releases of a series keep
# them. Add a series only after tests/test_ray_compat.py, tests/test_train_ray.py -k "reaper or cpus_back"
# and tests/test_cluster.py -k without_dashboard pass on it.
KNOWN_GOOD_RAY_SERIES = ("2.60",)

GATED_HOOKS = (
    "the trainer without Ray Data's per-run actor and without torch in its controller (slower trial start-up)",
    "the placement-group reaper (a stopped trial's CPUs are freed only where the dashboard runs)",
    "head-node pinning of trial drivers",
    "trial ids from Tune's directory names",
)


def ray_version() -> str:
    """The installed Ray's version: the one input of the version check (tests patch it)."""
    import ray

    return ray.__version__


def is_known_good(version: str) -> bool:
    return any(version == series or version.startswith(series + ".") for series in KNOWN_GOOD_RAY_SERIES)


def hooks_active() -> bool:
    """Whether the installed Ray is one the hooks are known to work on; warns once when not."""
    version = ray_version()
    if is_known_good(version):
        return True
    _warn_hooks_off(version)
    return False


@functools.cache
def _warn_hooks_off(version: str) -> None:
    print(
        f"WARNING: gankd-ray's Ray hooks are tested on Ray {', '.join(s + '.x' for s in KNOWN_GOOD_RAY_SERIES)}, "
        f"not {version}; using stock Ray behaviour, off: {'; '.join(GATED_HOOKS)}",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Gated hooks


def torch_trainer(train_loop_per_worker, *, backend: str, **trainer_args):
    """A data-parallel torch trainer whose workers join a ``backend`` (gloo, nccl) process group: a
    ``GankdTorchTrainer`` on a known-good Ray, else Ray's stock ``ray.train.torch.TorchTrainer``. ``trainer_args``
    are Ray Train's (``train_loop_config``, ``scaling_config``, ``run_config``)."""
    if hooks_active():
        return _hook_class("GankdTorchTrainer")(train_loop_per_worker, backend=backend, **trainer_args)
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(train_loop_per_worker, torch_config=TorchConfig(backend=backend), **trainer_args)


# Ray's name for a resource only the head node has (ray._common.constants.HEAD_NODE_RESOURCE_NAME).
# Actors that must outlive the loss of a worker node (trial drivers, the Train controllers Ray attaches to their
# node, the controllers' placement-group reapers) ask a sliver of it. Gated: asking a resource that a later Ray
# has renamed would leave every trial unschedulable; without it drivers may land on any node (Ray's default).
HEAD_NODE_RESOURCE = "node:__internal_head__"
HEAD_NODE_SHARE = 0.001


def head_node_share() -> dict[str, float]:
    """Extra resources that place an actor on the head node: ``{HEAD_NODE_RESOURCE: 0.001}``, or none."""
    return {HEAD_NODE_RESOURCE: HEAD_NODE_SHARE} if hooks_active() else {}


# Tune 2.60 names a trial's directory f"{trainable}_{trial_id}_{index}_{params}_{date}" (Trial._generate_dirname,
# ray/tune/experiment/trial.py), with trial_id = 5 hex digits, "_", 5 digits. A Result's metrics carry the id
# (Tune fills "trial_id" in even when a trial never reported), so this only serves a Result without metrics.
_TRIAL_DIR_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")


def trial_id_from_dir(trial_dir: str | None) -> str | None:
    """The Tune trial id in the name of the trial's directory; None when it has none or the hooks are off."""
    if not trial_dir or not hooks_active():
        return None
    match = _TRIAL_DIR_ID.search(trial_dir.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# Hooks that degrade by themselves (not gated)

# Ray Train V2's environment variables (ray/train/v2/_internal/constants.py). A name a later Ray no longer reads
# is ignored, which is its stock behaviour. Ray Train polls its workers every 2 s and watches for preemption
# every 5 s; both delays land on every run's start and end. Short searches pay them per trial, so poll faster
# and skip the preemption watcher (spot preemption is handled by FailureConfig restarts anyway). Users may
# override them all.
TRAIN_METRICS_ENV = "RAY_TRAIN_METRICS_ENABLED"
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Worker start-up (a fresh process importing torch) can exceed the 60 s default on a loaded 2-core box.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Ray Train routes worker print() through its logger, which defeats redirect_stdout around
    # pycocotools chatter; plain prints still reach the driver.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train's Prometheus metrics callbacks (controller state, report timings: Grafana only; the dashboard's
    # job and actor views and our metrics.jsonl do not use them) cost ~1.4 s of each trial's start-up on 2
    # cores with one busy (bench/trial_startup.py). Set it to 1 to get them back.
    TRAIN_METRICS_ENV: "0",
}

# The logger of Ray's notice that a local cluster uses token authentication, printed at every start (see
# gankd_ray.cluster._quiet_default_auth_notice). If Ray moves it, the filter is on an unused logger: the notice
# shows again, nothing breaks.
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_NOTICE_PREFIX = "Token authentication is enabled for this Ray cluster"


def train_failure_causes(err: BaseException) -> list[BaseException]:
    """The exceptions a Ray Train failure wraps: ``ray.train.ControllerError.controller_failure`` and
    ``ray.train.WorkerGroupError.worker_failures`` (rank -> error) in Ray 2.60. Read with defaults: on a Ray
    without them, the failure's own chain is all that is searched (a full disk is then reported as Ray's error)."""
    nested = [getattr(err, "controller_failure", None), *(getattr(err, "worker_failures", None) or {}).values()]
    return [cause for cause in nested if isinstance(cause, BaseException)]


def session_logs_dir() -> str | None:
    """This machine's log folder of the connected Ray session (``<session>/logs``, Ray's node object), or None.
    Not gated: on a Ray without it the search just keeps no copy of Ray's logs."""
    try:
        from ray._private import worker

        return worker._global_node.get_logs_dir_path()  # _global_node is None before ray.init
    except (ImportError, AttributeError):
        return None


def actor_ready(actor) -> Any:
    """An ObjectRef that resolves once ``actor`` answers, or fails with ``RayActorError`` once it is dead.

    ``__ray_ready__`` is the built-in method every Ray actor has (undocumented); it lets the reaper ping a Train
    controller, whose own methods are Ray Train internals, without the State API.
    """
    return actor.__ray_ready__.remote()


# --------------------------------------------------------------------------------------------
# The trainer hooks: classes defined on first use, importable by name (the controller unpickles the callback)

# A reaper is a light process (gankd_ray.cluster imports no torch); one that cannot start in this long fails
# the run with this timeout in its error, rather than hanging it.
REAPER_REGISTER_TIMEOUT_S = 60.0


def __getattr__(name: str):
    # PEP 562: ``ray_compat.GankdTorchTrainer`` and unpickling by name define the classes when first asked for.
    if name in _HOOK_CLASS_DEFINERS:
        return _hook_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hook_class(name: str) -> type:
    """The hook class ``name``, defined (as a module global, so pickle finds it by name) on first use."""
    if name not in globals():
        _HOOK_CLASS_DEFINERS[name]()
    return globals()[name]


def _define_trainer() -> None:
    """``GankdTorchTrainer``: Ray Train V2's ``DataParallelTrainer`` set up as its TorchTrainer is, with three of
    its per-run costs cut.

    1. No torch outside the training workers. ``TorchTrainer`` and its ``TorchConfig`` live in modules that import
       torch, and the trainer's backend config and training-function context travel (pickled by reference) to
       the Train controller: so a search's trial driver and every Train controller imported torch, seconds each
       on a loaded machine, on the path from trial start to the first training step. ``TorchProcessGroup`` is
       the same set-up as ``TorchConfig`` (gloo or nccl, env:// rendezvous at rank 0's address, Ray's own
       worker-side functions: ``_set_torch_distributed_env_vars``, ``_setup_torch_process_group``,
       ``_shutdown_torch``) with torch imported only in the workers. TPUs and ``init_method="tcp"`` are not
       supported (gankd-ray trains on CPUs and CUDA GPUs).
    2. No Ray Data machinery when a run has no Ray Datasets. Ray Train V2 starts a DatasetManager actor for every
       run, datasets or not. gankd-ray reads its parquet shards itself, so that actor only costs a fresh Python
       process (importing ray.data) on each trial's start-up path; on a 2-core machine with the other core busy,
       dropping it (and the metrics callbacks, ``TRAIN_METRICS_ENV``) cut the time from trial start to training
       function by a sixth (bench/trial_startup.py).
    3. ``PlacementGroupReaperCallback`` in place of Ray Train's PlacementGroupCleanerCallback (see below).
    4. ``BadInputIsFinal`` around Ray's failure policy: a worker that failed on bad input (the project's
       ``UserError``: an image that no longer decodes, an unreadable row group) ends the run at once instead of
       being restarted ``max_failures`` times to meet the same data.

    Hooks: the private ``_create_default_callbacks`` and the classes of the callbacks it returns; the private
    ``_initialize_and_run_controller`` and its ``failure_policy`` argument; Ray's private torch set-up
    functions named above, and ``ray.train._internal.utils.get_address_and_port``.
    """
    global GankdTorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    reaper_callback = _hook_class("PlacementGroupReaperCallback")
    process_group = _hook_class("TorchProcessGroup")
    bad_input_is_final = _hook_class("BadInputIsFinal")

    class GankdTorchTrainer(DataParallelTrainer):
        def __init__(self, train_loop_per_worker, *, backend: str, **trainer_args):
            super().__init__(train_loop_per_worker, backend_config=process_group(backend=backend), **trainer_args)

        def _create_default_callbacks(self):
            kept = [callback for callback in super()._create_default_callbacks() if self._keeps(callback)]
            return [*kept, reaper_callback()]

        def _keeps(self, callback) -> bool:
            if isinstance(callback, PlacementGroupCleanerCallback):
                return False  # replaced by the reaper
            return bool(self.datasets) or not isinstance(callback, DatasetsCallback)

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs["failure_policy"]
            controller_init_kwargs["failure_policy"] = bad_input_is_final(policy)
            return super()._initialize_and_run_controller(**controller_init_kwargs)


def _define_process_group() -> None:
    """``TorchProcessGroup``: the backend config of ``GankdTorchTrainer`` (see ``_define_trainer``, item 1).

    Its backend runs in the Train controller and only sends functions of this module to the workers; they import
    Ray's torch set-up (and torch) there.
    """
    global TorchProcessGroup
    import dataclasses

    import ray
    from ray.train._internal.utils import get_address_and_port
    from ray.train.backend import Backend, BackendConfig
    from ray.train.v2._internal.util import TrainingFramework

    class TorchProcessGroupBackend(Backend):
        # As Ray's torch backend: every worker on a node sees all the node's GPUs the run holds, and picks its own
        # by local rank (ray.train.torch.get_device), so NCCL can use peer-to-peer between them.
        share_cuda_visible_devices = True

        def on_start(self, worker_group, backend_config) -> None:
            address, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_rendezvous_env, address=address, port=port)
            world_size = len(worker_group)
            ray.get(
                [
                    worker_group.execute_single_async(
                        rank,
                        _join_process_group,
                        backend=backend_config.backend,
                        world_rank=rank,
                        world_size=world_size,
                        timeout_s=backend_config.timeout_s,
                    )
                    for rank in range(world_size)
                ]
            )

        def on_shutdown(self, worker_group, backend_config) -> None:
            futures = worker_group.execute_async(_leave_process_group, destroy=len(worker_group) > 1)
            try:
                ray.get(futures, timeout=PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                print(
                    f"WARNING: torch process group shutdown timed out after {PROCESS_GROUP_SHUTDOWN_TIMEOUT_S} s",
                    file=sys.stderr,
                    flush=True,
                )

    @dataclasses.dataclass
    class TorchProcessGroup(BackendConfig):
        backend: str = "gloo"
        timeout_s: int = 1800  # as TorchConfig's: the longest any collective may wait

        @property
        def backend_cls(self):
            return TorchProcessGroupBackend

        @property
        def train_func_context(self):
            return TorchDeviceContext

        @property
        def framework(self):
            return TrainingFramework.TORCH

        def to_dict(self) -> dict[str, Any]:
            return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


# Seconds the workers get to leave their process group at the end of a run (TorchConfig's default is 30).
PROCESS_GROUP_SHUTDOWN_TIMEOUT_S = 30


def _set_rendezvous_env(address: str, port: int) -> None:
    """On a worker: rank 0's address for env:// rendezvous, and the LOCAL_RANK/RANK/WORLD_SIZE variables torch
    reads (Ray's own function sets them)."""
    import os

    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    _set_torch_distributed_env_vars()


def _join_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(
        backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://", timeout_s=timeout_s
    )


def _leave_process_group(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class TorchDeviceContext:
    """On a worker, around the training function: Ray's torch context (sets the worker's CUDA device), imported
    there rather than where the trainer is built."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._ray_context = TorchConfigContextManager()
        return self._ray_context.__enter__()

    def __exit__(self, *exc_info):
        return self._ray_context.__exit__(*exc_info)


def _define_reaper_callback() -> None:
    """``PlacementGroupReaperCallback``: starts gankd_ray.cluster.PlacementGroupReaper from the Train controller.

    The controller actor creates each worker group's placement group, so Ray frees it only when the controller
    *and* the whole job are gone. Every trial ASHA stops is a killed trial driver, hence a dead controller in a
    job that lives on: Ray Train's PlacementGroupCleaner asks the State API (served by the dashboard) whether the
    controller is alive, and on a cluster without a dashboard it never learns, so the trial's CPUs stay reserved
    and later trials wait for workers until they time out (and each such cleaner, a detached actor, polls
    forever). The reaper asks the controller itself, through its actor handle (Ray core, no dashboard).

    Hooks: Ray Train's controller and worker-group callback interfaces, and the worker group's internal state.
    """
    global PlacementGroupReaperCallback
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    from gankd_ray.cluster import PlacementGroupReaper

    class PlacementGroupReaperCallback(ControllerCallback, WorkerGroupCallback):
        """Runs in the Train controller: starts its reaper, tells it each worker group's placement group, and
        kills it on a normal shutdown (after the controller has shut the worker group, and so its group, down).
        An aborted controller (Ctrl-C) exits without that: its reaper sees it die and removes what is left."""

        def __init__(self):
            self._reaper = None

        def after_controller_start(self, train_run_context) -> None:
            self._reaper = (
                ray.remote(num_cpus=0)(PlacementGroupReaper)
                .options(
                    lifetime="detached",
                    # On the head node, like Ray's cleaner and the trial drivers: losing a worker node must not lose it.
                    resources={HEAD_NODE_RESOURCE: HEAD_NODE_SHARE},
                    # Outside the Tune trial's placement group, which Ray would otherwise capture it into, and where
                    # it never fits (seen: the run waited on its reaper for good).
                    scheduling_strategy="DEFAULT",
                )
                .remote(ray.get_runtime_context().current_actor)
            )
            self._reaper.watch.remote()

        def after_worker_group_start(self, worker_group) -> None:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            # Waited for: registered before training starts, so a controller killed mid-run never leaves it out.
            ray.get(self._reaper.register.remote(group), timeout=REAPER_REGISTER_TIMEOUT_S)

        async def before_controller_shutdown(self) -> None:
            if self._reaper is not None:
                ray.kill(self._reaper)
                self._reaper = None


def _define_failure_policy() -> None:
    """``BadInputIsFinal``: Ray Train's failure policy, except that a worker failure which is the project's
    ``UserError`` is raised at once (see ``_define_trainer``, item 4). It runs in the Train controller, where
    Ray has already unwrapped each worker's exception (``WorkerGroupError.worker_failures``).

    Hooks: ``FailurePolicy``, ``FailureDecision`` and ``WorkerGroupError.worker_failures``.
    """
    global BadInputIsFinal
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy

    from gankd_ray.errors import UserError

    class BadInputIsFinal(FailurePolicy):
        def __init__(self, policy: FailurePolicy):
            super().__init__(policy.failure_config)
            self._policy = policy

        def make_decision(self, training_failed_error) -> FailureDecision:
            if any(isinstance(cause, UserError) for cause in train_failure_causes(training_failed_error)):
                return FailureDecision.RAISE
            return self._policy.make_decision(training_failed_error)


_HOOK_CLASS_DEFINERS = {
    "BadInputIsFinal": _define_failure_policy,
    "GankdTorchTrainer": _define_trainer,
    "TorchProcessGroup": _define_process_group,
    "PlacementGroupReaperCallback": _define_reaper_callback,
}
