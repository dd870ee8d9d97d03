"""The search: Ray's three layers.

per-worker loop (``gankd_ray.train.loop``) -> per-trial driver (``trial_driver``: builds a TorchTrainer
named after the trial id) -> ``Tuner`` with OptunaSearch (seeded TPE over a define-by-run space) and an
ASHA scheduler on val mAP.

Experiment layout under ``<storage>/<name>/``: ``tune/`` (Tune's experiment state), ``trials/<trial_id>/``
(each trial's Train run: checkpoints, metrics.jsonl), ``search.yaml`` (what was asked, for --resume),
then the results written by ``gankd_ray.tune.results``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from gankd_ray import ray_compat, storage
from gankd_ray.config import RunConfig
from gankd_ray.distill.health import gan_verdict
from gankd_ray.errors import InputError
from gankd_ray.records import EpochRecord, RunContext, read_records
from gankd_ray.train.spec import RESOLVED_CONFIG_FILE, TrainJob
from gankd_ray.tune.pareto import parse_objectives
from gankd_ray.tune.request import SearchRequest
from gankd_ray.tune.space import SearchSpace
from gankd_ray.tune.tracking import tracking_callbacks

# What the searcher and ASHA compare: the trial's best val mAP so far, 0 once it diverged (EpochRecord.score).
# The best so far, not the last epoch's: Optuna learns a stopped trial's value from its last report, and the
# best trial is picked (and exported) by its best epoch.
METRIC = "score"
SAMPLERS = ("tpe", "random")
MODE = "max"
LATENCY_METRIC = "latency_ms"  # the second objective of --objectives map,latency (records.Cost)
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# A trial driver only waits on its TorchTrainer: it asks no CPU, so the workers can fill the cluster.
# Tune refuses an empty request, hence a token amount of memory. Drivers (and the Train controllers Ray
# attaches to their node) live on the head node, so losing a worker node costs its trials a worker
# restart from their last checkpoint (Train's FailureConfig), not the trial.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20, **ray_compat.head_node_share()}


@dataclass
class SearchJob:
    """What the tuner runs: the request, and what ``pipeline.plan_search`` resolved from it (the base config
    every trial starts from, the parsed space, the teacher's location)."""

    base: RunConfig
    space: SearchSpace
    teacher: str
    request: SearchRequest = field(default_factory=SearchRequest)
    max_failures: int = 1  # worker failures a trial survives (Ray Train restarts it from its last checkpoint)

    @property
    def name(self) -> str:
        return self.request.name

    @property
    def experiment_dir(self) -> str:
        return self.request.experiment_dir

    @property
    def measures_latency(self) -> bool:
        return "latency" in parse_objectives(self.request.objectives)

    @property
    def trials_dir(self) -> str:
        return storage.join(self.experiment_dir, TRIALS_DIR)

    def trial_config(self, params: dict[str, Any]) -> RunConfig:
        config = self.base.with_overrides(self.space.to_overrides(params))
        config.role = "gankd"
        config.optim.epochs = self.request.max_epochs
        return config


def concurrency_limit(job: SearchJob, resources: dict[str, float]) -> int:
    """How many trials the cluster can run at once, so trials never wait on each other (no deadlock).

    Each trial's driver takes no resources; its workers take ``workers * cpus`` (and GPUs).
    Raises ``InputError`` when even one trial can never fit.
    """
    need = job.request.resources.total()
    limit = math.floor(resources.get("CPU", 0) / need["CPU"] + 1e-9)
    if job.request.resources.use_gpu:
        limit = min(limit, math.floor(resources.get("GPU", 0) / need["GPU"] + 1e-9))
    if limit < 1:
        raise InputError(
            f"one trial needs {need['CPU']:g} CPU"
            + (f" and {need['GPU']:g} GPU" if job.request.resources.use_gpu else "")
            + f" but the cluster has {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU in all"
        )
    if job.request.max_concurrent:
        limit = min(limit, job.request.max_concurrent)
    return max(1, min(limit, job.request.num_samples, head_node_limit()))


def head_node_limit() -> int:
    """Trials the head node's resource admits: each running trial holds ``HEAD_NODE_SHARE`` of it for its driver
    and as much for its run's reaper, so past this many the last runs' reapers could not be placed
    (bench/scale_sim.py: 512 one-GPU trials would need 1.024 of it)."""
    share = sum(ray_compat.head_node_share().values())
    return math.floor(1.0 / (2 * share) + 1e-9) if share else 1 << 30


def trial_driver(params: dict[str, Any], job: SearchJob) -> None:
    """Tune trainable: one trial = one TorchTrainer run named after the trial id.

    The unique name matters: Train resumes any run with the same (storage, name), so a shared name would
    make trials resume each other. The same name also makes a restored trial continue its own run.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gankd_ray.cluster import apply_train_env_defaults
    from gankd_ray.train.run import build_trainer

    apply_train_env_defaults()
    trial_id = ray.tune.get_context().get_trial_id()
    train_job = TrainJob(
        config=job.trial_config(params),
        storage=job.trials_dir,
        name=trial_id,
        teacher=job.teacher,
        resources=job.request.resources,
        max_failures=job.max_failures,
        context=RunContext(trial_id=trial_id, trial_started=time.time()),
        measure_cost=job.measures_latency,
    )
    finished = finished_run(train_job.run_dir)
    if finished is not None:  # a restored search: the run ended before the driver was killed
        ray.tune.report(finished.to_dict())
        return
    storage.write_text(storage.join(train_job.run_dir, RESOLVED_CONFIG_FILE), train_job.config.to_yaml())
    build_trainer(train_job, callbacks=[TuneReportCallback()]).fit()


def finished_run(run_dir: str) -> EpochRecord | None:
    """The last epoch record of a Train run that already ended (completed or diverged), else None.

    Tune restores trials whose end it had not yet saved; rerunning their trainer would report nothing
    (the run resumes past its last epoch) and Tune needs one result, so the driver reports the record.
    """
    records = read_records(run_dir)
    if records and records[-1].status.ended:
        return records[-1]
    return None


def build_tuner(job: SearchJob, resources: dict[str, float], verbose: bool = False):
    """A fresh Tuner for ``job`` (use ``restore_tuner`` to continue an interrupted one). Its console is
    ``TrialConsole``'s lines; ``verbose`` adds Tune's own output."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from gankd_ray.tune.console import TrialConsole

    # Multi-objective: Optuna is told both at each trial's end; ASHA (TuneConfig's metric) still cuts on the score.
    searcher = OptunaSearch(
        space=job.space.sample,
        metric=[METRIC, LATENCY_METRIC] if job.measures_latency else METRIC,
        mode=[MODE, "min"] if job.measures_latency else MODE,
        sampler=build_sampler(job),
        study_name=job.name,
        storage=_optuna_storage(job.request.optuna_storage),
    )
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=job.request.max_epochs,
            grace_period=job.request.grace_period,
            reduction_factor=job.request.reduction_factor,
        )
        if job.request.scheduler == "asha"
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        _trainable(job),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=job.request.num_samples,
            max_concurrent_trials=concurrency_limit(job, resources),
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=job.experiment_dir,
            stop=GanHealthStopper(job.request.gan_patience) if job.request.gan_patience else None,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            callbacks=[TrialConsole(), *tracking_callbacks(job)],
            verbose=1 if verbose else 0,
        ),
    )


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the space: a third of a small budget (at least 2, at most Optuna's own
    default of 10), so a 6-trial search is not random throughout (at 4 start-up trials of 6 it was)."""
    return max(2, min(10, num_samples // 3))


def build_sampler(job: SearchJob):
    """Seeded TPE over the joint (``multivariate``), conditional (``group``: the critic's knobs exist only for
    the losses that use them) space, with ``constant_liar`` so concurrent trials do not all sample the same
    region; or Optuna's RandomSampler (the baseline a search must beat at equal budget)."""
    import warnings

    import optuna

    # The search's console shows what a user needs; Optuna's INFO lines ("A new study created in memory ...")
    # are not that. Warnings still show.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.request.sampler == "random":
        return optuna.samplers.RandomSampler(seed=job.request.seed)
    with warnings.catch_warnings():  # multivariate, group and constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=job.request.seed,
            n_startup_trials=startup_trials(job.request.num_samples),
            multivariate=True,
            group=True,
            constant_liar=True,
        )


class GanHealthStopper:
    """A Tune stopper: ends a trial once ``gan_verdict`` says its adversarial game has ended (the trial's table
    row then reads ``gan_failed`` with the reason, from the same verdict on its metrics log). A plain callable:
    Tune wraps it in its FunctionStopper, and this module need not import Ray."""

    def __init__(self, patience: int):
        self.patience = patience
        self.history: dict[str, list[dict[str, float]]] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        epochs = self.history.setdefault(trial_id, [])
        epochs.append({k: v for k, v in result.items() if isinstance(v, float)})
        return gan_verdict(epochs, self.patience) is not None


def restore_tuner(job: SearchJob):
    import ray.tune

    return ray.tune.Tuner.restore(
        storage.join(job.experiment_dir, TUNE_DIR),
        trainable=_trainable(job),
        resume_unfinished=True,
        resume_errored=False,
    )


def can_restore(job: SearchJob) -> bool:
    import ray.tune

    return ray.tune.Tuner.can_restore(storage.join(job.experiment_dir, TUNE_DIR))


def _trainable(job: SearchJob):
    import ray.tune

    # The driver only waits on its TorchTrainer; the workers hold the CPUs. Giving the driver 0 CPU is
    # what lets concurrency_limit() fill the cluster without trials waiting on each other.
    return ray.tune.with_resources(ray.tune.with_parameters(trial_driver, job=job), DRIVER_RESOURCES)


def _optuna_storage(value: str | None):
    from gankd_ray.tune.optuna_storage import open_storage

    return open_storage(value)  # pickled by Tune without the URL's password (see optuna_storage.py)
