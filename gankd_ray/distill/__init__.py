"""GAN knowledge distillation: adapters, discriminators, adversarial losses and the training step.

Public API (see DESIGN.md, "GAN-KD"): :func:`build_step` -> :class:`TrainStep` (alias ``GanKD``),
:class:`Diverged`, :func:`build_adapters`, :func:`tap_activations`, :func:`build_discriminators`,
:mod:`adversarial`, :mod:`features` (what the distillation terms see),
:func:`export_student` / :func:`build_student` (a run's trained detector, and its
architecture from the config alone), the modules DDP wraps
(:class:`StudentModule`, :class:`DiscriminatorModule`) and :class:`FrozenTeacher`.
"""

import importlib

# The names above, each with the submodule that defines it. They load on first use (PEP 562), so that
# torch-free submodules (``health``, ``pairs``) can be imported where torch is not: a search's trial drivers and
# Train controllers never touch a tensor, and importing torch there costs seconds of every trial's start-up.
_SUBMODULE_OF = {
    "AdaptedBackbone": "teacher_head",
    "DiscriminatorModule": "modules",
    "Diverged": "step",
    "FeatureAdapter": "adapters",
    "FrozenTeacher": "modules",
    "GanKD": "step",
    "LevelDiscriminator": "discriminators",
    "StudentModule": "modules",
    "TrainStep": "step",
    "WarmupCosine": "optim",
    "adversarial": None,
    "build_adapters": "adapters",
    "build_discriminators": "discriminators",
    "build_step": "step",
    "build_student": "teacher_head",
    "distilled_levels": "step",
    "export_student": "step",
    "features": None,
    "frozen_parameters": "modules",
    "identity": "step",
    "student_with_teacher_head": "teacher_head",
    "tap_activations": "adapters",
}


def __getattr__(name: str):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    submodule = importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name] or name}")
    value = submodule if _SUBMODULE_OF[name] is None else getattr(submodule, name)
    globals()[name] = value
    return value


__all__ = list(_SUBMODULE_OF)
