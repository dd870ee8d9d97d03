"""The same GAN-KD step timed inside a 1-worker Ray TorchTrainer and in a plain process, in one run.

Reports ``ray_over_plain`` = median step time inside Ray Train / median step time in a plain process
(goal <= 1.05), and ``fit_to_first_step_s``: wall time from ``TorchTrainer.fit()`` to the end of the first
optimizer step (what every trial of a search pays before it trains). Writes
``bench/results/train_overhead.json`` with the machine and date.

Usage: ``python bench/train_overhead.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from step_cost import QUICK, random_batch

from gankd_ray.config import DetectorConfig, OptimConfig, RunConfig
from gankd_ray.utils import machine_description, write_benchmark_json

RESULTS = Path(__file__).resolve().parent / "results" / "train_overhead.json"
GOAL = 1.05


def bench_config(quick: bool) -> dict:
    teacher, student, size, batch, _, _ = QUICK
    cfg = RunConfig(
        role="gankd",
        detector=DetectorConfig(backbone=student, num_classes=5, image_size=size),
        teacher=DetectorConfig(backbone=teacher, num_classes=5, image_size=size),
        optim=OptimConfig(batch_size=batch),
    )
    return {"run": cfg.to_dict(), "warmup": 2, "steps": 10 if quick else 30}


def time_steps(config: dict) -> dict:
    """Build the step, run warm-up then timed steps; returns per-step times and the first step's end."""
    from gankd_ray.distill import build_step
    from gankd_ray.models import build_detector

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(config["run"])
    step = build_step(cfg, teacher=build_detector(cfg.teacher), device="cpu")
    images, targets = random_batch(cfg.optim.batch_size, cfg.detector.image_size, torch.device("cpu"))
    times, first_step_end = [], None
    for index in range(config["warmup"] + config["steps"]):
        started = time.perf_counter()
        step.train_step(images, targets, progress=1.0)
        if first_step_end is None:
            first_step_end = time.time()
        if index >= config["warmup"]:
            times.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times), "first_step_end": first_step_end}


def ray_worker(config: dict) -> None:
    # Ray Train keeps no metrics of reports without a checkpoint; a local file is simplest (one node).
    Path(config["result_file"]).write_text(json.dumps(time_steps(config)))


def in_ray(config: dict) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from gankd_ray.cluster import init_ray

    init_ray(num_cpus=2)
    storage = Path(tempfile.mkdtemp(prefix="gankd_bench_overhead_"))
    result_file = storage / "worker_result.json"
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={**config, "result_file": str(result_file)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"overhead-{int(time.time())}", storage_path=str(storage)),
    )
    fit_started = time.time()
    trainer.fit()
    metrics = json.loads(result_file.read_text())
    metrics["fit_to_first_step_s"] = metrics["first_step_end"] - fit_started
    metrics["fit_total_s"] = time.time() - fit_started
    ray.shutdown()
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = bench_config(args.quick)
    plain = time_steps(config)
    ray_result = in_ray(config)
    ratio = ray_result["step_s"] / plain["step_s"]
    result = {
        "benchmark": "train_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "config": config,
        "plain_step_s": plain["step_s"],
        "ray_step_s": ray_result["step_s"],
        "ray_over_plain": ratio,
        "goal": GOAL,
        "fit_to_first_step_s": ray_result["fit_to_first_step_s"],
        "fit_total_s": ray_result["fit_total_s"],
    }
    write_benchmark_json(args.out, result)
    print(
        f"plain {plain['step_s']:.3f} s/step, in Ray Train {ray_result['step_s']:.3f} s/step: "
        f"ray_over_plain {ratio:.3f} (goal <= {GOAL}); fit() -> first step {ray_result['fit_to_first_step_s']:.1f} s"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
