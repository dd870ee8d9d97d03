"""Train one detector on Ray Train: a teacher, a no-KD student baseline, or a GAN-KD student.

Example:
    python launch/train.py --role teacher --data data/synthetic --epochs 6 --workers 2 \
        --storage runs --name teacher detector.backbone=mobilenet_v2
"""

from __future__ import annotations

import argparse

from gankd_ray.cli import entry
from gankd_ray.config import RunConfig
from gankd_ray.errors import EXIT_DIVERGED, EXIT_OK
from gankd_ray.records import Status
from gankd_ray.train.run import Resources, TrainJob, resolve_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["teacher", "student", "gankd"], required=True)
    parser.add_argument("--data", required=True, help="prepared dataset folder or URI")
    parser.add_argument("--teacher", help="teacher checkpoint (directory or model.pt); --role gankd only")
    parser.add_argument("--config", help="YAML run config (defaults for every field)")
    parser.add_argument("--epochs", type=int, help="train up to this epoch (a rerun with more continues)")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel workers")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument(
        "--max-failures", type=int, default=2, help="worker failures tolerated (resume from checkpoint)"
    )
    parser.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    parser.add_argument("--storage", default="runs", help="where runs live (folder or URI)")
    parser.add_argument("--name", required=True, help="run name; reusing it resumes the run")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the input, print the detectors and which levels are distilled, and exit before Ray starts",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. distill.adv_weight=0.1")
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace) -> TrainJob:
    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    config = config.with_overrides(args.overrides)
    config.role = args.role
    config.data.path = args.data
    if args.epochs is not None:
        config.optim.epochs = args.epochs
    job = TrainJob(
        config=config,
        storage=args.storage,
        name=args.name,
        resources=Resources(
            workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker
        ),
        teacher=args.teacher,
        max_failures=args.max_failures,
    )
    return resolve_job(job)


def _fmt(value) -> str:
    """A metric for the summary line; missing (no epoch reported, NaN dropped from the log) shows as n/a."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def dry_run_lines(job: TrainJob) -> list[str]:
    """What the run would train: its detectors and, in GAN-KD, the distilled level pairs (by stride)."""
    from gankd_ray.distill.pairs import describe_pairs
    from gankd_ray.models import level_strides_for
    from gankd_ray.train.spec import distilled_level_pairs

    cfg = job.config
    lines = [f"[gankd-ray] dry run {job.name}: role {cfg.role}, student {_describe(cfg.detector)}"]
    if cfg.role == "gankd":
        lines.append(f"[gankd-ray] teacher {_describe(cfg.teacher)}; distilled levels (student <- teacher):")
        student, teacher = level_strides_for(cfg.detector), level_strides_for(cfg.teacher, "teacher")
        lines += [f"  {line}" for line in describe_pairs(distilled_level_pairs(cfg), student, teacher)]
    return lines


def _describe(detector) -> str:
    backbone = f" ({detector.backbone})" if detector.arch == "ssd" else ""
    return f"arch {detector.arch}{backbone} at {detector.image_size} px, {detector.num_classes} classes"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = build_job(args)
    if args.dry_run:
        print("\n".join(dry_run_lines(job)))
        return EXIT_OK

    from gankd_ray.cluster import init_ray
    from gankd_ray.train.run import run_training

    init_ray(args.address, num_cpus=None)
    summary = run_training(job)  # a storage failure raises StorageFullError: exit status 4
    print(
        f"[gankd-ray] {job.name}: status {summary.status}, epochs {summary.epochs_done}, "
        f"best mAP {_fmt(summary.best_map)} (AP50 {_fmt(summary.best_ap50)}) "
        f"at epoch {summary.best_epoch}, checkpoint {summary.checkpoint}"
    )
    return EXIT_DIVERGED if summary.status is Status.DIVERGED else EXIT_OK


console_script = entry(main)
