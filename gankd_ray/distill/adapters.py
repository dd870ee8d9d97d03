"""Adapters ("connectors"): map a student level onto the teacher's channels, spatial size and kind.

No ``from __future__ import annotations`` here: TorchScript must read the class annotation eagerly.
"""

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

# Activations given as functions rather than modules at the end of a stage, as their module form.
_FUNCTIONAL_ACTIVATIONS = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    F.relu6: nn.ReLU6,
    F.hardswish: nn.Hardswish,
    F.silu: nn.SiLU,
}


class FeatureAdapter(nn.Module):
    """``Conv1x1(student -> teacher channels) -> BatchNorm -> activation`` then, if sizes differ, a bilinear resize.

    The activation is the teacher tap's own (see :func:`tap_activations`): a map taken after a ReLU is
    non-negative, so the adapted student map must be too, or a critic separates the two by sign alone
    and a teacher head receives inputs of a kind it never saw. ``nn.Identity`` for a linear tap.

    The 1x1 conv runs at the student's resolution (before the resize) because it is cheaper there
    and a 1x1 conv commutes with bilinear interpolation anyway; the resize comes after the
    activation, and interpolation keeps a map inside the activation's range (non-negative, <= 6).

    Args:
        in_channels: the student level's channels.
        out_channels: the teacher level's channels.
        output_size: the teacher level's ``[h, w]``; ``None`` keeps the student's size.
        activation: applied after the norm (stateless; ``None`` = identity).

    Shapes:
        ``forward(x: Tensor[B, in_channels, H, W]) -> Tensor[B, out_channels, h, w]``.
    """

    output_size: list[int] | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        output_size: Sequence[int] | None = None,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = activation if activation is not None else nn.Identity()
        self.output_size = [int(s) for s in output_size] if output_size is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation(self.norm(self.conv(x)))
        size = self.output_size
        if size is not None and (x.shape[-2] != size[0] or x.shape[-1] != size[1]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def build_adapters(
    levels: Sequence[str],
    student_channels: Mapping[str, int],
    teacher_channels: Mapping[str, int],
    output_sizes: Mapping[str, Sequence[int]] | None = None,
    activations: Mapping[str, nn.Module] | None = None,
) -> nn.ModuleDict:
    """One :class:`FeatureAdapter` per level, keyed by level name.

    Args:
        levels: level names present on both sides.
        student_channels / teacher_channels: ``level_channels`` of the two detectors.
        output_sizes: the teacher's ``[h, w]`` per level (``SSDDetector.feature_shapes``); ``None``
            or a missing level means no resize.
        activations: the teacher taps' activations (:func:`tap_activations`); ``None`` or a missing
            level means a linear adapter. Each adapter gets its own copy.
    """
    sizes = output_sizes or {}
    kinds = activations or {}
    return nn.ModuleDict(
        {
            level: FeatureAdapter(
                student_channels[level],
                teacher_channels[level],
                sizes.get(level),
                copy.deepcopy(kinds[level]) if level in kinds else None,
            )
            for level in levels
        }
    )


def tap_activations(backbone: nn.Module) -> dict[str, nn.Module]:
    """``{level: the activation that produces the level's map}`` (``nn.Identity`` for a linear tap).

    Read from the backbone's code, not from a table per level: each stage of a
    ``LevelFeatureExtractor`` is traced with ``torch.fx`` and its output node inspected. A residual
    add after the last norm (MobileNet's linear bottlenecks) is linear; a ReLU after the add
    (ResNet's blocks) or a final ``Conv-BN-ReLU6`` is that activation. An ``AdaptedBackbone`` (a
    teacher-head student used as a teacher) reports its adapters' activations.

    Raises:
        ValueError: the backbone has neither ``blocks``/``level_names`` nor ``adapters``.
    """
    adapters = getattr(backbone, "adapters", None)
    if isinstance(adapters, nn.ModuleDict):
        return {level: copy.deepcopy(adapter.activation) for level, adapter in adapters.items()}
    blocks, names = getattr(backbone, "blocks", None), getattr(backbone, "level_names", None)
    if blocks is None or names is None:
        raise ValueError(f"cannot tell the tap activations of a {type(backbone).__name__}")
    return {level: stage_output_activation(stage) for level, stage in zip(names, blocks)}


def stage_output_activation(stage: nn.Module) -> nn.Module:
    """A fresh, non-inplace copy of the activation ``stage`` ends in; ``nn.Identity`` if it ends linear."""
    graph = torch.fx.symbolic_trace(stage).graph
    (output,) = [node for node in graph.nodes if node.op == "output"]
    last = output.args[0]
    if not isinstance(last, torch.fx.Node):
        return nn.Identity()
    if last.op == "call_module":
        module = stage.get_submodule(str(last.target))
        if type(module).__module__ == nn.modules.activation.__name__:
            activation = copy.deepcopy(module)
            if hasattr(activation, "inplace"):
                activation.inplace = False  # the norm's output is not to be overwritten in a graph
            return activation
        return nn.Identity()
    if last.op == "call_function" and last.target in _FUNCTIONAL_ACTIVATIONS:
        return _FUNCTIONAL_ACTIVATIONS[last.target]()
    if last.op == "call_method" and last.target in ("relu", "relu_"):
        return nn.ReLU()
    return nn.Identity()  # a norm, a residual add, a pool: linear
