"""Adapters ("connectors"): map a student level onto the teacher's channels and spatial size.

No ``from __future__ import annotations`` here: TorchScript must read the class annotation eagerly.
"""

from collections.abc import Mapping, Sequence
from typing import List, Optional

import torch.nn.functional as F
from torch import Tensor, nn


class FeatureAdapter(nn.Module):
    """``Conv1x1(student -> teacher channels) -> BatchNorm`` then, if sizes differ, a bilinear resize.

    The 1x1 conv runs at the student's resolution (before the resize) because it is cheaper there
    and a 1x1 conv commutes with bilinear interpolation anyway.

    Args:
        in_channels: the student level's channels.
        out_channels: the teacher level's channels.
        output_size: the teacher level's ``[h, w]``; ``None`` keeps the student's size.

    Shapes:
        ``forward(x: Tensor[B, in_channels, H, W]) -> Tensor[B, out_channels, h, w]``.
    """

    output_size: Optional[List[int]]

    def __init__(self, in_channels: int, out_channels: int, output_size: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.output_size = [int(s) for s in output_size] if output_size is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        size = self.output_size
        if size is not None and (x.shape[-2] != size[0] or x.shape[-1] != size[1]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def build_adapters(
    levels: Sequence[str],
    student_channels: Mapping[str, int],
    teacher_channels: Mapping[str, int],
    output_sizes: Optional[Mapping[str, Sequence[int]]] = None,
) -> nn.ModuleDict:
    """One :class:`FeatureAdapter` per level, keyed by level name.

    Args:
        levels: level names present on both sides.
        student_channels / teacher_channels: ``level_channels`` of the two detectors.
        output_sizes: the teacher's ``[h, w]`` per level (``SSDDetector.feature_shapes``); ``None``
            or a missing level means no resize.
    """
    sizes = output_sizes or {}
    return nn.ModuleDict(
        {
            level: FeatureAdapter(student_channels[level], teacher_channels[level], sizes.get(level))
            for level in levels
        }
    )
