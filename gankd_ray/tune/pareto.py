"""The accuracy/latency front of a search, and how ``best/`` is picked from it.

A trial is on the front (``is_pareto``) when no other healthy trial is at least as good on every objective and
better on one. ``--pick`` says which trial ``best/`` is: ``map`` (the highest best val mAP, the default) or a
budget such as ``latency_ms<=5`` (the highest best val mAP among trials within it). Ray-free: tables in,
tables out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from gankd_ray.errors import InputError
from gankd_ray.records import Status

# objective name on the command line -> (trials.parquet column, direction)
OBJECTIVES = {"map": ("best_map", "max"), "latency": ("latency_ms", "min")}
UNHEALTHY = (Status.DIVERGED.value, Status.ERROR.value)
TIE_BREAKS = ("latency_ms", "student_params", "student_gflops")
# budget name on the command line -> trials.parquet column
BUDGET_COLUMNS = {"latency_ms": "latency_ms", "params": "student_params", "gflops": "student_gflops"}
_BUDGET = re.compile(rf"^({'|'.join(BUDGET_COLUMNS)})\s*<=\s*([0-9]*\.?[0-9]+)$")


def parse_objectives(text: str) -> list[str]:
    """``"map,latency"`` -> ``["map", "latency"]``; mAP must be one of them (it is what ASHA stops on)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown or "map" not in names or len(set(names)) != len(names):
        raise InputError(f"--objectives {text}: a comma list of {', '.join(OBJECTIVES)} that includes map, each once")
    return names


def pareto_mask(trials: pd.DataFrame, objectives: list[str]) -> pd.Series:
    """``is_pareto`` per row: healthy trials that no other healthy trial dominates on ``objectives``."""
    columns = [OBJECTIVES[name] for name in objectives]
    healthy = ~trials["status"].isin(UNHEALTHY)
    for column, _ in columns:
        healthy &= trials[column].notna()
    # Every objective as "larger is better".
    scores = pd.DataFrame({column: trials[column] * (1 if way == "max" else -1) for column, way in columns})
    mask = pd.Series(False, index=trials.index)
    candidates = scores[healthy]
    for index, row in candidates.iterrows():
        others = candidates.drop(index)
        dominated = ((others >= row).all(axis=1) & (others > row).any(axis=1)).any()
        mask[index] = not dominated
    return mask


@dataclass(frozen=True)
class PickRule:
    """``best/``'s trial: the highest best val mAP, among those within ``budget`` when one is given."""

    text: str = "map"
    column: str | None = None
    limit: float | None = None

    def choose(self, trials: pd.DataFrame) -> pd.Series | None:
        pool = trials[~trials["status"].isin(UNHEALTHY) & trials["best_map"].notna()]
        if self.column is not None:
            if self.column not in pool.columns:
                return None
            pool = pool[pool[self.column] <= self.limit]
        if pool.empty:
            return None
        # Ties on mAP (common early, when several trials score 0) go to the cheaper trial, so the pick is never
        # one that another trial dominates.
        keys = ["best_map"] + [column for column in TIE_BREAKS if column in pool.columns]
        ascending = [False] + [True] * (len(keys) - 1)
        return pool.sort_values(keys, ascending=ascending, kind="stable", na_position="last").iloc[0]


def parse_pick(text: str) -> PickRule:
    """``map`` or ``COLUMN<=LIMIT`` with COLUMN one of latency_ms, params, gflops."""
    if text.strip() == "map":
        return PickRule()
    match = _BUDGET.match(text.strip())
    if not match:
        raise InputError(f"--pick {text}: say map, or a budget such as latency_ms<=5 (also params<=N, gflops<=N)")
    return PickRule(text=text.strip(), column=BUDGET_COLUMNS[match.group(1)], limit=float(match.group(2)))
