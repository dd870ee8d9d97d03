"""Search results: ``trials.parquet`` (one row per trial) and ``epochs.parquet`` (one row per epoch).

Built from what lasts on storage, not from driver memory: each trial's Train run writes
``trials/<trial_id>/metrics.jsonl`` and Tune's ResultGrid gives status, errors and hyperparameters, so the
tables are complete after a resumed search too.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pandas as pd

from gankd_ray import ray_compat, storage
from gankd_ray.distill.health import gan_verdict
from gankd_ray.records import Cost, EpochRecord, Status, best_record, read_records

TRIAL_COLUMNS = "trial_id status epochs best_map best_ap50 last_map wall_s node error gan_reason".split()
COST_COLUMNS = [f.name for f in dataclasses.fields(Cost)]  # set by --objectives map,latency


def trial_row(
    trial_id: str,
    params: dict[str, Any],
    records: list[EpochRecord],
    error: str | None,
    max_epochs: int,
    keys: list[str],
    gan_patience: int = 0,
) -> dict[str, Any]:
    """One trials.parquet row from a trial's epoch records and Tune's error (if any).

    ``gan_patience``: the search's GanHealthStopper patience; a trial that stopped early on its verdict is
    ``gan_failed``, with the verdict in ``gan_reason``.
    """
    row: dict[str, Any] = {"trial_id": trial_id, "error": error, "gan_reason": None}
    row["epochs"] = max((r.epoch for r in records), default=0)
    best = best_record([r for r in records if r.status is not Status.DIVERGED])
    row["best_map"] = _or_nan(best.map if best else None)
    row["best_ap50"] = _or_nan(best.ap50 if best else None)
    row["best_epoch"] = best.epoch if best else None
    row["best_checkpoint"] = best.checkpoint if best else None
    row["last_map"] = _or_nan(records[-1].map if records else None)
    row["wall_s"] = _wall_seconds(records)
    row["node"] = _nodes(records)
    status = _status(records, error, max_epochs)
    if status is Status.STOPPED_EARLY and gan_patience:
        row["gan_reason"] = gan_verdict([r.terms for r in records], gan_patience)
        status = Status.GAN_FAILED if row["gan_reason"] else status
    row["status"] = status.value
    cost = records[-1].cost if records else None
    for name in COST_COLUMNS:
        row[name] = getattr(cost, name, None)
    for key in keys:
        row[key] = params.get(key)
    return row


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _status(records: list[EpochRecord], error: str | None, max_epochs: int) -> Status:
    if records and records[-1].status is Status.DIVERGED:
        return Status.DIVERGED
    if error:
        return Status.ERROR
    if records and records[-1].epoch >= max_epochs:
        return Status.COMPLETED
    return Status.STOPPED_EARLY


def _nodes(records: list[EpochRecord]) -> str | None:
    """Every node the trial ran on, in order, comma-separated (a restart elsewhere adds one)."""
    nodes: list[str] = []
    for record in records:
        if record.node and (not nodes or nodes[-1] != record.node):
            nodes.append(record.node)
    return ",".join(nodes) or None


def _wall_seconds(records: list[EpochRecord]) -> float:
    started = [r.context.trial_started for r in records if r.context.trial_started is not None]
    ended = [r.reported_at for r in records if r.reported_at is not None]
    if not started or not ended:
        return float("nan")
    return max(ended) - min(started)


def collect(
    result_grid, trials_dir: str, max_epochs: int, keys: list[str], gan_patience: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, epochs) tables from a Tune ResultGrid and the trials' metrics logs."""
    trial_rows, epoch_rows = [], []
    for result in result_grid:
        trial_id = _trial_id(result)
        records = read_records(storage.join(trials_dir, trial_id))
        params = {k: v for k, v in (result.config or {}).items() if k in keys}
        error = _one_line(result.error) if result.error else None
        trial_rows.append(trial_row(trial_id, params, records, error, max_epochs, keys, gan_patience))
        epoch_rows.extend({"trial_id": trial_id, **r.to_dict()} for r in records)
    trials = pd.DataFrame(trial_rows)
    for column in TRIAL_COLUMNS + keys:
        if column not in trials:
            trials[column] = None
    ordered = TRIAL_COLUMNS + [k for k in keys if k not in TRIAL_COLUMNS]
    trials = trials[ordered + [c for c in trials.columns if c not in ordered]]
    if "latency_ms" in trials and trials["latency_ms"].notna().any():  # a map,latency search: its front
        from gankd_ray.tune.pareto import pareto_mask

        trials["is_pareto"] = pareto_mask(trials, ["map", "latency"])
    return trials, pd.DataFrame(epoch_rows)


def _trial_id(result) -> str:
    """Tune's id of a trial (also its Train run's folder name under trials/): from the metrics Tune fills in,
    else from the name of Tune's trial directory (a Ray hook), else that directory itself."""
    metrics = result.metrics or {}
    if metrics.get("trial_id"):
        return metrics["trial_id"]
    return ray_compat.trial_id_from_dir(result.path) or str(result.path)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


def write_tables(experiment_dir: str, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    for name, frame in (("trials.parquet", trials), ("epochs.parquet", epochs)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        storage.write_bytes(storage.join(experiment_dir, name), buffer.getvalue())


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The healthy trial (not diverged, not errored) with the highest best val mAP."""
    healthy = trials[~trials["status"].isin([Status.DIVERGED.value, Status.ERROR.value]) & trials["best_map"].notna()]
    if healthy.empty:
        return None
    return healthy.sort_values("best_map", ascending=False).iloc[0]
