"""What a search prints, from the driver: one line per trial and epoch, a compact status table now and then,
and where Ray's own logs went.

Ray forwards every worker's and Train controller's output to the driver (the metric dicts Train logs on each
report, checkpoint notices, Tune's wide status tables); a search turns that off (``ray.init(log_to_driver=
False)``, Tune at verbosity 0) unless ``--verbose``, prints these lines itself, and copies Ray's worker and
Train logs of this machine under ``<experiment>/logs/ray/`` at its end (``keep_ray_logs``).

Tune's own table cannot be narrowed to a few columns here: Ray 2.60's default output engine ignores
``RunConfig(progress_reporter=...)`` (and so ``CLIReporter(metric_columns=...)``) and shows the first four
metrics of a result, which for our records are discriminator terms.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from ray.tune import Callback

from gankd_ray import ray_compat, storage

PREFIX = "[gankd-ray]"
TABLE_PERIOD_S = 60.0  # at most one status table a minute (and one at the end)
LOGS_DIR = "logs"
# Ray's files worth keeping: each worker process's output (trial drivers, Train controllers and workers) and
# Ray Train's own logs; not the raylet's or the GCS's.
KEPT_LOG_PREFIXES = ("worker-", "train/")


def critic_accuracy(result: dict[str, Any]) -> float | None:
    """The mean of the critics' accuracies over the distilled levels (None without accuracy-reporting critics)."""
    values = [v for k, v in result.items() if k.startswith("disc/acc/") and isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _figure(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return f"{value:.4f}"


def epoch_line(trial_id: str, result: dict[str, Any]) -> str:
    """``trial <id> epoch 2/8  val mAP 0.0123  AP50 0.0456  critic acc 0.9100  status running``."""
    return (
        f"{PREFIX} trial {trial_id} epoch {result.get('epoch', '?')}/{result.get('epochs', '?')}  "
        f"val mAP {_figure(result.get('map'))}  AP50 {_figure(result.get('ap50'))}  "
        f"critic acc {_figure(critic_accuracy(result))}  status {result.get('status', '?')}"
    )


def trial_status(trial) -> str:
    """Our record's status while the trial runs or once it ended on its own; Tune's otherwise (``stopped``:
    ended by ASHA or the GAN-health stopper before its last epoch)."""
    result = trial.last_result or {}
    tune_status = str(trial.status).lower()
    if tune_status == "terminated":
        record_status = result.get("status")
        return record_status if record_status not in (None, "running") else "stopped"
    return tune_status


def status_table(trials: list) -> str:
    """A fixed-width table: trial, status, epoch, val mAP (last epoch), best (best val mAP so far)."""
    header = ("trial", "status", "epoch", "val mAP", "best")
    rows = [header]
    for trial in trials:
        result = trial.last_result or {}
        epoch = f"{result['epoch']}/{result.get('epochs', '?')}" if "epoch" in result else "-"
        rows.append(
            (trial.trial_id, trial_status(trial), epoch, _figure(result.get("map")), _figure(result.get("best_map")))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


class TrialConsole(Callback):
    """Tune callback (runs in the driver): the per-epoch line of every trial, one line per failed trial, and the
    status table at most every ``table_period_s`` when something changed, and at the end."""

    def __init__(self, table_period_s: float = TABLE_PERIOD_S):
        self.table_period_s = table_period_s
        self.last_table = time.monotonic()
        self.changed = False

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        print(epoch_line(trial.trial_id, result), flush=True)
        self.changed = True

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        where = f" (traceback: {trial.error_file})" if getattr(trial, "error_file", None) else ""
        print(f"{PREFIX} trial {trial.trial_id} failed{where}", flush=True)
        self.changed = True

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.changed and time.monotonic() - self.last_table >= self.table_period_s:
            self._print_table(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self._print_table(trials)

    def _print_table(self, trials) -> None:
        done = sum(trial_status(t) not in ("running", "pending") for t in trials)
        print(f"\n{PREFIX} trials: {done} of {len(trials)} ended\n{status_table(trials)}\n", flush=True)
        self.last_table, self.changed = time.monotonic(), False


def keep_ray_logs(experiment_dir: str) -> str | None:
    """Copy this machine's Ray worker and Train logs of the current session to ``<experiment>/logs/ray/``
    (any storage); returns that location, or None when Ray has no local log folder. Never raises: the logs
    are a convenience, and a failure here must not hide the search's own outcome."""
    source = ray_compat.session_logs_dir()
    if not source or not os.path.isdir(source):
        return None
    target = storage.join(experiment_dir, LOGS_DIR, "ray")
    try:
        for folder, _, files in os.walk(source):
            for name in files:
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, source)
                if relative.startswith(KEPT_LOG_PREFIXES) and os.path.getsize(path) > 0:
                    with open(path, "rb") as handle:
                        storage.write_bytes(storage.join(target, *relative.split(os.sep)), handle.read())
    except OSError as err:
        print(f"{PREFIX} warning: could not copy Ray's logs to {target}: {storage.reason(err)}", flush=True)
        return None
    return target
