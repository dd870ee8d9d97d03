"""ASHA against FIFO: the same searcher (seeded TPE), seed, space, teacher and number of trials.

Runs ``launch/search.py`` twice (``--scheduler asha`` then ``--scheduler fifo``) and compares the epochs the
trials consumed, the search's wall time (first trial start to last report; teacher and baseline excluded)
and the best val mAP. Goal (issue 6): ASHA within 1 mAP point of FIFO's best with <= 35% of its epochs.

The live comparison mixes two effects: ASHA's cuts, and TPE proposing other configurations because it is fed
truncated results. ``replay`` separates the first: Tune's own ASHA scheduler replayed on the FIFO trials' recorded
learning curves (same start order, concurrency and per-epoch durations), for a grid of grace periods and
reduction factors; each cell gives the share of FIFO's epochs it would use and its best mAP minus FIFO's best.

Usage:
    python bench/search_efficiency.py [--teacher CKPT] [--num-samples 12] [--max-epochs 9] [-- extra search args]
    python bench/search_efficiency.py --replay-only     # only the replay, on the existing FIFO experiment
    python bench/search_efficiency.py --reuse-fifo ...  # other rungs against the finished FIFO run of that budget
Without --teacher the ASHA search trains one (reused by the FIFO search). Writes
``bench/results/search_efficiency.json`` (``asha_epochs_over_fifo``, ``asha_best_minus_fifo_best`` in mAP
points, per-scheduler figures, ``replay``, the machine and the date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gankd_ray.tune.request import default_grace_period
from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "search_efficiency.json"


def experiment_name(scheduler: str, args: argparse.Namespace) -> str:
    """FIFO depends only on the budget; ASHA also on its rungs. A rerun replaces its own earlier experiment."""
    name = f"efficiency-{scheduler}-{args.max_epochs}ep"
    return name if scheduler == "fifo" else f"{name}-g{args.grace_period}-rf{args.reduction_factor}"


def run(scheduler: str, args: argparse.Namespace, teacher: str | None) -> Path:
    name = experiment_name(scheduler, args)
    if (args.storage / name).exists():
        print(f"[bench] replacing {args.storage / name}", flush=True)
        shutil.rmtree(args.storage / name)
    command = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--storage",
        str(args.storage),
        "--name",
        name,
        "--scheduler",
        scheduler,
        "--num-samples",
        str(args.num_samples),
        "--max-epochs",
        str(args.max_epochs),
        "--grace-period",
        str(args.grace_period),
        "--reduction-factor",
        str(args.reduction_factor),
        "--seed",
        str(args.seed),
        *(["--teacher", teacher] if teacher else []),
        *args.search_args,
    ]
    print("[bench] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return args.storage / name


def figures(experiment: Path) -> dict:
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    return {
        "trials": int(len(trials)),
        "epochs_consumed": int(trials["epochs"].sum()),
        "wall_s": float(epochs["reported_at"].max() - epochs["trial_started"].min()),
        "best_map": float(trials["best_map"].max()),
        "best_ap50": float(trials.loc[trials["best_map"].idxmax(), "best_ap50"]),
        "stopped_early": int((trials["status"] == "stopped_early").sum()),
    }


@dataclass
class Schedule:
    """What ASHA let each trial (in start order) run: epochs, start and end times (s), and the seconds the
    scheduler's own calls took (measured)."""

    epochs: list[int]
    started: list[float]
    ended: list[float]
    wall_s: float
    decision_s: float


def asha_schedule(
    curves: Sequence[Sequence[float]],
    durations: Sequence[Sequence[float]],
    grace_period: int,
    reduction_factor: int,
    concurrency: int,
    max_t: int | None = None,
) -> Schedule:
    """Tune's own ASHAScheduler driven on given learning curves, without a Ray runtime.

    Trial ``i`` starts, in list order, whenever one of ``concurrency`` slots frees; its epoch ``e`` (1-based)
    reports ``curves[i][e - 1]`` after ``durations[i][e - 1]`` seconds, so rung results arrive in a realistic
    asynchronous order. A curve shorter than ``max_t`` (a diverged trial) ends there.
    """
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    max_t = max_t or max(len(curve) for curve in curves)
    scheduler = ASHAScheduler(
        time_attr="epoch",
        metric="map",
        mode="max",
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    count = len(curves)
    schedule = Schedule([0] * count, [0.0] * count, [0.0] * count, 0.0, 0.0)
    running: list = []

    def start(index: int, now: float) -> None:
        trial = SimpleNamespace(trial_id=str(index))
        scheduler.on_trial_add(None, trial)
        schedule.started[index] = now
        heapq.heappush(running, (now + durations[index][0], index, 1, trial))

    waiting = iter(range(count))
    for index in list(itertools.islice(waiting, concurrency)):
        start(index, 0.0)
    while running:
        now, index, epoch, trial = heapq.heappop(running)
        result = {"epoch": epoch, "map": float(curves[index][epoch - 1])}
        tick = time.perf_counter()
        more = epoch < min(max_t, len(curves[index]))
        if more and scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE:
            schedule.decision_s += time.perf_counter() - tick
            heapq.heappush(running, (now + durations[index][epoch], index, epoch + 1, trial))
            continue
        scheduler.on_trial_complete(None, trial, result)
        schedule.decision_s += time.perf_counter() - tick
        schedule.epochs[index], schedule.ended[index], schedule.wall_s = epoch, now, now
        following = next(waiting, None)
        if following is not None:
            start(following, now)
    return schedule


def replay_asha(epochs: pd.DataFrame, grace_period: int, reduction_factor: int, concurrency: int) -> dict:
    """Tune's ASHA replayed on complete (FIFO) learning curves: which epochs it would have let each trial run.

    Trials start in their recorded order; each epoch takes as long as it took in the recorded run (the first one
    includes the trial's start-up).
    """
    max_t = int(epochs["epoch"].max())
    curves = {tid: group.sort_values("epoch") for tid, group in epochs.groupby("trial_id")}
    order = sorted(curves, key=lambda tid: curves[tid]["trial_started"].iloc[0])
    durations = [
        curves[tid]["reported_at"].diff().fillna(curves[tid]["reported_at"] - curves[tid]["trial_started"]).tolist()
        for tid in order
    ]
    maps = [curves[tid]["map"].tolist() for tid in order]
    schedule = asha_schedule(maps, durations, grace_period, reduction_factor, concurrency, max_t)
    fifo_best = float(epochs["map"].max())
    best = max(max(curve[:ran]) for curve, ran in zip(maps, schedule.epochs))
    return {
        "grace_period": grace_period,
        "reduction_factor": reduction_factor,
        "epochs_over_fifo": sum(schedule.epochs) / sum(len(curve) for curve in maps),
        "best_minus_fifo_best": 100.0 * (best - fifo_best),
        "wall_s": schedule.wall_s,
    }


def replay_grid(fifo_dir: Path, concurrency: int) -> list[dict]:
    epochs = pd.read_parquet(fifo_dir / "epochs.parquet")
    max_t = int(epochs["epoch"].max())
    return [
        replay_asha(epochs, grace, factor, concurrency) for factor in (2, 3, 4) for grace in range(1, max_t // 2 + 1)
    ]


def print_replay(cells: list[dict]) -> None:
    print("[bench] ASHA replayed on FIFO's curves: grace, factor -> share of FIFO's epochs, best - FIFO best (points)")
    for cell in cells:
        print(
            f"  grace {cell['grace_period']} factor {cell['reduction_factor']}: "
            f"{cell['epochs_over_fifo']:.2f} of the epochs, {cell['best_minus_fifo_best']:+.2f} points"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher checkpoint; default: the ASHA search trains one")
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--num-samples", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--grace-period", type=int, help="default: launch/search.py's (a quarter of --max-epochs)")
    parser.add_argument("--reduction-factor", type=int, default=2, help="default: launch/search.py's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once in the replay (as in the runs)")
    parser.add_argument(
        "--reuse-fifo",
        action="store_true",
        help="compare with this budget's finished FIFO experiment instead of running it again "
        "(FIFO does not depend on the rungs; same teacher, seed and trials assumed)",
    )
    parser.add_argument(
        "--replay-only",
        action="store_true",
        help="replay ASHA on the existing FIFO experiment and update only the replay in --out",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("search_args", nargs="*", help="extra launch/search.py arguments (after --)")
    args = parser.parse_args(argv)
    if args.grace_period is None:
        args.grace_period = default_grace_period(args.max_epochs)

    if args.replay_only:
        entry = load_runs(args.out)[run_key(vars(args))]
        entry["replay"] = replay_grid(args.storage / experiment_name("fifo", args), args.concurrency)
        write_result(args.out, entry)
        print_replay(entry["replay"])
        return 0
    asha_dir = run("asha", args, args.teacher)
    teacher = args.teacher or str(asha_dir.parent / f"{asha_dir.name}-teacher" / "best" / "model.pt")
    fifo_dir = args.storage / experiment_name("fifo", args)
    if args.reuse_fifo and (fifo_dir / "trials.parquet").exists():
        print(f"[bench] reusing {fifo_dir}", flush=True)
    else:
        fifo_dir = run("fifo", args, teacher)
    asha, fifo = figures(asha_dir), figures(fifo_dir)
    entry = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "asha": asha,
        "fifo": fifo,
        "asha_epochs_over_fifo": asha["epochs_consumed"] / fifo["epochs_consumed"],
        "asha_wall_over_fifo": asha["wall_s"] / fifo["wall_s"],
        "asha_best_minus_fifo_best": 100.0 * (asha["best_map"] - fifo["best_map"]),  # mAP points
        "replay": replay_grid(fifo_dir, args.concurrency),
    }
    entry["goal_met"] = entry["asha_epochs_over_fifo"] <= 0.35 and entry["asha_best_minus_fifo_best"] >= -1.0
    write_result(args.out, entry)
    for key in ("asha_epochs_over_fifo", "asha_wall_over_fifo", "asha_best_minus_fifo_best"):
        print(f"{key:>26}: {entry[key]:.3f}")
    print_replay(entry["replay"])
    print(f"[bench] wrote {args.out}")
    return 0


def run_key(settings: dict) -> str:
    return f"{settings['max_epochs']}ep-g{settings['grace_period']}-rf{settings['reduction_factor']}"


def load_runs(path: Path) -> dict[str, dict]:
    """Earlier runs kept in the results file, by budget and rungs (a file from before ``runs`` is one run)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if "runs" in saved:
        return saved["runs"]
    entry = {k: v for k, v in saved.items() if k not in ("benchmark", "machine")}
    return {run_key(entry["settings"]): entry}


def write_result(path: Path, entry: dict) -> None:
    """This run's figures at the top (the issue's keys), every run so far under ``runs``."""
    runs = {**load_runs(path), run_key(entry["settings"]): entry}
    write_benchmark_json(
        path, {"benchmark": "search_efficiency", "machine": machine_description(), **entry, "runs": runs}
    )


if __name__ == "__main__":
    sys.exit(main())
