"""The per-worker loop run by ``ray.train.torch.TorchTrainer``.

Per epoch: train on this rank's share of the train split, evaluate this rank's share of val, gather the
detections so COCOeval sees every val image once, then ``ray.train.report`` the metrics with a
checkpoint (rank 0 writes it). A resumed run (worker failure, or the same storage+name started again)
continues at the epoch after the latest checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from gankd_ray.config import RunConfig
from gankd_ray.train import checkpoint as ckpt

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_DIVERGED = "diverged"
DIVERGED_QUALITY = {"map": 0.0, "ap50": 0.0}


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    clock = {"worker_started_at": time.time()}  # start-up accounting: reported with the first epoch
    cfg = RunConfig.from_dict(config["run"])
    ctx = _setup_worker(cfg, config)
    teacher = _load_teacher(config.get("teacher"), ctx.device) if cfg.role == "gankd" else None
    step = _build_step(cfg, teacher, ctx)
    start_epoch, best = _restore(step, config, ctx)
    train_loader, val_loader, coco_gt = _build_data(cfg, ctx)
    report_context = {"node": _node_name(), **config.get("report_extra", {})}

    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        epoch_metrics = run_epoch(step, cfg, ctx, train_loader, val_loader, coco_gt, epoch, clock)
        epoch_metrics.update(clock)
        clock = {}
        if epoch_metrics.get("map", -1.0) > best.get("best_map", -1.0):
            best = {"best_map": epoch_metrics["map"], "best_ap50": epoch_metrics["ap50"], "best_epoch": epoch}
        epoch_metrics.update(best)
        epoch_metrics.update(report_context, reported_at=time.time())
        diverged = epoch_metrics["status"] == STATUS_DIVERGED
        if epoch == cfg.optim.epochs and not diverged:
            epoch_metrics["status"] = STATUS_COMPLETED
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = _write_checkpoint(tmp, step, cfg, epoch, best, ctx) if ctx.rank == 0 else None
            ray.train.report(epoch_metrics, checkpoint=checkpoint)
        if diverged:
            return


def run_epoch(step, cfg: RunConfig, ctx: WorkerContext, train_loader, val_loader, coco_gt, epoch: int,
              clock: dict[str, float] | None = None) -> dict:
    """Train one epoch and evaluate; a non-finite loss ends training with status ``diverged``.

    ``clock``: when given and without ``first_step_at``, receives the wall time of the first finished step.
    """
    from gankd_ray.distill import Diverged

    status = STATUS_RUNNING
    started = time.perf_counter()
    try:
        train_metrics, image_ids = train_one_epoch(step, train_loader, epoch, clock)
    except Diverged as err:
        train_metrics, image_ids, status = dict(err.metrics), [], STATUS_DIVERGED
    train_s = time.perf_counter() - started
    all_ids = _gather_ids(image_ids, ctx)
    eval_started = time.perf_counter()
    # A diverged run scores zero for the scheduler and the searcher: the recipe failed, whatever the
    # last finite weights would score.
    quality = DIVERGED_QUALITY if status == STATUS_DIVERGED else evaluate(step.predict, val_loader, coco_gt, ctx)
    eval_s = time.perf_counter() - eval_started
    return {
        **_reduce_mean(train_metrics, ctx),
        **quality,
        "epoch": epoch,
        "epochs": cfg.optim.epochs,
        "world_size": ctx.world_size,
        "status": status,
        "images_per_s": len(all_ids) / max(train_s, 1e-9),
        # over all ranks: images trained on, and distinct ids among them (equal when shares are disjoint)
        "train_images": len(all_ids),
        "train_unique_images": len(set(all_ids)),
        "train_s": train_s,
        "eval_s": eval_s,
    }


def train_one_epoch(step, loader, epoch: int, clock: dict[str, float] | None = None) -> tuple[dict[str, float], list[int]]:
    """Returns the mean of every step term over the epoch and the image ids this rank trained on.

    ``clock``: when given and without ``first_step_at``, receives the wall time of the first finished step.
    """
    loader.set_epoch(epoch)
    totals: dict[str, float] = {}
    batches = len(loader)
    images: list[int] = []
    for index, (inputs, targets, metas) in enumerate(loader):
        progress = (epoch - 1) + index / max(batches, 1)
        terms = step.train_step(inputs, targets, progress)
        if clock is not None and "first_step_at" not in clock:
            clock["first_step_at"] = time.time()
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value
        images.extend(int(m["image_id"]) for m in metas)
    return {k: v / max(batches, 1) for k, v in totals.items()}, images


@torch.no_grad()
def evaluate(predict: Callable, loader, coco_gt, ctx: WorkerContext) -> dict[str, float]:
    """COCO mAP over every val image: each rank predicts its share, rank results are gathered."""
    from gankd_ray.eval import coco_results, evaluate_coco, gather_results

    local: list[dict] = []
    for inputs, _, metas in loader:
        outputs = predict(inputs, [m["orig_size"] for m in metas])
        local.extend(coco_results(outputs, metas))
    results = gather_results(local)
    return evaluate_coco(coco_gt, results)


# --------------------------------------------------------------------------------------------
# set-up


def _setup_worker(cfg: RunConfig, config: dict[str, Any]) -> WorkerContext:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    if config.get("use_gpu") and torch.cuda.is_available():
        device = torch.device("cuda", context.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    seed_everything(cfg.seed * 1000 + rank)
    return WorkerContext(rank=rank, world_size=world, device=device)


def _node_name() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_teacher(path: str | None, device: torch.device):
    detector, _ = ckpt.load_detector(path, device)
    return detector


def _build_step(cfg: RunConfig, teacher, ctx: WorkerContext):
    from gankd_ray.distill import build_step

    wrap = _ddp_wrapper(ctx) if ctx.world_size > 1 else None
    return build_step(cfg, teacher=teacher, device=ctx.device, wrap=wrap)


def _ddp_wrapper(ctx: WorkerContext) -> Callable[[torch.nn.Module], torch.nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    return wrap


def _build_data(cfg: RunConfig, ctx: WorkerContext):
    from gankd_ray.data.loader import DetectionBatchLoader
    from gankd_ray.eval import load_coco

    def loader(split: str, train: bool) -> DetectionBatchLoader:
        return DetectionBatchLoader.from_dataset(
            cfg.data.path, split, cfg.detector.image_size, cfg.optim.batch_size,
            train=train, rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
            hflip=cfg.data.hflip and train, jitter=cfg.data.jitter if train else 0.0,
            num_workers=cfg.data.loader_workers,
        )

    train, val = loader(cfg.data.train_split, True), loader(cfg.data.val_split, False)
    coco_gt = load_coco(cfg.data.path, cfg.data.val_split)  # every rank scores the gathered results
    return train, val, coco_gt


# --------------------------------------------------------------------------------------------
# checkpoints


def _write_checkpoint(directory: str, step, cfg: RunConfig, epoch: int, best: dict, ctx: WorkerContext):
    import ray.train

    ckpt.save_torch(ckpt.model_payload(step.export_detector(), cfg), os.path.join(directory, ckpt.MODEL_FILE))
    state = {"epoch": epoch, "best": best, "step": step.state_dict(), "rng": ckpt.rng_state()}
    ckpt.save_torch(state, os.path.join(directory, ckpt.TRAIN_STATE_FILE))
    return ray.train.Checkpoint.from_directory(directory)


def _restore(step, config: dict[str, Any], ctx: WorkerContext) -> tuple[int, dict]:
    """Load the latest checkpoint, if any: returns the epoch to start at and the best-so-far metrics."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, {}
    with checkpoint.as_directory() as directory:
        state = ckpt.load_torch(os.path.join(directory, ckpt.TRAIN_STATE_FILE), map_location=ctx.device)
    step.load_state_dict(state["step"])
    if ctx.rank == 0:
        ckpt.set_rng_state(state["rng"])
    else:  # only rank 0's stream is saved; other ranks reseed deterministically from the epoch
        seed_everything(int(state["epoch"]) * 7919 + ctx.rank)
    return int(state["epoch"]) + 1, dict(state.get("best", {}))


def _gather_ids(ids: list[int], ctx: WorkerContext) -> list[int]:
    """Every rank's trained image ids, concatenated (a collective: every rank calls it each epoch)."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return list(ids)
    gathered: list[list[int]] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, list(ids))
    return [i for rank_ids in gathered for i in rank_ids]


def _reduce_mean(metrics: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    """Average the logged terms across ranks (logging only; training never waits on this)."""
    if ctx.world_size == 1 or not dist.is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    gathered: list[list[str]] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, keys)
    if any(g != keys for g in gathered):  # a diverged rank may miss terms: keep local values
        return metrics
    dist.all_reduce(values)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, values) if math.isfinite(float(v))}
