"""The training engine, Ray-free: ``fit(job, runtime)`` trains a ``TrainJob`` epoch by epoch.

Per epoch (torchvision's references' ``train_one_epoch``/``evaluate`` shape): train on this rank's share of
the train split, evaluate this rank's share of val and gather the detections so COCOeval sees every val image
once, then hand the ``EpochRecord`` and a checkpoint (rank 0 writes it) to the runtime. What runs the engine
is the runtime: Ray Train's workers (``gankd_ray.train.loop``) or a plain process (``LocalRuntime``, used by
``bench/calibrate.py``). A runtime that has a checkpoint makes the run continue at the epoch after it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from gankd_ray.config import DataConfig, RunConfig
from gankd_ray.records import DIVERGED_QUALITY, Cost, EpochRecord, Status, Throughput
from gankd_ray.train import checkpoint as ckpt
from gankd_ray.train.spec import TrainJob


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


class Runtime(Protocol):
    """What the engine needs from whatever runs it."""

    rank: int
    world_size: int
    local_rank: int

    def node(self) -> str | None: ...

    def latest_checkpoint(self) -> AbstractContextManager[str | None]:
        """A local folder holding the latest checkpoint of this run (None for a fresh run)."""

    def report(self, record: EpochRecord, checkpoint_dir: str | None) -> None:
        """One finished epoch; ``checkpoint_dir`` (rank 0 only) is deleted after this returns."""


@dataclass
class EpochData:
    """The loaders of one run and the ground truth its scored split is evaluated against."""

    train: object
    val: object
    coco_gt: object


def fit(job: TrainJob, runtime: Runtime, data: EpochData | None = None, eval_every: int = 1) -> list[EpochRecord]:
    """Train ``job`` from its latest checkpoint to ``config.optim.epochs``; returns the records reported.

    ``data``: loaders to use instead of the job's splits (calibration's subsets); ``eval_every``: score every
    k-th epoch and the last (the others report no quality). A diverged epoch ends the run.
    """
    worker_started_at = time.time()  # start-up accounting, reported with the first epoch
    cfg = job.config
    ctx = setup_worker(job, runtime)
    teacher = load_teacher(job.teacher, ctx.device, cfg.data) if cfg.role == "gankd" else None
    step = build_step(cfg, teacher, ctx)
    start_epoch, best = restore(step, runtime, ctx)
    cost = measure_cost(step, cfg, ctx) if job.measure_cost and ctx.rank == 0 else Cost()
    data = data or build_data(cfg, ctx)
    clock: dict[str, float] | None = {"worker_started_at": worker_started_at}
    records = []
    for epoch in range(start_epoch, cfg.optim.epochs + 1):
        scored = epoch % eval_every == 0 or epoch == cfg.optim.epochs
        record = run_epoch(step, cfg, ctx, data, epoch, clock, scored=scored)
        clock = None  # start-up is accounted on a worker's first epoch only
        if record.map is not None and record.map > best.get("best_map", -1.0):
            best = {"best_map": record.map, "best_ap50": record.ap50, "best_epoch": epoch}
        _finish_record(record, job, best, runtime)
        record.cost = cost
        with tempfile.TemporaryDirectory() as tmp:
            directory = write_checkpoint(tmp, step, cfg, epoch, best) if ctx.rank == 0 else None
            runtime.report(record, directory)
        records.append(record)
        if record.status is Status.DIVERGED:
            break
    return records


def _finish_record(record: EpochRecord, job: TrainJob, best: dict, runtime: Runtime) -> None:
    record.best_map, record.best_ap50 = best.get("best_map"), best.get("best_ap50")
    record.best_epoch = best.get("best_epoch")
    # A diverged recipe scores 0 for the searcher and the scheduler, whatever its earlier epochs scored.
    record.score = 0.0 if record.status is Status.DIVERGED else record.best_map
    record.node, record.context, record.reported_at = runtime.node(), job.context, time.time()
    if record.epoch == job.config.optim.epochs and record.status is not Status.DIVERGED:
        record.status = Status.COMPLETED


def run_epoch(
    step,
    cfg: RunConfig,
    ctx: WorkerContext,
    data: EpochData,
    epoch: int,
    clock: dict[str, float] | None = None,
    scored: bool = True,
) -> EpochRecord:
    """Train one epoch and evaluate; a non-finite loss ends training with status ``diverged``.

    ``clock``: start-up times for the record (a worker's first epoch); gets ``first_step_at``, the wall time
    of the first finished step.
    """
    from gankd_ray.distill import Diverged

    status = Status.RUNNING
    started = time.perf_counter()
    try:
        terms, image_ids = train_one_epoch(step, data.train, epoch, clock)
    except Diverged as err:
        terms, image_ids, status = dict(err.metrics), [], Status.DIVERGED
    train_s = time.perf_counter() - started
    all_ids = _gather_ids(image_ids, ctx)
    eval_started = time.perf_counter()
    if status is Status.DIVERGED:  # zero for the scheduler and the searcher, whatever the last weights score
        quality = dict(DIVERGED_QUALITY)
    else:
        quality = evaluate(step.predict, data.val, data.coco_gt, ctx) if scored else {}
    throughput = Throughput(
        world_size=ctx.world_size,
        images_per_s=len(all_ids) / max(train_s, 1e-9),
        train_images=len(all_ids),
        train_unique_images=len(set(all_ids)),
        train_s=train_s,
        eval_s=time.perf_counter() - eval_started,
    )
    clock = clock or {}
    return EpochRecord(
        epoch=epoch,
        epochs=cfg.optim.epochs,
        status=status,
        quality=quality,
        terms=_reduce_mean(terms, ctx),
        throughput=throughput,
        worker_started_at=clock.get("worker_started_at"),
        first_step_at=clock.get("first_step_at"),
    )


def train_one_epoch(
    step, loader, epoch: int, clock: dict[str, float] | None = None
) -> tuple[dict[str, float], list[int]]:
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


def setup_worker(job: TrainJob, runtime: Runtime) -> WorkerContext:
    torch.set_num_threads(max(1, int(job.resources.cpus_per_worker)))
    if job.resources.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", runtime.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    seed_everything(job.config.seed * 1000 + runtime.rank)
    return WorkerContext(rank=runtime.rank, world_size=runtime.world_size, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def measure_cost(step, cfg: RunConfig, ctx: WorkerContext) -> Cost:
    """The exported student's latency (batch 1, on this worker's device and threads), parameters and FLOPs."""
    from gankd_ray.export.latency import measure_latency

    latency = measure_latency(step.export_detector().to(ctx.device), cfg.detector.image_size, device=ctx.device)
    return Cost(
        latency_ms=latency.latency_ms,
        latency_p90_ms=latency.latency_p90_ms,
        latency_threads=latency.threads,
        student_params=latency.params,
        student_gflops=latency.gflops,
    )


def load_teacher(path: str | None, device: torch.device, data: DataConfig):
    """The teacher in eval mode; a remote one is read from the node's cache (``data.cache_*``)."""
    from gankd_ray.node_cache import local_file

    model_file = local_file(ckpt.resolve_model_file(path), data.cache_dir, data.cache_reserve_mb)
    detector, _ = ckpt.load_detector(model_file, device)
    return detector


def build_step(cfg: RunConfig, teacher, ctx: WorkerContext):
    from gankd_ray.distill import build_step as build_distill_step

    wrap = _ddp_wrapper(ctx) if ctx.world_size > 1 else None
    return build_distill_step(cfg, teacher=teacher, device=ctx.device, wrap=wrap)


def _ddp_wrapper(ctx: WorkerContext) -> Callable[[torch.nn.Module], torch.nn.Module]:
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    return wrap


def build_data(cfg: RunConfig, ctx: WorkerContext) -> EpochData:
    from gankd_ray.data.loader import DetectionBatchLoader
    from gankd_ray.eval import load_coco
    from gankd_ray.node_cache import local_dataset

    # A remote dataset is read from the node's copy (downloaded once per node); cfg keeps the remote location.
    path = local_dataset(cfg.data.path, cfg.data.cache_dir, cfg.data.cache_reserve_mb)

    def loader(split: str, train: bool) -> DetectionBatchLoader:
        return DetectionBatchLoader.from_dataset(
            path,
            split,
            cfg.detector.image_size,
            cfg.optim.batch_size,
            train=train,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.seed,
            hflip=cfg.data.hflip and train,
            jitter=cfg.data.jitter if train else 0.0,
            num_workers=cfg.data.loader_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )

    train, val = loader(cfg.data.train_split, True), loader(cfg.data.val_split, False)
    coco_gt = load_coco(path, cfg.data.val_split)  # every rank scores the gathered results
    return EpochData(train=train, val=val, coco_gt=coco_gt)


# --------------------------------------------------------------------------------------------
# checkpoints


def write_checkpoint(directory: str, step, cfg: RunConfig, epoch: int, best: dict) -> str:
    """The model (``model.pt``, config inside) and everything a resumed run needs, into ``directory``."""
    ckpt.save_torch(ckpt.model_payload(step.export_detector(), cfg), os.path.join(directory, ckpt.MODEL_FILE))
    state = {"epoch": epoch, "best": best, "step": step.state_dict(), "rng": ckpt.rng_state()}
    ckpt.save_torch(state, os.path.join(directory, ckpt.TRAIN_STATE_FILE))
    return directory


def restore(step, runtime: Runtime, ctx: WorkerContext) -> tuple[int, dict]:
    """Load the runtime's latest checkpoint, if any: returns the epoch to start at and the best-so-far metrics."""
    with runtime.latest_checkpoint() as directory:
        if directory is None:
            return 1, {}
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


# --------------------------------------------------------------------------------------------
# a plain process


class LocalRuntime:
    """Runs the engine in this process (rank 0 of 1): records are kept, and so is the latest checkpoint when
    ``checkpoint_dir`` is given (a second ``fit`` with the same folder continues from it)."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, checkpoint_dir: str | None = None, on_report: Callable[[EpochRecord], None] | None = None):
        self.checkpoint_dir = checkpoint_dir
        self.on_report = on_report
        self.records: list[EpochRecord] = []

    def node(self) -> str | None:
        return None

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = self.checkpoint_dir and os.path.isfile(os.path.join(self.checkpoint_dir, ckpt.TRAIN_STATE_FILE))
        yield self.checkpoint_dir if found else None

    def report(self, record: EpochRecord, checkpoint_dir: str | None) -> None:
        if self.checkpoint_dir and checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.checkpoint_dir, dirs_exist_ok=True)
        self.records.append(record)
        if self.on_report is not None:
            self.on_report(record)
