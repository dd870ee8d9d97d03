"""ASHA against FIFO: the same searcher (seeded TPE), seed, space, teacher and number of trials.

Runs ``launch/search.py`` twice (``--scheduler asha`` then ``--scheduler fifo``) and compares the epochs the
trials consumed, the search's wall time (first trial start to last report; teacher and baseline excluded)
and the best val mAP. Goal (issue 6): ASHA within 1 mAP point of FIFO's best with <= 35% of its epochs.

Usage:
    python bench/search_efficiency.py [--teacher CKPT] [--num-samples 12] [--max-epochs 9] [-- extra search args]
Without --teacher the ASHA search trains one (reused by the FIFO search). Writes
``bench/results/search_efficiency.json`` (``asha_epochs_over_fifo``, ``asha_best_minus_fifo_best`` in mAP
points, per-scheduler figures, the machine and the date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gankd_ray.utils import atomic_write_json, machine_description  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "search_efficiency.json"


def run(scheduler: str, args: argparse.Namespace, teacher: str | None) -> Path:
    name = f"efficiency-{scheduler}"
    command = [sys.executable, str(ROOT / "launch" / "search.py"), "--storage", str(args.storage), "--name", name,
               "--scheduler", scheduler, "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
               "--grace-period", str(args.grace_period), "--reduction-factor", str(args.reduction_factor),
               "--seed", str(args.seed), *(["--teacher", teacher] if teacher else []), *args.search_args]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher checkpoint; default: the ASHA search trains one")
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--num-samples", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=9, help="rungs at 1, 3, 9 with the default factor 3")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("search_args", nargs="*", help="extra launch/search.py arguments (after --)")
    args = parser.parse_args(argv)

    asha_dir = run("asha", args, args.teacher)
    teacher = args.teacher or str(args.storage / "efficiency-asha-teacher" / "best" / "model.pt")
    fifo_dir = run("fifo", args, teacher)
    asha, fifo = figures(asha_dir), figures(fifo_dir)
    result = {
        "benchmark": "search_efficiency", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()},
        "asha": asha, "fifo": fifo,
        "asha_epochs_over_fifo": asha["epochs_consumed"] / fifo["epochs_consumed"],
        "asha_wall_over_fifo": asha["wall_s"] / fifo["wall_s"],
        "asha_best_minus_fifo_best": 100.0 * (asha["best_map"] - fifo["best_map"]),  # mAP points
    }
    result["goal_met"] = result["asha_epochs_over_fifo"] <= 0.35 and result["asha_best_minus_fifo_best"] >= -1.0
    atomic_write_json(args.out, result)
    for key in ("asha_epochs_over_fifo", "asha_wall_over_fifo", "asha_best_minus_fifo_best"):
        print(f"{key:>26}: {result[key]:.3f}")
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
