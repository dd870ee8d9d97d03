"""Driver side of one training run: checks inputs, builds the TorchTrainer, logs per-epoch metrics.

The same ``build_trainer`` serves the single-run CLI (``launch/train.py``) and each Tune trial.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from ray.train import UserCallback

from gankd_ray import ray_compat, storage
from gankd_ray.errors import InputError, StorageFailure
from gankd_ray.records import EpochRecord, RecordLog, RunSummary, summarize
from gankd_ray.train.spec import RESOLVED_CONFIG_FILE, Resources, TrainJob, resolve_job

__all__ = ["InputError", "Resources", "StorageFullError", "TrainJob", "build_trainer", "resolve_job", "run_training"]


class StorageFullError(StorageFailure):
    """The run's storage filled up (or hit its quota), or stopped answering, while the run wrote to it; the
    message names it and says that rerunning the same command resumes (exit status 4)."""


STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------------------------
# Ray side


def build_trainer(job: TrainJob, callbacks: Sequence[Any] = ()):
    """A TorchTrainer for ``job``; reusing (storage, name) resumes that run from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig

    from gankd_ray.train.loop import JOB_KEY, train_loop_per_worker

    resources = job.resources
    return ray_compat.torch_trainer_class()(
        train_loop_per_worker,
        train_loop_config={JOB_KEY: job},
        torch_config=TorchConfig(backend=resources.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.use_gpu, resources_per_worker=resources.per_worker()
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=job.storage,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            # Keep the best checkpoint by val mAP; Ray always keeps the latest one too (for resume).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="map", checkpoint_score_order="max"
            ),
            callbacks=[MetricsLog(job.run_dir), *callbacks],
        ),
    )


class MetricsLog(UserCallback):
    """Runs in the Train controller: the run's ``metrics.jsonl`` (``RecordLog``), plus a progress line.

    Checkpoints are recorded as full locations (``s3://bucket/...`` on object storage), readable from any node.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.log = RecordLog(run_dir)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        record = EpochRecord.from_dict(metrics[0])
        if checkpoint is not None:
            record.checkpoint = storage.uri_of(checkpoint.filesystem, checkpoint.path)
        self.log.add(record)
        print(format_progress(record, os.path.basename(self.run_dir.rstrip("/"))), flush=True)


def format_progress(record: EpochRecord, run_name: str) -> str:
    """One line per epoch, named after the run: a search's teacher, baseline and trials train at once."""
    parts = [f"{run_name}: epoch {record.epoch}/{record.epochs}"]
    figures = {
        "map": record.map,
        "ap50": record.ap50,
        "loss/total": record.terms.get("loss/total"),
        "images_per_s": record.throughput.images_per_s,
    }
    parts.extend(f"{key} {value:.4g}" for key, value in figures.items() if isinstance(value, (int, float)))
    parts.append(f"status {record.status}")
    return "[gankd-ray] " + "  ".join(parts)


def run_training(job: TrainJob, callbacks: Sequence[Any] = ()) -> RunSummary:
    """Fit ``job`` (Ray must be initialised) and summarise it from its metrics log."""
    try:
        storage.write_text(storage.join(job.run_dir, RESOLVED_CONFIG_FILE), job.config.to_yaml())
        build_trainer(job, callbacks).fit()
    except Exception as err:
        full = storage_full_error(err, job.storage, job.run_dir)
        if full is None:
            raise
        raise full from None
    return summarize(job.run_dir)


def storage_full_error(err: BaseException, storage_uri: str, target: str) -> StorageFullError | None:
    """A clear ``StorageFullError`` when ``err`` comes from a full disk or quota, or from object storage that
    failed (unreachable, access revoked), while writing ``target``; None for any other failure."""
    if isinstance(err, StorageFullError):
        return err
    resume = "then run the same command again to resume from the last checkpoint"
    if _is_storage_full(err):
        return StorageFullError(
            f"--storage {storage_uri}: no space left while writing {target} (free some space, {resume})"
        )
    cause = _object_storage_failure(err)
    if cause is not None:
        return StorageFullError(f"--storage {storage_uri}: storage failed during the run ({cause}); {resume}")
    return None


def _is_storage_full(err: BaseException) -> bool:
    """Whether ``err`` (a Ray Train failure, possibly from a worker or the controller) is a full disk or quota.

    Ray wraps a worker's ``OSError`` and rebuilds it in this process, so its text is checked as well as its errno.
    """
    return any(
        (isinstance(cause, OSError) and cause.errno in STORAGE_FULL_ERRNOS)
        or any(os.strerror(code) in str(cause) for code in STORAGE_FULL_ERRNOS)
        for cause in _causes(err)
    )


def _object_storage_failure(err: BaseException) -> str | None:
    """The short reason when ``err`` or one of its causes is an object-storage failure (pyarrow's AWS errors)."""
    for cause in _causes(err):
        if isinstance(cause, storage.StorageError) and not isinstance(cause, FileNotFoundError):
            return str(cause)
        if "AWS Error" in str(cause) or "StorageError: " in str(cause):  # rebuilt by Ray from another process
            return storage.reason(cause)
    return None


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and everything it wraps: chained exceptions and Ray Train's controller and worker failures."""
    seen: list[BaseException] = [err]
    for cause in seen:
        nested = [cause.__cause__, cause.__context__, *ray_compat.train_failure_causes(cause)]
        seen.extend(e for e in nested if isinstance(e, BaseException) and e not in seen)
    return seen
