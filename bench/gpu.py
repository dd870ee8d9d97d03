"""GPU readiness in one short run: step throughput with bf16 on and off, a DDP Ray Train run, a 2-trial search.

Parts:

1. ``throughput``: images/s of each part at each size, bf16 on and off, all timed round-robin in one process
   after untimed warm-up rounds (so machine drift hits every measure alike), with ``torch.cuda.synchronize``
   around each timing on a GPU:
   - ``teacher_forward``: the GAN-KD step's frozen teacher (eval, no_grad; the feature levels it distills);
   - ``student_step``: ``TrainStep.train_step`` of role ``student`` (no KD: what the baseline trains);
   - ``gankd_step``: ``TrainStep.train_step`` of role ``gankd`` with the default distill settings.
   bf16 is ``optim.bf16=true``, which the step applies to its own autocast regions on CUDA only. On a CPU it is
   recorded as skipped (``bf16_skipped``): forcing those regions to CPU bf16 gave non-finite, non-reproducible
   critic gradients in the GAN-KD step (torch 2.14.1 on a 2-core AMX CPU), so CPU bf16 figures would mean nothing.
   A part whose step diverges (non-finite loss on the repeated random batch) is reported with ``diverged``
   instead of images/s; the other parts still run.
2. ``ddp``: a short GAN-KD Ray Train run (``TrainJob``: one worker per GPU over nccl; on CPU two gloo workers) on
   generated synthetic data; images/s (all ranks) of its last epoch, from its ``metrics.jsonl``.
3. ``search``: ``launch/search.py`` with 2 trials of a few epochs (its no-KD baseline included) on the same data
   and an untrained teacher: wall time and the best val mAP.

Usage:
    python bench/gpu.py                                   # on a GPU machine -> bench/results/gpu.json
    python bench/gpu.py --device cpu --quick              # CPU smoke run -> bench/results/gpu_cpu_smoke.json
    python bench/gpu.py [--sizes 320,512] [--skip-search] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from step_cost import NUM_CLASSES, measure, random_batch

from gankd_ray.cli import run
from gankd_ray.config import DetectorConfig, OptimConfig, RunConfig
from gankd_ray.distill import Diverged, TrainStep, build_step
from gankd_ray.errors import InputError
from gankd_ray.models import build_detector
from gankd_ray.train.spec import Resources
from gankd_ray.tune.pipeline import TEACHER_BACKBONE
from gankd_ray.utils import first_line, machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GPU_RESULTS = RESULTS / "gpu.json"
CPU_RESULTS = RESULTS / "gpu_cpu_smoke.json"  # never to be read as GPU figures
PARTS = ("teacher_forward", "student_step", "gankd_step")
AMPS = ("none", "bf16")
SEARCH_TRIALS = 2
CPU_DDP_WORKERS = 2


@dataclass(frozen=True)
class Preset:
    """Models and sizes of one run; the full one is the default search's pair (``launch/search.py``)."""

    teacher: str
    student: str
    sizes: tuple[int, ...]
    batch: int
    warmup: int  # untimed rounds: CUDA context, kernel selection, allocator growth
    repeats: int
    run_size: int  # image size of the DDP run and the search
    train_images: int
    val_images: int
    ddp_epochs: int  # the last epoch's images/s is reported: the first pays the warm-up
    search_epochs: int
    loader_workers: int


FULL = Preset(
    teacher=TEACHER_BACKBONE,
    student=DetectorConfig().backbone,
    sizes=(320, 512),
    batch=32,
    warmup=5,
    repeats=20,
    run_size=320,
    train_images=512,
    val_images=128,
    ddp_epochs=3,
    search_epochs=3,
    loader_workers=4,
)
# The tests' tiny pair; loader_workers=0 decodes in the worker itself (no loader processes on 2 cores).
QUICK = Preset(
    teacher="mobilenet_v2_0.5",
    student="mobilenet_v2_0.35",
    sizes=(160,),
    batch=2,
    warmup=1,
    repeats=3,
    run_size=160,
    train_images=16,
    val_images=8,
    ddp_epochs=1,
    search_epochs=1,
    loader_workers=0,
)


def image_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 320,512") from None
    if not all(160 <= size <= 512 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be in 160..512 (detector.image_size)")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=image_sizes, help="throughput image sizes (default 320,512; --quick 160)")
    parser.add_argument("--quick", action="store_true", help="tiny models, sizes and data, 1 epoch (CPU smoke run)")
    parser.add_argument("--skip-search", action="store_true", help="leave out the 2-trial search")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"default {GPU_RESULTS.relative_to(ROOT)} on a GPU, {CPU_RESULTS.relative_to(ROOT)} on a CPU",
    )
    args = parser.parse_args(argv)
    args.out = args.out or (GPU_RESULTS if args.device == "cuda" else CPU_RESULTS)
    return args


# --------------------------------------------------------------------------------------------
# 1. per-process throughput


CPU_BF16_SKIPPED = (
    "optim.bf16 is CUDA-only in the product, and CPU bf16 autocast of the GAN-KD step gave non-finite, "
    "non-reproducible critic gradients (see the module docstring)"
)


def bf16_unavailable(device: torch.device) -> str | None:
    """Why bf16 is not measured here, or None."""
    if device.type != "cuda":
        return CPU_BF16_SKIPPED
    return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no bf16"


def throughput_config(preset: Preset, size: int, bf16: bool) -> RunConfig:
    return RunConfig(
        role="gankd",
        detector=DetectorConfig(backbone=preset.student, num_classes=NUM_CLASSES, image_size=size),
        teacher=DetectorConfig(backbone=preset.teacher, num_classes=NUM_CLASSES, image_size=size),
        optim=OptimConfig(batch_size=preset.batch, bf16=bf16),
    )


def build_steps(preset: Preset, size: int, bf16: bool, device: torch.device) -> dict[str, TrainStep]:
    """The GAN-KD step and the no-KD student step with the same student architecture."""
    cfg = throughput_config(preset, size, bf16)
    torch.manual_seed(cfg.seed)
    student_cfg = RunConfig.from_dict({**cfg.to_dict(), "role": "student"})
    return {
        "gankd": build_step(cfg, build_detector(cfg.teacher), device),
        "student": build_step(student_cfg, device=device),
    }


def part_runners(steps: dict[str, TrainStep], images: torch.Tensor, targets: list[dict]) -> dict[str, Any]:
    gankd, student = steps["gankd"], steps["student"]

    def teacher_forward() -> None:
        with gankd.autocast():  # as train_step runs it
            gankd.teacher(images)

    return {
        "teacher_forward": teacher_forward,
        "student_step": lambda: student.train_step(images, targets, 0.5),
        "gankd_step": lambda: gankd.train_step(images, targets, 0.5),
    }


def guarded(run: Callable[[], Any], key: tuple[str, str], diverged: dict[tuple[str, str], str]) -> Callable[[], None]:
    """``run`` until its step diverges once; after that a no-op, and ``diverged[key]`` says why."""

    def call() -> None:
        if key in diverged:
            return
        try:
            run()
        except Diverged as err:
            diverged[key] = first_line(err)

    return call


def throughput_at(preset: Preset, size: int, amps: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Every (part, amp) at one size, timed round-robin in one ``measure``."""
    images, targets = random_batch(preset.batch, size, device)
    runners, diverged = {}, {}
    for amp in amps:
        for part, runner in part_runners(build_steps(preset, size, amp == "bf16", device), images, targets).items():
            runners[(part, amp)] = guarded(runner, (part, amp), diverged)
    samples = measure(runners, device, preset.warmup, preset.repeats, budget=0.0)
    rows = []
    for (part, amp), seconds in samples.items():
        row = {"size": size, "amp": amp, "part": part, "batch_size": preset.batch}
        if (part, amp) in diverged:
            row["diverged"] = diverged[(part, amp)]
        else:
            median = statistics.median(seconds)
            row.update(images_per_s=preset.batch / median, seconds_median=median, repeats=len(seconds))
        rows.append(row)
    return rows


def throughput(preset: Preset, sizes: tuple[int, ...], device: torch.device) -> tuple[list[dict], str | None]:
    skipped = bf16_unavailable(device)
    amps = [amp for amp in AMPS if amp != "bf16" or skipped is None]
    rows = []
    for size in sizes:
        rows.extend(throughput_at(preset, size, amps, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next size's steps start from the same free memory
    return rows, skipped


# --------------------------------------------------------------------------------------------
# data and teacher of the Ray parts


def prepare_synthetic(preset: Preset, out: Path) -> str:
    """A synthetic dataset drawn at the run's image size (objects scale with it)."""
    from gankd_ray.data.records import Rejections
    from gankd_ray.data.sources.synthetic import SyntheticSpec, synthetic_source_data
    from gankd_ray.data.writer import write_dataset

    spec = SyntheticSpec(
        image_size=preset.run_size, num_train=preset.train_images, num_val=preset.val_images, num_test=preset.val_images
    )
    write_dataset(out, synthetic_source_data(spec), Rejections(), log=lambda _: None)
    return str(out)


def write_untrained_teacher(preset: Preset, data: str, out: Path) -> str:
    """A randomly initialised teacher model file: the Ray parts time training, not a good teacher."""
    from gankd_ray.data import read_dataset_info
    from gankd_ray.train.checkpoint import model_payload, save_torch

    cfg = RunConfig(
        role="teacher",
        detector=DetectorConfig(
            backbone=preset.teacher, num_classes=len(read_dataset_info(data)["classes"]), image_size=preset.run_size
        ),
    )
    torch.manual_seed(cfg.seed)
    return save_torch(model_payload(build_detector(cfg.detector), cfg), out)


def run_settings(preset: Preset, device: torch.device) -> dict[str, Any]:
    """Config overrides shared by the DDP run and the search trials."""
    return {
        "detector.backbone": preset.student,
        "detector.image_size": preset.run_size,
        "optim.batch_size": preset.batch,
        "data.loader_workers": preset.loader_workers,
        "optim.bf16": device.type == "cuda",
    }


def resources_for(device: torch.device) -> Resources:
    """One worker per GPU (nccl cannot put two ranks on one GPU), with a share of the CPUs for its loader;
    on CPU two 1-CPU gloo workers."""
    if device.type != "cuda":
        return Resources(CPU_DDP_WORKERS, 1.0, 0.0)
    gpus = torch.cuda.device_count()
    return Resources(gpus, float(max(1, min(8, (os.cpu_count() or 1) // gpus))), 1.0)


# --------------------------------------------------------------------------------------------
# 2. DDP Ray Train run


def ddp_run(preset: Preset, data: str, teacher: str, storage: Path, device: torch.device) -> dict[str, Any]:
    import ray

    from gankd_ray.cluster import init_ray
    from gankd_ray.records import read_metrics
    from gankd_ray.train.run import TrainJob, resolve_job, run_training

    resources = resources_for(device)
    cfg = RunConfig().with_overrides(
        {**run_settings(preset, device), "role": "gankd", "data.path": data, "optim.epochs": preset.ddp_epochs}
    )
    job = resolve_job(TrainJob(config=cfg, storage=str(storage), name="ddp", teacher=teacher, resources=resources))
    init_ray()
    try:
        started = time.perf_counter()
        summary = run_training(job)
        wall_s = time.perf_counter() - started
    finally:
        ray.shutdown()  # the search starts its own Ray
    records = read_metrics(job.run_dir)
    return {
        "backend": "nccl" if resources.gpus_per_worker else "gloo",
        "workers": resources.workers,
        "world_size": records[-1]["world_size"],
        "cpus_per_worker": resources.cpus_per_worker,
        "gpus_per_worker": resources.gpus_per_worker,
        "image_size": preset.run_size,
        "batch_size_per_worker": preset.batch,
        "bf16": cfg.optim.bf16,
        "train_images_per_epoch": records[-1]["train_images"],
        "epochs": len(records),
        "status": summary.status.value,
        "images_per_s": records[-1]["images_per_s"],
        "images_per_s_per_epoch": [record["images_per_s"] for record in records],
        "fit_wall_s": wall_s,
        # One GPU: the loop wraps nothing in DDP (world size 1), so there is no gradient all-reduce to time.
        "ddp_wrapped": records[-1]["world_size"] > 1,
    }


# --------------------------------------------------------------------------------------------
# 3. two-trial search


def search_run(preset: Preset, data: str, teacher: str, storage: Path, device: torch.device) -> dict[str, Any]:
    import pandas as pd

    resources = resources_for(device)
    overrides = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in run_settings(preset, device).items()
    ]
    command = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--data",
        data,
        "--teacher",
        teacher,
        "--storage",
        str(storage),
        "--name",
        "search",
        "--num-samples",
        str(SEARCH_TRIALS),
        "--max-epochs",
        str(preset.search_epochs),
        "--workers-per-trial",
        "1",
        "--cpus-per-worker",
        str(resources.cpus_per_worker),
        "--gpus-per-worker",
        str(resources.gpus_per_worker),
        *overrides,
    ]
    print("[bench] launch/search.py " + " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall_s = time.perf_counter() - started
    trials = pd.read_parquet(storage / "search" / "trials.parquet")
    return {
        "num_trials": len(trials),
        "max_epochs": preset.search_epochs,
        "image_size": preset.run_size,
        "gpus_per_worker": resources.gpus_per_worker,
        "wall_s": wall_s,  # the whole command: Ray start, baseline, trials, tables, report, export
        "best_val_map": float(trials["best_map"].max()),
        "best_val_ap50": float(trials["best_ap50"].max()),
        "trials": [
            {
                "trial_id": row.trial_id,
                "status": row.status,
                "epochs": int(row.epochs),
                "best_map": float(row.best_map),
                "wall_s": float(row.wall_s),
            }
            for row in trials.itertuples()
        ],
    }


# --------------------------------------------------------------------------------------------
# report


def print_report(result: dict[str, Any]) -> None:
    rows = result["throughput"]
    print(
        f"\nimages/s on {result['device']} ({result['machine'].get('gpu', result['machine']['processor'])}), "
        f"batch {rows[0]['batch_size']}:"
    )
    print(f"{'size':>5} {'amp':>5} " + " ".join(f"{part:>16}" for part in PARTS))
    for size, amp in dict.fromkeys((row["size"], row["amp"]) for row in rows):
        cells = {
            row["part"]: f"{row['images_per_s']:.1f}" if "images_per_s" in row else "diverged"
            for row in rows
            if row["size"] == size and row["amp"] == amp
        }
        print(f"{size:>5} {amp:>5} " + " ".join(f"{cells[part]:>16}" for part in PARTS))
    if result["bf16_skipped"]:
        print(f"bf16 skipped: {result['bf16_skipped']}")
    ddp = result["ddp"]
    print(
        f"DDP ({ddp['backend']}, world size {ddp['world_size']}, {ddp['image_size']} px): "
        f"{ddp['images_per_s']:.1f} images/s in its last epoch (per epoch: "
        + ", ".join(f"{value:.1f}" for value in ddp["images_per_s_per_epoch"])
        + ")"
    )
    search = result["search"]
    if search:
        print(
            f"search: {search['num_trials']} trials x {search['max_epochs']} epochs in {search['wall_s']:.0f} s, "
            f"best val mAP {search['best_val_map']:.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA GPU on this machine (use --device cpu)")
    device = torch.device(args.device)
    preset = QUICK if args.quick else FULL
    sizes = args.sizes or preset.sizes
    started = time.perf_counter()
    rows, bf16_skipped = throughput(preset, sizes, device)
    with tempfile.TemporaryDirectory(prefix="gankd_bench_gpu_", ignore_cleanup_errors=True) as workdir:
        data = prepare_synthetic(preset, Path(workdir, "data"))
        teacher = write_untrained_teacher(preset, data, Path(workdir, "teacher.pt"))
        ddp = ddp_run(preset, data, teacher, Path(workdir, "runs"), device)
        search = None if args.skip_search else search_run(preset, data, teacher, Path(workdir, "runs"), device)
    result = {
        "benchmark": "gpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "device": args.device,
        "script": "bench/gpu.py",
        "options": {"quick": args.quick, "sizes": list(sizes), "skip_search": args.skip_search},
        "models": {"teacher": preset.teacher, "student": preset.student},
        "warmup_rounds": preset.warmup,
        "bf16_applied_by": "optim.bf16=true (TrainStep.autocast)",
        "bf16_skipped": bf16_skipped,
        "throughput": rows,
        "ddp": ddp,
        "search": search,
        "wall_s": time.perf_counter() - started,
    }
    write_benchmark_json(args.out, result)
    print_report(result)
    print(f"[bench] wrote {os.path.relpath(args.out, ROOT) if args.out.resolve().is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
