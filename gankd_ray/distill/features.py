"""What the critics and the imitation term see of a level's maps: standardisation, instance noise, imitation.

The student's head always gets the adapted maps as they are; these functions only shape the
distillation terms' inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Features = dict[str, Tensor]

# The variance floor, relative to the level's mean channel variance: a map's overall scale never
# matters (a random teacher's deep levels are ~1e-6) and channels whose std differs by 100x are both
# standardised, yet a channel 10^4 times quieter than its level's average is not blown up to unit
# variance; the absolute floor keeps an all-zero level (dead ReLUs) at 0.
_RELATIVE_VAR_EPS = 1e-8
_ABSOLUTE_VAR_EPS = 1e-20
_ENERGY_FLOOR = 1e-6  # a teacher level that is all zeros would otherwise make any error infinite


def standardize(features: Mapping[str, Tensor]) -> Features:
    """Each map minus its per-channel mean, over its per-channel std (batch and spatial dims), in float32.

    Each side is standardised with its own statistics, so a critic cannot tell teacher from student by
    a channel's offset or scale, only by the shape of the distribution. Gradients flow through the
    statistics, as through a BatchNorm in training mode.

    Shapes:
        ``{level: Tensor[B, C, H, W]} -> {level: Tensor[B, C, H, W]}`` (float32).
    """
    out: Features = {}
    for level, x in features.items():
        x = x.float()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        floor = _RELATIVE_VAR_EPS * var.mean().detach() + _ABSOLUTE_VAR_EPS
        out[level] = (x - mean) * torch.rsqrt(var + floor)
    return out


def instance_noise_std(initial: float, anneal_epochs: float, progress: float) -> float:
    """``initial * max(0, 1 - progress / anneal_epochs)``: linear from ``initial`` at progress 0 to 0 at the span."""
    if initial <= 0:
        return 0.0
    return initial * max(0.0, 1.0 - max(0.0, progress) / anneal_epochs)


def noise_like(features: Mapping[str, Tensor], std: float) -> Features:
    """Gaussian noise of ``std`` shaped like each map (callers pass ``None`` to :func:`add` when ``std == 0``)."""
    return {level: torch.randn_like(x) * std for level, x in features.items()}


def add(features: Mapping[str, Tensor], noise: Mapping[str, Tensor] | None) -> Features:
    """``features + noise`` per level; the features unchanged when ``noise`` is ``None``."""
    if noise is None:
        return dict(features)
    return {level: x + noise[level].to(x.dtype) for level, x in features.items()}


def imitation_losses(fake: Mapping[str, Tensor], real: Mapping[str, Tensor]) -> Features:
    """Per level, ``mean((fake - real)^2) / mean(real^2)``: the relative squared error, in float32.

    A mean over elements alone still weighs a level by the teacher's magnitude there (post-ReLU6
    maps of mean 2.7 against BatchNorm outputs of unit variance), so one ``feat_weight`` would mean
    something else at every level and backbone. Relative to the teacher's energy, an error of 10 %
    everywhere costs 0.01 at any level, of any channel count and scale. The teacher side carries no
    gradient, so the denominator is a constant per batch.
    """
    out: Features = {}
    for level, student in fake.items():
        teacher = real[level].float()
        energy = teacher.pow(2).mean().clamp_min(_ENERGY_FLOOR)
        out[level] = (student.float() - teacher).pow(2).mean() / energy
    return out
