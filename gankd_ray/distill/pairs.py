"""Which teacher level each student level is distilled from: matched by stride, across families.

A student level of stride ``s`` takes the teacher level whose stride is nearest to ``s`` on a log scale,
provided it is within half an octave (a factor of sqrt 2): ssd300_vgg16's stride-100 level counts as
stride 128, its stride-300 level as 256, but nothing stands in for a stride-512 level. A student level
without such a teacher level is not distilled. Spatial sizes are aligned by the adapters
(interpolation) and channels by their 1x1 convs; an SSD-family pair has the same five strides, so each
level pairs with its namesake.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from gankd_ray.config import ConfigError

MAX_OCTAVES = 0.5  # how far (in log2 of the stride ratio) a teacher level may be and still count as "that stride"


def level_pairs(
    student_strides: Mapping[str, int], teacher_strides: Mapping[str, int], requested: Sequence[str] = ()
) -> OrderedDict[str, str]:
    """``{student level: teacher level}`` of the distilled levels, in student level order.

    Args:
        student_strides / teacher_strides: ``{level: stride}`` of the two detectors.
        requested: ``distill.levels`` (student level names); empty = every student level that has a match.

    Raises:
        ConfigError: a requested level is not a student level or has no teacher level of its stride,
            or no student level has one at all (no common stride).
    """
    unknown = [level for level in requested if level not in student_strides]
    if unknown:
        raise ConfigError(
            f"distill.levels: {', '.join(unknown)} not in both detectors "
            f"(student {list(student_strides)}, teacher {list(teacher_strides)})"
        )
    pairs: OrderedDict[str, str] = OrderedDict()
    for level in requested or list(student_strides):
        match = nearest_level(student_strides[level], teacher_strides)
        if match is not None:
            pairs[level] = match
        elif requested:
            raise ConfigError(
                f"distill.levels: {level} (stride {student_strides[level]}) has no teacher level of that stride "
                f"(teacher strides {_strides(teacher_strides)})"
            )
    if not pairs:
        raise ConfigError(
            f"teacher and student have no common stride (student {_strides(student_strides)}, "
            f"teacher {_strides(teacher_strides)}): nothing to distil"
        )
    return pairs


def nearest_level(stride: int, teacher_strides: Mapping[str, int]) -> str | None:
    """The teacher level of the stride nearest to ``stride`` (log scale), ``None`` beyond :data:`MAX_OCTAVES`."""
    distance = {level: abs(math.log2(other / stride)) for level, other in teacher_strides.items()}
    best = min(distance, key=distance.get)
    return best if distance[best] <= MAX_OCTAVES else None


def describe_pairs(
    pairs: Mapping[str, str], student_strides: Mapping[str, int], teacher_strides: Mapping[str, int]
) -> list[str]:
    """One line per student level: ``level0 (stride 8) <- teacher level0 (stride 8)`` or ``... not distilled``."""
    lines = []
    for level, stride in student_strides.items():
        if level in pairs:
            teacher = pairs[level]
            lines.append(f"{level} (stride {stride}) <- teacher {teacher} (stride {teacher_strides[teacher]})")
        else:
            lines.append(f"{level} (stride {stride}) not distilled")
    return lines


def _strides(strides: Mapping[str, int]) -> str:
    return "/".join(str(s) for s in strides.values())
