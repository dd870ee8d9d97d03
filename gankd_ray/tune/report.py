"""The search report: PNGs plus ``report.md`` tying them together with the final table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

from gankd_ray.utils import plain_value

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import pandas as pd

from gankd_ray import storage
from gankd_ray.records import Status
from gankd_ray.tune.space import SearchSpace

REPORT_FILE = "report.md"  # written last: the report folder is complete when it is there


def write_report(
    out_dir: str,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    space: SearchSpace,
    summary_table: str,
    best_trial_id: str | None,
) -> str:
    """``out_dir`` (any storage location, replaced whole): the PNGs and ``report.md`` linking them."""
    with storage.staging_dir("gankd-report-") as staging:
        _write_report_files(Path(staging), trials, epochs, space, summary_table, best_trial_id)
        return storage.publish_dir(staging, out_dir, REPORT_FILE)


def _write_report_files(
    out: Path,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    space: SearchSpace,
    summary_table: str,
    best_trial_id: str | None,
) -> None:
    figures = {
        "optimisation_history.png": _history(trials),
        "learning_curves.png": _learning_curves(epochs, trials),
        "param_importances.png": _importances(trials, space),
        "discriminator_best.png": _disc_diagnostics(epochs, best_trial_id),
    }
    if "is_pareto" in trials:  # an accuracy/latency search
        figures["pareto_front.png"] = _pareto(trials)
    lines = ["# gankd-ray search report", "", summary_table, ""]
    for name, fig in figures.items():
        if fig is None:
            lines.append(f"_{name}: not enough data to draw._\n")
            continue
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        lines.append(f"![{name}]({name})\n")
    lines += ["## Trials", "", _markdown(trials.drop(columns=["error"], errors="ignore"))]
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n")


def _history(trials: pd.DataFrame):
    if trials.empty:
        return None
    ordered = trials.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(
        ordered.index, ordered["best_map"], c=["C3" if s != Status.COMPLETED else "C0" for s in ordered["status"]]
    )
    ax.plot(ordered.index, ordered["best_map"].fillna(0).cummax(), color="C2", label="best so far")
    ax.set(xlabel="trial", ylabel="best val mAP", title="Optimisation history (red: stopped/diverged/error)")
    ax.legend()
    return fig


def _pareto(trials: pd.DataFrame):
    """Best val mAP against measured latency; the front joined in latency order."""
    measured = trials[trials["latency_ms"].notna() & trials["best_map"].notna()]
    if measured.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(measured["latency_ms"], measured["best_map"], color="C7", label="trial")
    front = measured[measured["is_pareto"].astype(bool)].sort_values("latency_ms")
    ax.plot(front["latency_ms"], front["best_map"], marker="o", color="C3", label="accuracy/latency front")
    for _, row in front.iterrows():
        ax.annotate(str(row["trial_id"]), (row["latency_ms"], row["best_map"]), fontsize=6)
    threads = int(measured["latency_threads"].dropna().iloc[0]) if measured["latency_threads"].notna().any() else 0
    ax.set(xlabel=f"latency, batch 1 (ms, {threads} CPU threads)", ylabel="best val mAP", title="Accuracy vs latency")
    ax.legend()
    return fig


def _learning_curves(epochs: pd.DataFrame, trials: pd.DataFrame):
    if epochs.empty or "map" not in epochs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    status = dict(zip(trials["trial_id"], trials["status"]))
    for trial_id, rows in epochs.groupby("trial_id"):
        rows = rows.sort_values("epoch")
        (line,) = ax.plot(rows["epoch"], rows["map"], marker="o", ms=3, label=str(trial_id))
        if status.get(trial_id) == Status.STOPPED_EARLY:
            ax.scatter(rows["epoch"].iloc[-1], rows["map"].iloc[-1], marker="x", s=80, color=line.get_color())
    ax.set(xlabel="epoch", ylabel="val mAP", title="Learning curves (x: stopped by ASHA)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _importances(trials: pd.DataFrame, space: SearchSpace):
    importances = param_importances(trials, space)
    if not importances:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (Optuna fANOVA)", title="Hyperparameter importances")
    return fig


def param_importances(trials: pd.DataFrame, space: SearchSpace) -> dict[str, float]:
    """Optuna's own evaluator over the finished trials (needs >= 2 distinct searched values)."""
    import optuna

    searched = [p for p in space.params if p.type != "fixed" and not p.when and p.key in trials]
    rows = trials[trials["best_map"].notna()]
    if len(rows) < 3 or not searched:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" on the console
    study = optuna.create_study(direction="maximize")
    distributions = {p.key: _distribution(p) for p in searched}
    for _, row in rows.iterrows():
        params = {k: plain_value(row[k]) for k in distributions}
        if any(v is None for v in params.values()):
            continue
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=float(row["best_map"]))
        )
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}


def _distribution(param):
    import optuna.distributions as d

    if param.type == "categorical":
        return d.CategoricalDistribution(param.choices)
    if param.type == "int":
        return d.IntDistribution(int(param.low), int(param.high), log=param.log)
    return d.FloatDistribution(param.low, param.high, log=param.type == "loguniform")


def _disc_diagnostics(epochs: pd.DataFrame, trial_id: str | None):
    if trial_id is None or epochs.empty:
        return None
    rows = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
    columns = [c for c in rows.columns if c.startswith(("disc/real/", "disc/fake/")) and rows[c].notna().any()]
    if not columns:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column in columns:
        ax.plot(rows["epoch"], rows[column], marker="o", ms=3, ls="-" if "real" in column else "--", label=column)
    ax.set(xlabel="epoch", ylabel="mean critic score", title=f"Discriminator diagnostics, trial {trial_id}")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_no trials_"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)
