"""Driver side of one training run: checks inputs, builds the TorchTrainer, logs per-epoch metrics.

The same ``build_trainer`` serves the single-run CLI (``launch/train.py``) and each Tune trial.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ray.train.v2.api.callback import UserCallback

from gankd_ray import storage
from gankd_ray.config import RunConfig
from gankd_ray.errors import InputError, StorageFailure  # InputError: imported from here too
from gankd_ray.train.checkpoint import CheckpointError, load_detector

METRICS_FILE = "metrics.jsonl"
RESOLVED_CONFIG_FILE = "resolved_config.yaml"


class StorageFullError(StorageFailure):
    """The run's storage filled up (or hit its quota), or stopped answering, while the run wrote to it; the
    message names it and says that rerunning the same command resumes (exit status 4)."""


STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class TrainJob:
    """One TorchTrainer run: what to train, where it lives, and its resources."""

    config: RunConfig
    storage: str
    name: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    teacher: str | None = None
    max_failures: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Workers run in other working directories (and on other nodes): only absolute locations travel.
        self.storage = storage.normalize_uri(self.storage)
        if self.teacher:
            self.teacher = storage.normalize_uri(self.teacher)

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)

    def loop_config(self) -> dict[str, Any]:
        """What each worker receives: plain data only (it crosses process boundaries)."""
        return {
            "run": self.config.to_dict(),
            "teacher": self.teacher,
            "cpus_per_worker": self.cpus_per_worker,
            "use_gpu": self.gpus_per_worker > 0,
            **self.extra,
        }


def resolve_job(job: TrainJob) -> TrainJob:
    """Check every input and fill what the dataset and teacher imply. Raises ``InputError`` (or a subclass).

    Runs before Ray starts so that bad input costs seconds: data path and format, teacher file,
    teacher/dataset/student compatibility, config values, storage writability.
    """
    from gankd_ray.data import DatasetError, read_dataset_info

    cfg = job.config
    if not cfg.data.path:
        raise InputError("--data: no dataset given")
    cfg.data.path = storage.normalize_uri(cfg.data.path)
    try:
        info = read_dataset_info(cfg.data.path)
    except DatasetError as err:
        raise err.under("--data") from None
    except OSError as err:
        raise InputError(str(err), flag="--data") from None
    num_classes = len(info["classes"])
    if cfg.detector.num_classes not in (0, num_classes):
        raise InputError(
            f"detector.num_classes={cfg.detector.num_classes} but dataset {cfg.data.path} has {num_classes} classes"
        )
    cfg.detector.num_classes = num_classes
    if cfg.role == "gankd":
        cfg.teacher = _check_teacher(job.teacher, cfg, info)
    elif job.teacher:
        raise InputError(f"--teacher is only used with --role gankd (role is {cfg.role})")
    cfg.validate()
    _check_levels(cfg)
    if job.workers < 1 or job.cpus_per_worker <= 0 or job.gpus_per_worker < 0:
        raise InputError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
    try:
        storage.check_writable(job.run_dir)
    except OSError as err:
        raise InputError(str(err), flag="--storage") from None
    return job


def _check_teacher(teacher: str | None, cfg: RunConfig, info: dict[str, Any]):
    if not teacher:
        raise InputError("--role gankd needs --teacher CKPT (a checkpoint of a teacher run)")
    try:
        # Build it and load its weights now: a file whose weights belong to another architecture than
        # its config names would otherwise only fail inside the Ray workers.
        _, teacher_cfg = load_detector(teacher)
    except CheckpointError as err:
        raise err.under("--teacher") from None
    tdet = teacher_cfg.detector
    if tdet.num_classes != len(info["classes"]):
        raise InputError(
            f"--teacher {teacher}: teacher has {tdet.num_classes} classes, dataset {cfg.data.path} has "
            f"{len(info['classes'])}"
        )
    if tdet.image_size != cfg.detector.image_size:
        raise InputError(
            f"--teacher {teacher}: teacher input size {tdet.image_size} != student input size "
            f"{cfg.detector.image_size} (set detector.image_size={tdet.image_size})"
        )
    return dataclasses.replace(tdet, weights=None)


def _check_levels(cfg: RunConfig) -> None:
    # Every role: a search builds its GAN-KD trials from the baseline's config, levels included.
    if not cfg.distill.levels:
        return
    from gankd_ray.models import level_names_for

    known = level_names_for(cfg.detector)
    unknown = [lvl for lvl in cfg.distill.levels if lvl not in known]
    if unknown:
        raise InputError(f"distill.levels: {unknown[0]!r} is not a level of {cfg.detector.backbone} ({', '.join(known)})")


# --------------------------------------------------------------------------------------------
# Ray side


def build_trainer(job: TrainJob, callbacks: Sequence[Any] = ()):
    """A TorchTrainer for ``job``; reusing (storage, name) resumes that run from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig

    from gankd_ray.train.loop import train_loop_per_worker
    from gankd_ray.train.trainer import GankdTorchTrainer

    use_gpu = job.gpus_per_worker > 0
    resources = {"CPU": job.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = job.gpus_per_worker
    return GankdTorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.loop_config(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=use_gpu, resources_per_worker=resources
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
    """Runs in the Train controller: one JSON line per reported epoch, plus a progress line.

    The file is rewritten whole each epoch (object stores cannot append). On a resumed run, lines of
    epochs at or after the first newly reported one are dropped, so no epoch appears twice. Checkpoints are
    recorded as full locations (``s3://bucket/...`` on object storage), readable from any node.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = storage.join(run_dir, METRICS_FILE)
        self._records: list[dict[str, Any]] | None = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        record = {k: v for k, v in metrics[0].items() if _is_plain(v)}
        if checkpoint is not None:
            record["checkpoint"] = storage.uri_of(checkpoint.filesystem, checkpoint.path)
        if self._records is None:
            self._records = read_metrics(self.run_dir)
        epoch = record.get("epoch")
        self._records = [r for r in self._records if epoch is None or r.get("epoch", -1) < epoch]
        self._records.append(record)
        storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._records))
        print(format_progress(record, os.path.basename(self.run_dir.rstrip("/"))), flush=True)


def _is_plain(value: Any) -> bool:
    return isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value)) or value is None


def format_progress(record: dict[str, Any], run_name: str) -> str:
    """One line per epoch, named after the run: a search's teacher, baseline and trials train at once."""
    parts = [f"{run_name}: epoch {record.get('epoch')}/{record.get('epochs', '?')}"]
    for key in ("map", "ap50", "loss/total", "images_per_s"):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{key} {record[key]:.4g}")
    parts.append(f"status {record.get('status', '?')}")
    return "[gankd-ray] " + "  ".join(parts)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def run_training(job: TrainJob, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit ``job`` (Ray must be initialised) and summarise it from its metrics log.

    Returns ``{"status", "best_map", "best_ap50", "best_epoch", "checkpoint", "epochs_done", "run_dir"}``.
    """
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
        return StorageFullError(f"--storage {storage_uri}: no space left while writing {target} (free some space, "
                                f"{resume})")
    cause = _object_storage_failure(err)
    if cause is not None:
        return StorageFullError(f"--storage {storage_uri}: storage failed during the run ({cause}); {resume}")
    return None


def _is_storage_full(err: BaseException) -> bool:
    """Whether ``err`` (a Ray Train failure, possibly from a worker or the controller) is a full disk or quota.

    Ray wraps a worker's ``OSError`` and rebuilds it in this process, so its text is checked as well as its errno.
    """
    return any((isinstance(cause, OSError) and cause.errno in STORAGE_FULL_ERRNOS)
               or any(os.strerror(code) in str(cause) for code in STORAGE_FULL_ERRNOS) for cause in _causes(err))


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
        nested = [cause.__cause__, cause.__context__, getattr(cause, "controller_failure", None),
                  *getattr(cause, "worker_failures", {}).values()]
        seen.extend(e for e in nested if isinstance(e, BaseException) and e not in seen)
    return seen


def best_record(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch whose checkpoint Ray keeps (num_to_keep=1 by "map"): the highest mAP, ties to the later
    epoch (a search whose trials all score 0 exported a deleted checkpoint when ties went to the first)."""
    def rank(r: dict[str, Any]) -> tuple[float, int]:
        return (r["map"] if isinstance(r.get("map"), (int, float)) else -1.0, r.get("epoch") or 0)

    return max(records, key=rank, default=None)


def summarize(run_dir: str) -> dict[str, Any]:
    records = read_metrics(run_dir)
    if not records:
        return {"status": "error", "run_dir": run_dir, "epochs_done": 0}
    best = best_record(records)
    return {
        "status": records[-1].get("status"),
        "best_map": best.get("map"),
        "best_ap50": best.get("ap50"),
        "best_epoch": best.get("epoch"),
        "checkpoint": best.get("checkpoint"),
        "epochs_done": records[-1].get("epoch"),
        "run_dir": run_dir,
    }
