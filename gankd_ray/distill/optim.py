"""Optimisers and the warm-up + cosine learning-rate schedule of both players."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from gankd_ray.config import OptimConfig


class WarmupCosine:
    """LR multiplier by fractional epoch progress: linear warm-up, then cosine decay to 0.

    ``m(p) = p / W`` for ``p < W``, else ``0.5 * (1 + cos(pi * min(1, (p - W) / (E - W))))``, with
    ``p`` the progress in epochs (``epoch_index + batch_index / batches``, so it moves every step),
    ``W = warmup_epochs`` and ``E = epochs``. A pure function of the progress the training loop
    passes: nothing to checkpoint, and resume lands on exactly the same learning rate.
    """

    def __init__(self, warmup_epochs: float, epochs: float) -> None:
        self.warmup_epochs = max(0.0, float(warmup_epochs))
        self.epochs = max(float(epochs), self.warmup_epochs)

    def __call__(self, progress: float) -> float:
        if progress < self.warmup_epochs:
            return max(0.0, progress) / self.warmup_epochs
        decay_epochs = self.epochs - self.warmup_epochs
        if decay_epochs <= 0:
            return 1.0 if progress < self.epochs else 0.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - self.warmup_epochs) / decay_epochs)))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every group's lr to ``initial_lr * multiplier``; returns the first group's new lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


def build_student_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (sgd; adam / adamw with ``cfg.betas``) over the trainable parameters of ``module``.

    Weight decay applies to weights only: decaying norm scales and biases just fights the norm.
    """
    groups = _decay_groups(module.parameters(), cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    return _with_initial_lr(optimizer)


def build_disc_optimizer(module: nn.Module, cfg: OptimConfig, lr_ratio: float) -> torch.optim.Optimizer:
    """Adam at ``lr_ratio * cfg.lr`` with ``cfg.disc_betas``, no weight decay (critics are tiny)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return _with_initial_lr(torch.optim.Adam(params, lr=lr_ratio * cfg.lr, betas=tuple(cfg.disc_betas)))


def _decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _with_initial_lr(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # The base lr lives in the param group (as torch's schedulers keep it), so it is checkpointed
    # with the optimiser state.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer
