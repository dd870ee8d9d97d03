"""Driver side of one training run: checks inputs, builds the TorchTrainer, logs per-epoch metrics.

The same ``build_trainer`` serves the single-run CLI (``launch/train.py``) and each Tune trial.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from ray.train import UserCallback

from gankd_ray import ray_compat, storage
from gankd_ray.errors import InputError, StorageFailure, UserError
from gankd_ray.records import EpochRecord, RecordLog, RunSummary, read_records, summarize
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

    from gankd_ray.train.loop import JOB_KEY, train_loop_per_worker

    resources = job.resources
    return ray_compat.torch_trainer(
        train_loop_per_worker,
        backend=resources.backend,
        train_loop_config={JOB_KEY: job},
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
    """Runs in the Train controller: the run's ``metrics.jsonl`` (``RecordLog``).

    Checkpoints are recorded as full locations (``s3://bucket/...`` on object storage), readable from any node.
    It prints nothing: the controller's output reaches the console only through Ray's log forwarding, which a
    search turns off; the driver prints the progress lines (``ProgressFollower``, or a search's Tune callback).
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.log = RecordLog(run_dir)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        record = EpochRecord.from_dict(metrics[0])
        if checkpoint is not None:
            record.checkpoint = storage.uri_of(checkpoint.filesystem, checkpoint.path)
        self.log.add(record)


def format_progress(record: EpochRecord, run_name: str) -> str:
    """One line per epoch, named after the run (a search's teacher and baseline train at once):
    ``[gankd-ray] run teacher: epoch 2/4  map ...`` (``run``: told apart from the CLI's summary line)."""
    parts = [f"run {run_name}: epoch {record.epoch}/{record.epochs}"]
    figures = {
        "map": record.map,
        "ap50": record.ap50,
        "loss/total": record.terms.get("loss/total"),
        "images_per_s": record.throughput.images_per_s,
    }
    parts.extend(f"{key} {value:.4g}" for key, value in figures.items() if isinstance(value, (int, float)))
    parts.append(f"status {record.status}")
    return "[gankd-ray] " + "  ".join(parts)


class ProgressFollower(threading.Thread):
    """Prints a run's progress from the driver: its new ``metrics.jsonl`` records (``format_progress``), and a
    line every ``heartbeat_s`` while an epoch takes that long. Records already there when it starts (a resumed
    run's earlier epochs) are not repeated. Use it as a context manager around ``fit()``."""

    def __init__(self, run_dir: str, epochs: int, poll_s: float = 2.0, heartbeat_s: float = 60.0):
        super().__init__(name=f"progress-{os.path.basename(run_dir.rstrip('/'))}", daemon=True)
        self.run_dir, self.epochs, self.poll_s, self.heartbeat_s = run_dir, epochs, poll_s, heartbeat_s
        self.run_name = os.path.basename(run_dir.rstrip("/"))
        self.seen = len(self._records() or [])
        self.stopped = threading.Event()

    def __enter__(self) -> ProgressFollower:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.join()

    def run(self) -> None:
        started = last_news = time.monotonic()
        while not self.stopped.wait(self.poll_s):
            if self._print_new():
                last_news = time.monotonic()
            elif time.monotonic() - last_news >= self.heartbeat_s:
                last_news = time.monotonic()
                minutes, seconds = divmod(int(last_news - started), 60)
                print(
                    f"[gankd-ray] run {self.run_name}: epoch {self.seen + 1}/{self.epochs} running "
                    f"({minutes}m{seconds:02d}s since start)",
                    flush=True,
                )
        self._print_new()  # the epochs reported between the last poll and the end of fit()

    def _print_new(self) -> bool:
        records = self._records()
        if not records or len(records) <= self.seen:
            return False
        for record in records[self.seen :]:
            print(format_progress(record, self.run_name), flush=True)
        self.seen = len(records)
        return True

    def _records(self) -> list[EpochRecord] | None:
        try:
            return read_records(self.run_dir)
        except (OSError, ValueError):  # the log is being rewritten (RecordLog rewrites it whole): next poll
            return None


def run_training(job: TrainJob, callbacks: Sequence[Any] = ()) -> RunSummary:
    """Fit ``job`` (Ray must be initialised), printing its progress, and summarise it from its metrics log."""
    try:
        storage.write_text(storage.join(job.run_dir, RESOLVED_CONFIG_FILE), job.config.to_yaml())
        with ProgressFollower(job.run_dir, job.config.optim.epochs):
            build_trainer(job, callbacks).fit()
    except Exception as err:
        failure = storage_full_error(err, job.storage, job.run_dir) or worker_user_error(err)
        if failure is None:
            raise
        raise failure from None
    return summarize(job.run_dir)


def worker_user_error(err: BaseException) -> UserError | None:
    """The project's own one-line error (bad input found while training, e.g. an image that no longer decodes)
    that a worker or the controller raised, as it was raised there; None when no cause of ``err`` is one.

    Ray rebuilds a remote exception as a class deriving from both ``RayTaskError`` and the original's class,
    whose text holds the remote traceback; its ``cause`` is the original exception.
    """
    for cause in _causes(err):
        if isinstance(cause, UserError):
            original = getattr(cause, "cause", None)
            return original if isinstance(original, UserError) else cause
    return None


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
        if storage.is_outage(cause) or "StorageError: " in str(cause):  # rebuilt by Ray from another process
            return storage.reason(cause)
    return None


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and everything it wraps: chained exceptions and Ray Train's controller and worker failures."""
    seen: list[BaseException] = [err]
    for cause in seen:
        nested = [cause.__cause__, cause.__context__, *ray_compat.train_failure_causes(cause)]
        seen.extend(e for e in nested if isinstance(e, BaseException) and e not in seen)
    return seen
