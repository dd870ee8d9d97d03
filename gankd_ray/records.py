"""What a run records: its status, one record per epoch, and the summary drawn from them.

``metrics.jsonl`` (one flat JSON object per epoch, rewritten whole each epoch: object stores cannot append) is
written by ``RecordLog`` and read by ``read_records`` only; Ray's ``train.report``/Tune, the trial tables
(``tune/results.py``) and the report see the same flat form (``EpochRecord.to_dict``). A record's quality
figures are COCO's (``map``, ``ap50``, ...), its terms are the step's means over the epoch (``loss/total``,
``disc/level0/acc``, ``lr``, ...).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gankd_ray import storage

METRICS_FILE = "metrics.jsonl"


class Status(str, enum.Enum):
    """How a run (or a trial) stands. A ``str``: records hold, and users filter on, the plain word."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"  # a non-finite loss: the recipe failed (scored 0 for the scheduler and the searcher)
    STOPPED_EARLY = "stopped_early"  # a trial ASHA stopped (tables only: its run never learns it was stopped)
    GAN_FAILED = "gan_failed"  # a trial stopped because its adversarial game had ended (tables only; see
    # gankd_ray.distill.health): its student is as good as its best epoch, but the search spent no more on it
    ERROR = "error"  # a trial that raised, or a run without a single record

    def __str__(self) -> str:
        return self.value

    @property
    def ended(self) -> bool:
        """A run in this state reports no more epochs."""
        return self in (Status.COMPLETED, Status.DIVERGED)


# A diverged epoch's quality: the recipe failed, whatever the last finite weights would score.
DIVERGED_QUALITY = {"map": 0.0, "ap50": 0.0}


@dataclass
class RunContext:
    """Who runs the run, recorded with every epoch: a search's trial (empty for a single run)."""

    trial_id: str | None = None
    trial_started: float | None = None  # wall time the trial driver started (its start-up cost begins here)


@dataclass
class Throughput:
    """How one epoch went over every rank: images trained (and distinct ids among them), seconds spent."""

    world_size: int = 1
    images_per_s: float = 0.0
    train_images: int = 0
    train_unique_images: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class Cost:
    """What the student costs to run, measured once per run when the search asks (``--objectives
    map,latency``; ``gankd_ray.export.latency``): median and p90 latency of one image, the CPU threads of the
    measurement, parameters and forward GFLOPs. Unset otherwise."""

    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_threads: int | None = None
    student_params: int | None = None
    student_gflops: float | None = None


@dataclass
class EpochRecord:
    """One reported epoch. ``best_*`` are over this run's epochs so far; ``checkpoint`` is the full location
    (``s3://...`` on object storage) of the checkpoint Ray kept for this epoch, filled by the driver."""

    epoch: int
    epochs: int
    status: Status
    quality: dict[str, float] = field(default_factory=dict)
    terms: dict[str, float] = field(default_factory=dict)
    throughput: Throughput = field(default_factory=Throughput)
    best_map: float | None = None
    best_ap50: float | None = None
    best_epoch: int | None = None
    # what the searcher and ASHA compare (gankd_ray.tune.search.METRIC): best_map, 0 once the run diverged
    score: float | None = None
    node: str | None = None
    reported_at: float | None = None
    # start-up accounting, first epoch of a worker only: when the worker started and finished its first step
    worker_started_at: float | None = None
    first_step_at: float | None = None
    checkpoint: str | None = None
    context: RunContext = field(default_factory=RunContext)
    cost: Cost = field(default_factory=Cost)

    @property
    def map(self) -> float | None:
        return self.quality.get("map")

    @property
    def ap50(self) -> float | None:
        return self.quality.get("ap50")

    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-safe form (non-finite numbers and unset fields are left out)."""
        flat: dict[str, Any] = {**self.terms, **self.quality}
        for name in _SCALAR_FIELDS:
            flat[name] = getattr(self, name)
        flat["status"] = self.status.value
        flat.update(dataclasses.asdict(self.throughput))
        flat.update(dataclasses.asdict(self.context))
        flat.update(dataclasses.asdict(self.cost))
        return {key: value for key, value in flat.items() if _is_plain(value) and value is not None}

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> EpochRecord:
        """The inverse of ``to_dict``: known fields by name, COCO figures to ``quality``, other numbers to ``terms``."""
        flat = dict(flat)
        kinds = (("throughput", Throughput), ("context", RunContext), ("cost", Cost))
        parts = {name: _pop_fields(flat, kind) for name, kind in kinds}
        scalars = {name: flat.pop(name, None) for name in _SCALAR_FIELDS}
        status = Status(flat.pop("status", Status.RUNNING))
        quality = {k: flat.pop(k) for k in list(flat) if k in QUALITY_KEYS}
        terms = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return cls(
            status=status,
            quality=quality,
            terms=terms,
            throughput=Throughput(**parts["throughput"]),
            context=RunContext(**parts["context"]),
            cost=Cost(**parts["cost"]),
            **scalars,
        )


# COCOeval's figures, in COCOeval.stats order (bbox): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1,
# AR@10, AR@100, AR small/medium/large. A record's quality; the rest of its numbers are terms.
QUALITY_KEYS = tuple("map ap50 ap75 ap_small ap_medium ap_large ar1 ar10 ar100 ar_small ar_medium ar_large".split())
_SCALAR_FIELDS = (
    "epoch",
    "epochs",
    "best_map",
    "best_ap50",
    "best_epoch",
    "score",
    "node",
    "reported_at",
    "worker_started_at",
    "first_step_at",
    "checkpoint",
)


def _pop_fields(flat: dict[str, Any], kind: type) -> dict[str, Any]:
    return {f.name: flat.pop(f.name) for f in dataclasses.fields(kind) if f.name in flat}


def _is_plain(value: Any) -> bool:
    return isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value)) or value is None


# --------------------------------------------------------------------------------------------
# the log on storage


def read_records(run_dir: str) -> list[EpochRecord]:
    """A run's epoch records, oldest first (empty when it has reported nothing yet)."""
    return [EpochRecord.from_dict(flat) for flat in read_metrics(run_dir)]


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """A run's epoch records in their flat form (what tables and tests read)."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def write_records(run_dir: str, records: Iterable[EpochRecord]) -> None:
    text = "".join(json.dumps(record.to_dict()) + "\n" for record in records)
    storage.write_text(storage.join(run_dir, METRICS_FILE), text)


class RecordLog:
    """A run's ``metrics.jsonl``, kept in memory and rewritten whole on each ``add``.

    On a resumed run, records of epochs at or after the first newly added one are dropped, so no epoch
    appears twice.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._records: list[EpochRecord] | None = None

    def add(self, record: EpochRecord) -> None:
        if self._records is None:
            self._records = read_records(self.run_dir)
        self._records = [r for r in self._records if r.epoch < record.epoch]
        self._records.append(record)
        write_records(self.run_dir, self._records)


# --------------------------------------------------------------------------------------------
# what a run achieved


def best_record(records: Sequence[EpochRecord]) -> EpochRecord | None:
    """The epoch whose checkpoint Ray keeps (num_to_keep=1 by "map"): the highest mAP, ties to the later
    epoch (a search whose trials all score 0 exported a deleted checkpoint when ties went to the first)."""

    def rank(record: EpochRecord) -> tuple[float, int]:
        return (record.map if record.map is not None else -1.0, record.epoch or 0)

    return max(records, key=rank, default=None)


@dataclass
class RunSummary:
    """A run at a glance: how it stands and its best epoch (``best_*`` are None before a scored epoch)."""

    status: Status
    run_dir: str
    epochs_done: int = 0
    best_map: float | None = None
    best_ap50: float | None = None
    best_epoch: int | None = None
    checkpoint: str | None = None


def summarize(run_dir: str) -> RunSummary:
    records = read_records(run_dir)
    if not records:
        return RunSummary(status=Status.ERROR, run_dir=run_dir)
    best = best_record(records)
    return RunSummary(
        status=records[-1].status,
        run_dir=run_dir,
        epochs_done=records[-1].epoch,
        best_map=best.map,
        best_ap50=best.ap50,
        best_epoch=best.epoch,
        checkpoint=best.checkpoint,
    )
