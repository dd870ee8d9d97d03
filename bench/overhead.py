"""Where a search's time goes besides training, measured on a real search (the default one unless told).

Figures (one run, ratios only; goals from issue 6):
- ``trial_overhead_share``: per trial, (trial start -> end of its first optimizer step) / trial wall time,
  averaged over trials (goal <= 0.10). Split into ``ray_startup_s`` (trial start -> the worker's training
  function starts: Tune actor, TorchTrainer, controller, placement group, worker process, process group)
  and ``worker_setup_s`` (training function start -> first step: teacher load, model, data).
- ``loader_over_consumption``: images/s the data loader delivers alone (decode + augment, the search's
  settings) over images/s the trainer consumes (goal >= 3).
- ``eval_share``: COCO evaluation time over epoch time (train + eval), summed over all epochs (goal <= 0.10).

Usage:
    python bench/overhead.py                              # runs the default search (launch/search.py), then measures
    python bench/overhead.py --experiment runs/default    # measures an existing experiment
    python bench/overhead.py -- --num-samples 4 ...       # extra launch/search.py arguments
Writes ``bench/results/overhead.json`` with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from gankd_ray.config import RunConfig
from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "overhead.json"
GOALS = {"trial_overhead_share": ("<=", 0.10), "loader_over_consumption": (">=", 3.0), "eval_share": ("<=", 0.10)}


def run_search(storage: Path, name: str, extra: list[str]) -> Path:
    command = [sys.executable, str(ROOT / "launch" / "search.py"), "--storage", str(storage), "--name", name, *extra]
    print("[bench] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return storage / name


def startup_figures(epochs: pd.DataFrame, trials: pd.DataFrame) -> dict:
    """Per-trial start-up from the first epoch record of each trial (the one carrying the worker clock)."""
    first = epochs.dropna(subset=["first_step_at", "worker_started_at"]).sort_values("epoch")
    first = first.groupby("trial_id").first()
    wall = trials.set_index("trial_id")["wall_s"]
    startup = first["first_step_at"] - first["trial_started"]
    share = (startup / wall.reindex(startup.index)).dropna()
    return {
        "trials_measured": int(len(share)),
        "trial_overhead_share": float(share.mean()),
        "startup_s_mean": float(startup.mean()),
        "ray_startup_s_mean": float((first["worker_started_at"] - first["trial_started"]).mean()),
        "worker_setup_s_mean": float((first["first_step_at"] - first["worker_started_at"]).mean()),
        "trial_wall_s_mean": float(wall.mean()),
    }


def loader_images_per_s(config: RunConfig, epochs: int = 2) -> float:
    """The train loader alone with the search's settings (one rank, its own worker processes)."""
    from gankd_ray.data.loader import DetectionBatchLoader

    loader = DetectionBatchLoader.from_dataset(
        config.data.path,
        config.data.train_split,
        config.detector.image_size,
        config.optim.batch_size,
        train=True,
        seed=config.seed,
        hflip=config.data.hflip,
        jitter=config.data.jitter,
        num_workers=config.data.loader_workers,
    )
    images, started = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        images += sum(len(batch[2]) for batch in loader)
    return images / (time.perf_counter() - started)


def measure(experiment: Path) -> dict:
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    config = RunConfig.from_yaml(next((experiment / "trials").glob("*/resolved_config.yaml")))
    consumed = float(epochs["images_per_s"].median())
    loader = loader_images_per_s(config)
    figures = startup_figures(epochs, trials)
    figures.update(
        loader_images_per_s=loader,
        trainer_images_per_s=consumed,
        loader_over_consumption=loader / consumed,
        eval_share=float(epochs["eval_s"].sum() / (epochs["train_s"].sum() + epochs["eval_s"].sum())),
        epoch_s_median=float((epochs["train_s"] + epochs["eval_s"]).median()),
    )
    figures["goals_met"] = {key: _meets(figures[key], *goal) for key, goal in GOALS.items()}
    return figures


def _meets(value: float, op: str, goal: float) -> bool:
    return value <= goal if op == "<=" else value >= goal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, help="measure this experiment instead of running a search")
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--name", default="overhead")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("search_args", nargs="*", help="extra launch/search.py arguments (after --)")
    args = parser.parse_args(argv)
    experiment = args.experiment or run_search(args.storage, args.name, args.search_args)
    figures = measure(experiment)
    result = {
        "benchmark": "overhead",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "experiment": str(experiment),
        "search_args": args.search_args,
        **figures,
    }
    write_benchmark_json(args.out, result)
    for key in (
        "trial_overhead_share",
        "ray_startup_s_mean",
        "worker_setup_s_mean",
        "trial_wall_s_mean",
        "loader_over_consumption",
        "eval_share",
    ):
        print(f"{key:>24}: {figures[key]:.3f}")
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
