"""Cost of one GAN-KD training step against the sum of its parts.

Measures, in one run and interleaved (so machine load drifts hit every measure alike):

- ``full_step``: ``TrainStep.train_step`` (teacher forward, student forward/backward/update, critic
  forward/backward/update, diagnostics, the one host synchronisation, buffer backup);
- alone, the parts it cannot avoid: ``teacher_forward``; ``student_step`` (student forward,
  detection + adversarial loss through the frozen critics, backward, clip, update);
  ``disc_step`` (``n_critic`` critic updates on given detached maps).

``step_over_floor = full_step / (teacher_forward + student_step + disc_step)`` (medians); the goal
is <= 1.10. Writes ``bench/results/step_cost.json`` with the machine, date and config.

Usage: ``python bench/step_cost.py [--quick] [--device cuda] [--set distill.adv_loss=wgan ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gankd_ray.config import DetectorConfig, OptimConfig, RunConfig
from gankd_ray.distill import TrainStep, adversarial, build_step
from gankd_ray.models import build_detector
from gankd_ray.utils import machine_description, write_benchmark_json

GOAL = 1.10
RESULTS = Path(__file__).resolve().parent / "results" / "step_cost.json"
NUM_CLASSES = 5

# (teacher, student, image size, batch, warm-up steps, timed repeats)
QUICK = ("mobilenet_v2", "mobilenet_v2_0.35", 160, 4, 2, 25)
FULL = ("resnet50", "mobilenet_v2", 320, 16, 5, 15)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models at 160 px (under a minute on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (0 = the preset's)")
    parser.add_argument(
        "--budget", type=float, default=0.0, help="stop timing after this many seconds (min 3 repeats; --quick: 35)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> tuple[RunConfig, int, int, int]:
    teacher, student, size, batch, warmup, repeats = QUICK if args.quick else FULL
    cfg = RunConfig(
        role="gankd",
        detector=DetectorConfig(backbone=student, num_classes=NUM_CLASSES, image_size=size),
        teacher=DetectorConfig(backbone=teacher, num_classes=NUM_CLASSES, image_size=size),
        optim=OptimConfig(batch_size=batch, bf16=args.device.startswith("cuda")),
    ).with_overrides(args.set)
    return cfg, cfg.optim.batch_size, warmup, args.repeats or repeats


def random_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Random images with 1-4 random boxes each (S-space xyxy), already on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(1, 5, (), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * size * 0.6
        side = (0.1 + 0.3 * torch.rand(count, 2, generator=generator)) * size
        boxes = torch.cat([corner, (corner + side).clamp(max=size)], dim=1)
        labels = torch.randint(1, NUM_CLASSES + 1, (count,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


def parts(step: TrainStep, images: torch.Tensor, targets: list[dict]) -> dict[str, Callable[[], None]]:
    """The step's unavoidable parts, each runnable alone (inputs of later parts precomputed)."""
    cfg = step.cfg
    autocast = step.autocast  # the step's own precision policy, so parts and step compute alike
    with autocast():
        real = step.teacher(images)
        _, fake = step.student(images, targets)
    detached = {level: f.detach() for level, f in fake.items()}

    def teacher_forward() -> None:
        with autocast():
            step.teacher(images)

    def student_step() -> None:
        step.student_optimizer.zero_grad(set_to_none=True)
        with autocast():
            det, fake = step.student_train(images, targets)
            adv = step.critics.student_losses(fake)
        loss = sum(det.values()) + cfg.distill.adv_weight * sum(adv.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step.student.parameters(), cfg.optim.grad_clip)
        step.student_optimizer.step()

    def disc_step() -> None:
        for _ in range(cfg.distill.n_critic):
            step.disc_optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = step.critics_train(real, detached)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(step.critics.parameters(), cfg.optim.grad_clip)
            step.disc_optimizer.step()
            if cfg.distill.adv_loss == "wgan":
                adversarial.clip_weights_(step.critics, cfg.distill.clip)

    def full_step() -> None:
        step.train_step(images, targets, 0.5)

    return {
        "full_step": full_step,
        "teacher_forward": teacher_forward,
        "student_step": student_step,
        "disc_step": disc_step,
    }


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(
    measures: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, budget: float
) -> dict[str, list[float]]:
    """Round-robin over the measures: ``warmup`` untimed rounds, then up to ``repeats`` timed ones
    (fewer, but at least 3, once ``budget`` seconds have passed; 0 = no budget)."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    started = time.perf_counter()
    for round_index in range(warmup + repeats):
        timed_rounds = round_index - warmup
        if budget and timed_rounds >= 3 and time.perf_counter() - started > budget:
            break
        for name, fn in measures.items():
            seconds = timed(fn, device)
            if timed_rounds >= 0:
                samples[name].append(seconds)
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, batch, warmup, repeats = bench_config(args)
    torch.manual_seed(cfg.seed)
    teacher = build_detector(cfg.teacher)
    step = build_step(cfg, teacher, device)
    images, targets = random_batch(batch, cfg.detector.image_size, device)
    started = time.perf_counter()
    budget = args.budget or (35.0 if args.quick else 0.0)
    samples = measure(parts(step, images, targets), device, warmup, repeats, budget)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    floor = medians["teacher_forward"] + medians["student_step"] + medians["disc_step"]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "device": str(device),
        "quick": args.quick,
        "batch_size": batch,
        "warmup_rounds": warmup,
        "repeats": len(samples["full_step"]),
        "config": cfg.to_dict(),
        "seconds_median": medians,
        "seconds_samples": samples,
        "sum_of_parts": floor,
        "step_over_floor": medians["full_step"] / floor,
        # Same ratio per round (full step vs the parts timed right after it), less sensitive to drift.
        "step_over_floor_paired_median": statistics.median(
            full / (teacher + student + disc)
            for full, teacher, student, disc in zip(
                samples["full_step"], samples["teacher_forward"], samples["student_step"], samples["disc_step"]
            )
        ),
        "goal": GOAL,
        "measure_wall_seconds": time.perf_counter() - started,
    }
    write_benchmark_json(args.out, result)
    print(
        f"full step {medians['full_step'] * 1e3:.1f} ms; parts: teacher {medians['teacher_forward'] * 1e3:.1f}, "
        f"student {medians['student_step'] * 1e3:.1f}, disc {medians['disc_step'] * 1e3:.1f} ms; "
        f"step_over_floor {result['step_over_floor']:.3f} (per-round median "
        f"{result['step_over_floor_paired_median']:.3f}; goal <= {GOAL}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
