"""Export a trial of a finished search: a row of ``<experiment>/trials.parquet`` -> an export folder.

The search exports its best trial to ``<experiment>/best`` with :func:`export_search_trial`; ``gankd-export``
exports any trial (the best healthy one by default) with :func:`export_trial`, to the same card.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gankd_ray import storage
from gankd_ray.export.card import REFERENCE_KEYS, trial_card
from gankd_ray.export.model import COMPLETE_MARKER, InferenceError, export_errors, export_model, read_card, read_input
from gankd_ray.tune import results as res
from gankd_ray.utils import first_line, plain_value

# trials.parquet columns that are results, not hyperparameters.
RESULT_COLUMNS = frozenset(res.TRIAL_COLUMNS) | set(res.COST_COLUMNS) | {"best_epoch", "best_checkpoint", "is_pareto"}


def read_trials(experiment_dir: str) -> Any:
    """``<experiment_dir>/trials.parquet`` as a DataFrame."""
    import pandas as pd

    path = storage.join(storage.normalize_uri(experiment_dir), "trials.parquet")
    data = read_input(path, "not found (not a finished search experiment directory)")
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # any unreadable table is a user error here
        raise InferenceError(f"{path}: unreadable ({first_line(err)})") from None


def select_trial(trials: Any, trial_id: str | None = None) -> Any:
    """The row of ``trial_id``, or the best healthy trial (``results.best_trial``) when it is ``None``."""
    if "trial_id" not in trials or "best_checkpoint" not in trials:
        raise InferenceError("trials.parquet lacks the trial_id / best_checkpoint columns")
    if trial_id is None:
        for column in ("status", "best_map"):
            if column not in trials:
                raise InferenceError(f"trials.parquet lacks the {column} column")
        row = res.best_trial(trials)
        if row is None:
            raise InferenceError("no healthy trial with a val mAP in trials.parquet (all diverged or failed)")
    else:
        matches = trials[trials["trial_id"].astype(str) == str(trial_id)]
        if matches.empty:
            known = ", ".join(map(str, trials["trial_id"].tolist()[:10]))
            raise InferenceError(f"unknown trial id {trial_id!r} (trials: {known})")
        row = matches.iloc[0]
    if not plain_value(row.get("best_checkpoint")):
        raise InferenceError(f"trial {row['trial_id']} has no checkpoint (it never finished an epoch)")
    return row


def hyperparameter_columns(columns: Sequence[str]) -> list[str]:
    """The columns of ``trials.parquet`` that are search-space keys (every one after the results)."""
    return [c for c in columns if c not in RESULT_COLUMNS]


def model_file_of(checkpoint: str, experiment_dir: str) -> str:
    """``<checkpoint>/model.pt``; a relative checkpoint path is tried against the experiment dir too."""
    file = storage.join(checkpoint, "model.pt")
    if storage.exists(file) or storage.has_scheme(checkpoint) or Path(checkpoint).is_absolute():
        return file
    other = storage.join(experiment_dir, checkpoint, "model.pt")
    return other if storage.exists(other) else file


def export_search_trial(
    row: Mapping[str, Any],
    hyperparameters: Sequence[str],
    experiment_dir: str,
    out_dir: str,
    references: Mapping[str, Any] | None = None,
) -> str:
    """Export the trial of ``row`` (its ``best_checkpoint``) with its card; returns the export's location."""
    model_file = model_file_of(str(row["best_checkpoint"]), experiment_dir)
    return export_model(model_file, out_dir, trial_card(row, hyperparameters, references))


def export_trial(experiment_dir: str, out_dir: str, trial_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """Export a trial of a search exactly as the search exports its best; returns (out dir, card)."""
    experiment_dir, out_dir = storage.normalize_uri(experiment_dir), storage.normalize_uri(out_dir)
    trials = read_trials(experiment_dir)
    row = select_trial(trials, trial_id)
    references = search_references(experiment_dir)
    with export_errors():  # e.g. --out not writable
        out = export_search_trial(
            row, hyperparameter_columns(list(trials.columns)), experiment_dir, out_dir, references
        )
        return out, read_card(out)


def search_references(experiment_dir: str) -> dict[str, Any]:
    """The teacher / baseline figures of a search, from the card of its own export (``{}`` without one)."""
    best_card = storage.join(experiment_dir, "best", COMPLETE_MARKER)
    try:
        previous = json.loads(storage.read_text(best_card)) if storage.exists(best_card) else {}
    except (ValueError, OSError):  # an unreadable card of the search's own export just leaves these out
        return {}
    return {key: previous[key] for key in REFERENCE_KEYS if key in previous} if isinstance(previous, dict) else {}
