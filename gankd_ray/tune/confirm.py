"""The KD verdict (``--confirm-seeds N``): after the search, the best configuration and the no-KD baseline are
retrained with N fresh seeds each, and their best val AP50s compared.

Why: with from-scratch students another seed moves AP50 by more than the KD gain on some datasets, and the
best trial is the maximum over many trials (its score is biased upward). Fresh seeds (``seed + 1 ..
seed + N``, the search's own seed is not reused) remove both; the configuration was still chosen on val.

The rule (README "Is the KD gain real?"): ``diff`` = mean(GAN-KD) - mean(no KD), ``se`` = sqrt(s_kd^2 / N +
s_base^2 / N) with the seeds' sample standard deviations. GAN-KD helps when ``diff > t * se`` and hurts when
``diff < -t * se``, with ``t`` Student's two-sided 95 % quantile at 2N - 2 degrees of freedom (4.30 at N = 2,
2.78 at N = 3); a difference under ``MIN_EFFECT`` (0.1 AP50 point) is no measurable effect whatever the spread.

Runs live in ``<experiment>/confirm/{gankd,baseline}-seed<S>/``; a finished one is reused by a rerun.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gankd_ray import storage
from gankd_ray.config import RunConfig
from gankd_ray.records import RunSummary, Status, summarize
from gankd_ray.train.run import TrainJob, run_training
from gankd_ray.tune.search import SearchJob

CONFIRM_DIR = "confirm"
CONFIRM_TABLE = "confirm.parquet"
MIN_EFFECT = 0.001  # AP50 (0.1 point)
ARMS = ("gankd", "baseline")
# Student's t, two-sided 95 % (0.975 quantile), by degrees of freedom; beyond the table the normal's 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T_975_LARGE = {20: 2.086, 30: 2.042, 60: 2.0}


def t_quantile(dof: int) -> float:
    if dof in T_975:
        return T_975[dof]
    return next((t for limit, t in T_975_LARGE.items() if dof <= limit), 1.96)


@dataclass
class Verdict:
    """The comparison of the two arms' best val AP50s over ``seeds`` seeds each (``verdict``: helps,
    no_effect or hurts)."""

    seeds: int
    kd_mean: float
    kd_std: float
    baseline_mean: float
    baseline_std: float
    diff: float
    diff_se: float
    threshold: float  # |diff| beyond this (t * se, at least MIN_EFFECT) is an effect
    verdict: str

    def line(self) -> str:
        points = f"{100 * self.diff:+.1f} +- {100 * self.diff_se:.1f} AP50"
        if self.verdict == "helps":
            return f"GAN-KD helps: {points} over no KD ({self.seeds} seeds)"
        if self.verdict == "hurts":
            return f"GAN-KD hurts: {points} against no KD ({self.seeds} seeds)"
        return f"GAN-KD: no measurable effect ({points} over no KD, {self.seeds} seeds)"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "line": self.line()}


def verdict_of(kd: list[float], baseline: list[float]) -> Verdict:
    """The verdict on two arms' figures (one per seed, the same number each, at least 2)."""
    seeds = len(kd)
    kd_std, baseline_std = statistics.stdev(kd), statistics.stdev(baseline)
    diff = statistics.fmean(kd) - statistics.fmean(baseline)
    diff_se = math.sqrt((kd_std**2 + baseline_std**2) / seeds)
    threshold = max(t_quantile(2 * seeds - 2) * diff_se, MIN_EFFECT)
    verdict = "helps" if diff > threshold else "hurts" if diff < -threshold else "no_effect"
    return Verdict(
        seeds, statistics.fmean(kd), kd_std, statistics.fmean(baseline), baseline_std, diff, diff_se, threshold, verdict
    )


def seeds_of(job: SearchJob, count: int) -> list[int]:
    return [job.request.seed + 1 + i for i in range(count)]


def _param(value: Any) -> Any:
    """A trials.parquet cell as the space's value (numpy arrays and scalars to lists and numbers)."""
    value = value.tolist() if hasattr(value, "tolist") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def confirm_jobs(
    job: SearchJob, baseline_config: RunConfig, best: Any, seeds: list[int]
) -> list[tuple[str, int, TrainJob]]:
    """(arm, seed, job) for every seed: the best trial's configuration with the teacher, and the baseline."""
    params = {key: _param(best.get(key)) for key in job.space.keys}
    params = {key: value for key, value in params.items() if value is not None}
    runs = []
    for seed in seeds:
        for arm in ARMS:
            config = job.trial_config(params) if arm == "gankd" else RunConfig.from_dict(baseline_config.to_dict())
            config.seed = seed
            train_job = TrainJob(
                config=config,
                storage=storage.join(job.experiment_dir, CONFIRM_DIR),
                name=f"{arm}-seed{seed}",
                teacher=job.teacher if arm == "gankd" else None,
                resources=job.request.resources,
                max_failures=job.max_failures,
            )
            runs.append((arm, seed, train_job))
    return runs


def _train(train_job: TrainJob) -> RunSummary:
    summary = summarize(train_job.run_dir)
    if summary.status in (Status.COMPLETED, Status.DIVERGED):
        return summary
    return run_training(train_job)


def confirm(job: SearchJob, baseline_config: RunConfig, best: Any, count: int) -> tuple[pd.DataFrame, Verdict]:
    """Train the confirmation runs one after the other; ``confirm.parquet`` (one row per run) and the verdict.
    A diverged or failed run counts as AP50 0 (what the search scores it)."""
    rows = []
    for arm, seed, train_job in confirm_jobs(job, baseline_config, best, seeds_of(job, count)):
        print(f"[gankd-ray] confirming: {arm} with seed {seed} ({len(rows) + 1} of {2 * count})", flush=True)
        summary = _train(train_job)
        ap50 = summary.best_ap50 if summary.status is Status.COMPLETED and summary.best_ap50 is not None else 0.0
        rows.append(
            {
                "arm": arm,
                "seed": seed,
                "status": summary.status.value,
                "best_map": summary.best_map,
                "best_ap50": summary.best_ap50,
                "scored_ap50": ap50,
                "run_dir": summary.run_dir,
            }
        )
    table = pd.DataFrame(rows)
    verdict = verdict_of(*(list(table[table["arm"] == arm]["scored_ap50"]) for arm in ARMS))
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(job.experiment_dir, CONFIRM_TABLE), buffer.getvalue())
    return table, verdict


def confirm_table(table: pd.DataFrame, verdict: Verdict) -> str:
    """The markdown section of the report and the console: each arm's mean +- std, then the verdict line."""
    lines = ["| arm | seeds | val AP50 mean +- std |", "|---|---|---|"]
    arms = {
        "gankd": ("GAN-KD (best configuration)", verdict.kd_mean, verdict.kd_std),
        "baseline": ("no KD (baseline)", verdict.baseline_mean, verdict.baseline_std),
    }
    for arm, (label, mean, std) in arms.items():
        seeds = ", ".join(str(seed) for seed in table[table["arm"] == arm]["seed"])
        lines.append(f"| {label} | {seeds} | {mean:.4f} +- {std:.4f} |")
    return "\n".join([*lines, "", verdict.line()])
