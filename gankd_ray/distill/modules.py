"""The modules of one GAN-KD step: frozen teacher, trainable student side, trainable critic side.

Only :class:`StudentModule` and :class:`DiscriminatorModule` train, so only they are handed to the
``wrap`` callable (torch DDP in the trainer). Each computes, in ONE forward call, everything its
backward needs, which is what DDP's per-forward gradient hooks expect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gankd_ray.distill import adversarial

if TYPE_CHECKING:
    from gankd_ray.models import SSDDetector

Features = dict[str, Tensor]
Targets = list[dict[str, Tensor]]


class FrozenTeacher(nn.Module):
    """A trained detector used only as a feature source: eval mode, no gradients, no graph.

    ``train(True)`` is ignored, so a parent's ``.train()`` cannot switch its BatchNorm to batch
    statistics.

    Args:
        detector: the trained teacher; its parameters are frozen in place.
        levels: the teacher levels to return, or ``{student level: teacher level}`` to return each
            teacher map under the name of the student level it is distilled into (cross-family pairs).
        input_size: the teacher's own input size; batches of another size are resized to it
            (bilinear) so the teacher sees the resolution it was trained at. ``None`` = as given.

    Shapes:
        ``forward(images: Tensor[B, 3, S, S] in [0, 1]) -> {level: Tensor[B, C_l, H_l, W_l]}``.
    """

    def __init__(
        self, detector: SSDDetector, levels: Sequence[str] | Mapping[str, str], input_size: int | None = None
    ) -> None:
        super().__init__()
        self.detector = detector.requires_grad_(False).eval()
        self.sources = dict(levels) if isinstance(levels, Mapping) else {level: level for level in levels}
        self.levels = list(self.sources)
        self.input_size = input_size

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Features:
        if self.input_size is not None and images.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        features = self.detector.extract(self.detector.normalize(images))
        return {level: features[source] for level, source in self.sources.items()}


class StudentModule(nn.Module):
    """Everything the student loss trains: a detector and the adapters of the distilled levels.

    ``own`` head mode: ``detector`` is the student itself and ``adapters`` hold one adapter per
    distilled level, applied to that level's map for the KD terms only.
    ``teacher`` head mode: ``detector`` is already the student-with-teacher-head (its backbone
    adapts every level, see :class:`AdaptedBackbone`), so ``adapters`` is empty and the distilled
    maps are the detector's own features.
    Plain roles (``teacher``/``student``): no adapters, no distilled levels.

    Args:
        detector: the detector whose head computes the detection loss.
        adapters: ``nn.ModuleDict`` level -> adapter (may be empty).
        distilled_levels: levels whose (adapted) maps are returned for distillation.

    Shapes:
        ``forward(images: Tensor[B, 3, S, S] in [0, 1], targets)`` ->
        ``({"det/classification": Tensor[], "det/bbox_regression": Tensor[]},
        {level: Tensor[B, C_teacher, H_teacher, W_teacher]})``.
    """

    def __init__(self, detector: SSDDetector, adapters: nn.ModuleDict, distilled_levels: Sequence[str]) -> None:
        super().__init__()
        self.detector = detector
        self.adapters = adapters
        self.distilled_levels = list(distilled_levels)

    def forward(self, images: Tensor, targets: Targets) -> tuple[dict[str, Tensor], Features]:
        features = self.detector.extract(self.detector.normalize(images))
        losses = self.detector.head_losses(features, targets, images.shape[-2:])
        distilled = {
            level: self.adapters[level](features[level]) if level in self.adapters else features[level]
            for level in self.distilled_levels
        }
        return losses, distilled


class DiscriminatorModule(nn.Module):
    """The per-level critics and their loss: one forward computes everything the D backward needs.

    Args:
        discriminators: ``nn.ModuleDict`` level -> :class:`LevelDiscriminator`.
        kind: adversarial loss, see :mod:`gankd_ray.distill.adversarial`.
        gp_weight: gradient-penalty weight (``wgan-gp`` only).
        r1_weight: gamma of the R1 penalty on teacher maps (any kind; 0 = off).

    ``forward(real, fake)`` takes ``{level: Tensor[B, C, H, W]}`` teacher maps (real) and detached
    student maps (fake) and returns ``(loss, terms)``:
    ``loss = sum_l d_loss_l (+ gp_weight * gp_l) (+ r1_weight * r1_l)`` and detached scalar ``terms``
    named ``disc/loss/<l>`` (all of the level's loss), ``disc/real/<l>``, ``disc/fake/<l>``,
    ``disc/acc/<l>`` or ``disc/wdist/<l>``, ``disc/gp/<l>`` for ``wgan-gp`` and ``disc/r1/<l>`` when
    ``r1_weight > 0``.
    """

    def __init__(
        self, discriminators: nn.ModuleDict, kind: str, gp_weight: float = 10.0, r1_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.discriminators = discriminators
        self.kind = kind
        self.gp_weight = gp_weight
        self.r1_weight = r1_weight

    def forward(self, real: Features, fake: Features) -> tuple[Tensor, dict[str, Tensor]]:
        total = real[next(iter(real))].new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for level, disc in self.discriminators.items():
            level_loss, level_terms = self._level_loss(disc, real[level], fake[level])
            total = total + level_loss
            terms[f"disc/loss/{level}"] = level_loss.detach()
            terms.update({f"disc/{name}/{level}": value for name, value in level_terms.items()})
        return total, terms

    def student_losses(self, fake: Features) -> dict[str, Tensor]:
        """The student's adversarial loss per level, ``{level: g_loss(D_l(fake_l))}``.

        Call it on the unwrapped module: the critics' parameters are frozen meanwhile, so the
        student's backward neither fills their ``.grad`` nor fires DDP hooks.
        """
        with frozen_parameters(self.discriminators):
            return {
                level: adversarial.g_loss(self.kind, disc(fake[level]).float())
                for level, disc in self.discriminators.items()
            }

    def _level_loss(self, disc: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with_penalty = self.kind == "wgan-gp"
        with_r1 = self.r1_weight > 0
        if with_r1:
            real = real.detach().requires_grad_(True)  # the R1 gradient is taken w.r.t. the critic's input
        groups = [real, fake, adversarial.interpolate(real.detach(), fake)] if with_penalty else [real, fake]
        scores = [s.float() for s in _score_groups(disc, groups)]
        loss = adversarial.d_loss(self.kind, scores[0], scores[1])
        terms = adversarial.diagnostics(self.kind, scores[0], scores[1])
        if with_penalty:
            penalty = adversarial.gradient_penalty(scores[2], groups[2])
            loss = loss + self.gp_weight * penalty
            terms["gp"] = penalty.detach()
        if with_r1:
            r1 = adversarial.r1_penalty(scores[0], real)
            loss = loss + self.r1_weight * r1
            terms["r1"] = r1.detach()
        return loss, terms


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter that has it, then restore."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _score_groups(disc: nn.Module, groups: Sequence[Tensor]) -> list[Tensor]:
    """Score several batches with one critic call when samples are independent, else one call each."""
    if getattr(disc, "mixes_batch", True):
        return [disc(group) for group in groups]
    scores = disc(torch.cat(list(groups)))
    return list(scores.split([group.shape[0] for group in groups]))
