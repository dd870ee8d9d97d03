"""Search results: ``trials.parquet`` (one row per trial) and ``epochs.parquet`` (one row per epoch).

Built from what lasts on storage, not from driver memory: each trial's Train run writes
``trials/<trial_id>/metrics.jsonl`` and Tune's ResultGrid gives status, errors and hyperparameters, so the
tables are complete after a resumed search too.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd

from gankd_ray import ray_compat, storage
from gankd_ray.train.run import best_record, read_metrics

COMPLETED = "completed"
STOPPED_EARLY = "stopped_early"
DIVERGED = "diverged"
ERROR = "error"
TRIAL_COLUMNS = ["trial_id", "status", "epochs", "best_map", "best_ap50", "last_map", "wall_s", "node", "error"]


def trial_row(trial_id: str, params: dict[str, Any], records: list[dict[str, Any]], error: str | None,
              max_epochs: int, keys: list[str]) -> dict[str, Any]:
    """One trials.parquet row from a trial's epoch records and Tune's error (if any)."""
    row: dict[str, Any] = {"trial_id": trial_id, "error": error}
    row["epochs"] = max((r.get("epoch", 0) for r in records), default=0)
    healthy = [r for r in records if r.get("status") != DIVERGED]
    best = best_record(healthy)
    row["best_map"] = best.get("map") if best else float("nan")
    row["best_ap50"] = best.get("ap50") if best else float("nan")
    row["best_epoch"] = best.get("epoch") if best else None
    row["best_checkpoint"] = best.get("checkpoint") if best else None
    row["last_map"] = records[-1].get("map") if records else float("nan")
    row["wall_s"] = _wall_seconds(records)
    row["node"] = _nodes(records)
    row["status"] = _status(records, error, max_epochs)
    for key in keys:
        row[key] = params.get(key)
    return row


def _status(records: list[dict[str, Any]], error: str | None, max_epochs: int) -> str:
    if records and records[-1].get("status") == DIVERGED:
        return DIVERGED
    if error:
        return ERROR
    if records and records[-1].get("epoch", 0) >= max_epochs:
        return COMPLETED
    return STOPPED_EARLY


def _nodes(records: list[dict[str, Any]]) -> str | None:
    """Every node the trial ran on, in order, comma-separated (a restart elsewhere adds one)."""
    nodes: list[str] = []
    for record in records:
        if record.get("node") and (not nodes or nodes[-1] != record["node"]):
            nodes.append(record["node"])
    return ",".join(nodes) or None


def _wall_seconds(records: list[dict[str, Any]]) -> float:
    started = [r["trial_started"] for r in records if "trial_started" in r]
    ended = [r["reported_at"] for r in records if "reported_at" in r]
    if not started or not ended:
        return float("nan")
    return max(ended) - min(started)


def collect(result_grid, trials_dir: str, max_epochs: int, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, epochs) tables from a Tune ResultGrid and the trials' metrics logs."""
    trial_rows, epoch_rows = [], []
    for result in result_grid:
        trial_id = _trial_id(result)
        records = read_metrics(storage.join(trials_dir, trial_id))
        params = {k: v for k, v in (result.config or {}).items() if k in keys}
        error = _one_line(result.error) if result.error else None
        trial_rows.append(trial_row(trial_id, params, records, error, max_epochs, keys))
        epoch_rows.extend({"trial_id": trial_id, **r} for r in records)
    trials = pd.DataFrame(trial_rows)
    for column in TRIAL_COLUMNS + keys:
        if column not in trials:
            trials[column] = None
    ordered = TRIAL_COLUMNS + [k for k in keys if k not in TRIAL_COLUMNS]
    trials = trials[ordered + [c for c in trials.columns if c not in ordered]]
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
    healthy = trials[~trials["status"].isin([DIVERGED, ERROR]) & trials["best_map"].notna()]
    if healthy.empty:
        return None
    return healthy.sort_values("best_map", ascending=False).iloc[0]
