"""Where a trial's start-up goes: Ray's stock TorchTrainer against gankd-ray's, inside Tune, in one run.

Each trial is what a search trial is up to its first line of training: a Tune trial driver (no CPU) that
builds a 1-worker TorchTrainer, whose training function only records when it started. ``startup_s`` is the
time from the driver's trainable starting (before its imports) to that function starting (trainer imports, Train
controller, placement group, worker process, process group). Variants, alternating so both see the same machine:

- ``stock``: ``ray.train.torch.TorchTrainer`` with Ray Train's metrics callbacks on;
- ``gankd``: ``GankdTorchTrainer`` (no DatasetManager actor, no torch in the trial driver or the Train controller),
  metrics callbacks off (gankd_ray.ray_compat).
Both share gankd-ray's other Train environment defaults (faster health checks, no preemption watcher).

By default a busy loop holds one core, as the other trial's training does in a 2-trial search on 2 cores
(``--idle`` to measure an idle machine). Writes ``bench/results/trial_startup.json`` (``gankd_over_stock``:
ratio of mean start-up times, both measured in this run) with the machine and the date.

Usage: ``python bench/trial_startup.py [--trials 4] [--idle]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "trial_startup.json"


def record_start(config: dict) -> None:
    import ray.train

    Path(config["marker"]).write_text(str(time.time()))
    ray.train.report({"epoch": 1})


def trial(params: dict) -> None:
    started = time.time()  # before the driver's imports: what it imports is part of its start-up
    import ray.train
    import ray.tune

    from gankd_ray.cluster import apply_train_env_defaults
    from gankd_ray.ray_compat import TRAIN_METRICS_ENV, GankdTorchTrainer

    if params["variant"] == "stock":
        from ray.train.torch import TorchTrainer  # imports torch, as a stock trial's driver does

        os.environ[TRAIN_METRICS_ENV] = "1"
        trainer_class = TorchTrainer
    else:
        apply_train_env_defaults()
        trainer_class = functools.partial(GankdTorchTrainer, backend="gloo")
    marker = Path(params["workdir"]) / f"{ray.tune.get_context().get_trial_id()}.started"
    trainer_class(
        record_start,
        train_loop_config={"marker": str(marker)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=marker.stem, storage_path=params["workdir"]),
    ).fit()
    ray.tune.report({"startup_s": float(marker.read_text()) - started})


def busy_core(seconds: float) -> None:
    until = time.time() + seconds
    while time.time() < until:
        sum(i * i for i in range(10_000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="trials per variant")
    parser.add_argument("--idle", action="store_true", help="no busy core")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import ray
    import ray.tune

    from gankd_ray.cluster import init_ray
    from gankd_ray.tune.search import DRIVER_RESOURCES

    busy = None if args.idle else multiprocessing.Process(target=busy_core, args=(3600,), daemon=True)
    if busy:
        busy.start()  # before Ray: a process forked after ray.init inherits Ray's signal handlers
    init_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as workdir:
        variants = ["stock", "gankd"] * args.trials  # alternating: both see the same drift of the machine
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(trial, DRIVER_RESOURCES),
            param_space={"variant": ray.tune.grid_search(variants), "workdir": workdir},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=1),
            run_config=ray.tune.RunConfig(name="trial_startup", storage_path=workdir, verbose=0),
        )
        results = [(r.config["variant"], r.metrics["startup_s"]) for r in tuner.fit()]
    if busy:
        busy.terminate()
    ray.shutdown()
    figures = {}
    for variant in ("stock", "gankd"):
        times = [t for v, t in results if v == variant]
        figures[variant] = {
            "startup_s_mean": statistics.mean(times),
            "startup_s_std": statistics.pstdev(times),
            "trials": len(times),
            "per_trial_s": times,  # in the order they ran
        }
        print(f"{variant:>6}: start-up {statistics.mean(times):.2f} +- {statistics.pstdev(times):.2f} s")
    result = {
        "benchmark": "trial_startup",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "busy_core": not args.idle,
        **figures,
        "gankd_over_stock": figures["gankd"]["startup_s_mean"] / figures["stock"]["startup_s_mean"],
    }
    write_benchmark_json(args.out, result)
    print(f"gankd_over_stock: {result['gankd_over_stock']:.2f}\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
