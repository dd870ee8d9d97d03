"""GAN knowledge distillation: adapters, discriminators, adversarial losses and the training step.

Public API (see DESIGN.md, "GAN-KD"): :func:`build_step` -> :class:`TrainStep` (alias ``GanKD``),
:class:`Diverged`, :func:`build_adapters`, :func:`tap_activations`, :func:`build_discriminators`,
:mod:`adversarial`, :mod:`features` (what the distillation terms see),
:func:`export_student` / :func:`build_student` (a run's trained detector, and its
architecture from the config alone), the modules DDP wraps
(:class:`StudentModule`, :class:`DiscriminatorModule`) and :class:`FrozenTeacher`.
"""

from gankd_ray.distill import adversarial, features
from gankd_ray.distill.adapters import FeatureAdapter, build_adapters, tap_activations
from gankd_ray.distill.discriminators import LevelDiscriminator, build_discriminators
from gankd_ray.distill.modules import DiscriminatorModule, FrozenTeacher, StudentModule, frozen_parameters
from gankd_ray.distill.optim import WarmupCosine
from gankd_ray.distill.step import Diverged, GanKD, TrainStep, build_step, distilled_levels, export_student, identity
from gankd_ray.distill.teacher_head import AdaptedBackbone, build_student, student_with_teacher_head

__all__ = [
    "AdaptedBackbone",
    "DiscriminatorModule",
    "Diverged",
    "FeatureAdapter",
    "FrozenTeacher",
    "GanKD",
    "LevelDiscriminator",
    "StudentModule",
    "TrainStep",
    "WarmupCosine",
    "adversarial",
    "build_adapters",
    "build_discriminators",
    "build_step",
    "build_student",
    "distilled_levels",
    "export_student",
    "features",
    "frozen_parameters",
    "identity",
    "student_with_teacher_head",
    "tap_activations",
]
