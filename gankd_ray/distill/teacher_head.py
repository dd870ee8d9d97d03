"""The paper's head mode: the student's levels, adapted to the teacher's, feed (a copy of) the teacher's head.

The resulting :class:`~gankd_ray.models.SSDDetector` is both what trains in ``teacher`` head mode and
what is exported: ``student backbone -> adapters -> teacher head``, with the teacher's anchors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from gankd_ray.config import SSD_ARCH, ConfigError, RunConfig
from gankd_ray.distill.adapters import build_adapters, tap_activations

if TYPE_CHECKING:
    from gankd_ray.models import SSDDetector


class AdaptedBackbone(nn.Module):
    """A feature extractor followed by one adapter per level (TorchScript-compatible).

    Args:
        extractor: ``Tensor[B, 3, S, S] -> {level: Tensor[B, C_s, h, w]}`` (the student's backbone).
        adapters: ``nn.ModuleDict`` level -> adapter, one per extractor level, in level order.

    Shapes:
        ``forward(x) -> OrderedDict[level -> Tensor[B, C_teacher, h_teacher, w_teacher]]``.
    """

    def __init__(self, extractor: nn.Module, adapters: nn.ModuleDict) -> None:
        super().__init__()
        self.extractor = extractor
        self.adapters = adapters

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.extractor(x)
        adapted: dict[str, Tensor] = OrderedDict()
        for level, adapter in self.adapters.items():
            adapted[level] = adapter(features[level])
        return adapted


def student_with_teacher_head(
    student: SSDDetector,
    teacher: SSDDetector,
    finetune_head: bool,
    teacher_image_size: int | None = None,
    match_activation: bool = True,
) -> SSDDetector:
    """``student backbone -> adapters (every level) -> copy of teacher head``, as one detector.

    Args:
        student: its backbone is shared (not copied); its own head is left out.
        teacher: its head and anchor generator are deep-copied; the teacher itself is untouched.
        finetune_head: train the copied head; otherwise its parameters are frozen.
        teacher_image_size: the teacher's input side ``S_t``; adapters resize each level to the
            teacher's map size at ``S_t`` (default: the student's ``S``, i.e. no resize).
        match_activation: adapters end in the teacher taps' activations (``distill.match_activation``),
            so the head gets inputs of the kind it was trained on.

    Returns:
        An ``SSDDetector`` with the student's config (input size, post-processing) and the
        teacher's level channels, head and anchors.

    Raises:
        ConfigError: the two detectors do not have the same levels or classes.
    """
    _check_head_compatible(student, teacher)
    teacher_sizes = teacher.feature_shapes(teacher_image_size or student.image_size)
    head = copy.deepcopy(teacher.head).requires_grad_(finetune_head)
    anchors = copy.deepcopy(teacher.anchor_generator)
    activations = tap_activations(teacher.backbone) if match_activation else None
    return _adapted_detector(student, teacher.level_channels, teacher_sizes, head, anchors, activations)


def build_student(cfg: RunConfig) -> SSDDetector:
    """The architecture of the detector a run trains and exports, from its config alone (fresh weights).

    ``own`` head mode (and plain roles): ``build_detector(cfg.detector)``. ``teacher`` head mode
    (role ``gankd``): the layout of :func:`student_with_teacher_head` with a fresh head of the
    teacher's channels, so an exported student's state dict loads into it. Weights files are not
    read: the caller loads a checkpoint over it.
    """
    from gankd_ray.models import build_detector, build_feature_extractor, feature_shapes

    student_cfg = dataclasses.replace(cfg.detector, weights=None)
    student = build_detector(student_cfg)
    if cfg.role != "gankd" or cfg.distill.head_mode != "teacher":
        return student
    if cfg.teacher is None:
        raise ConfigError("distill.head_mode=teacher needs cfg.teacher to rebuild the student")
    check_teacher_head_archs(cfg.detector.arch, cfg.teacher.arch)
    teacher_extractor, teacher_channels, teacher_strides = build_feature_extractor(cfg.teacher.backbone)
    if list(teacher_channels) != list(student.level_names):
        raise ConfigError(
            f"distill.head_mode=teacher: teacher levels {list(teacher_channels)} differ from the student's"
        )
    teacher_sizes = feature_shapes(cfg.teacher.image_size, teacher_strides)
    # head=None: SSDDetector builds a fresh SSDHead for the teacher's channels; the anchors are the
    # shared default layout, as on the teacher.
    activations = tap_activations(teacher_extractor) if cfg.distill.match_activation else None
    return _adapted_detector(student, teacher_channels, teacher_sizes, None, None, activations)


def _adapted_detector(
    student: SSDDetector,
    teacher_channels: Mapping[str, int],
    teacher_sizes: Mapping[str, Sequence[int]],
    head: nn.Module | None,
    anchor_generator: nn.Module | None,
    activations: Mapping[str, nn.Module] | None,
) -> SSDDetector:
    from gankd_ray.models import SSDDetector  # late: models is a sibling package

    adapters = build_adapters(student.level_names, student.level_channels, teacher_channels, teacher_sizes, activations)
    backbone = AdaptedBackbone(student.backbone, adapters)
    return SSDDetector(backbone, teacher_channels, student.level_strides, head, student.config, anchor_generator)


def _check_head_compatible(student: SSDDetector, teacher: SSDDetector) -> None:
    check_teacher_head_archs(student.config.arch, teacher.config.arch)
    if list(student.level_names) != list(teacher.level_names):
        raise ConfigError(
            f"distill.head_mode=teacher needs the same levels on both sides "
            f"(student {student.level_names}, teacher {teacher.level_names})"
        )
    if student.config.num_classes != teacher.config.num_classes:
        raise ConfigError(
            f"distill.head_mode=teacher: student has {student.config.num_classes} classes, "
            f"teacher {teacher.config.num_classes}"
        )


def check_teacher_head_archs(student_arch: str, teacher_arch: str) -> None:
    """The teacher head mode shares one anchor layout and level set: the SSD family on both sides only."""
    if student_arch != SSD_ARCH or teacher_arch != SSD_ARCH:
        raise ConfigError(
            f"distill.head_mode=teacher needs detector.arch={SSD_ARCH} for teacher and student "
            f"(student {student_arch}, teacher {teacher_arch}); use distill.head_mode=own across families"
        )
