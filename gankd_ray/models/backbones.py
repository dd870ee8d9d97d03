"""Backbone registry and the multi-level feature extractor every detector shares.

Every backbone yields the same five levels, so any teacher/student pair aligns level by level:

=======  ======  ==========================================================
level    stride  source
=======  ======  ==========================================================
level0   8       backbone blocks up to the last one at stride 8
level1   16      backbone blocks up to the last one at stride 16
level2   32      the remaining backbone blocks (classifier head dropped)
level3   64      extra block: 1x1 conv -> 3x3 stride-2 conv (BN + ReLU each)
level4   128     extra block, same shape
=======  ======  ==========================================================

Every stride-2 step in these networks (3x3/5x5/7x7 convs with ``padding = k // 2``, 1x1 stride-2
shortcuts, ResNet's padded max-pool) maps ``n`` pixels to ``ceil(n / 2)``, so level ``k`` of an
``S x S`` input is ``ceil(S / stride_k)`` on every backbone (see :func:`feature_shapes`).

A backbone is registered timm-style: a factory returning the torchvision *classifier* (randomly
initialised; ImageNet weights are loaded into it from a local file before the taps are cut), a
function listing its top-level blocks in forward order, and the channels of the two extra blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torchvision
from torch import Tensor, nn

from gankd_ray.utils import Registry

LEVEL_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)
# Running-statistics momentum of every BatchNorm (torch's default). torchvision's MobileNetV3 uses 0.01,
# tuned for 600-epoch ImageNet runs: after a few hundred steps from scratch its running statistics
# still mix in the random-init network, and eval-mode detections are garbage (val AP50 0.000 where
# batch statistics give 0.05; see bench/calibrate.py).
BN_MOMENTUM = 0.1
LEVEL_NAMES: tuple[str, ...] = tuple(f"level{i}" for i in range(len(LEVEL_STRIDES)))
BACKBONE_STRIDES: tuple[int, ...] = LEVEL_STRIDES[:3]  # tapped from the classifier; the rest are extras


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone.

    Attributes:
        name: registry name.
        build_classifier: returns the torchvision classifier with random weights (never a hub download).
        blocks: lists the classifier's feature blocks in forward order (classifier head excluded).
        extra_channels: output channels of the two extra stride-2 blocks (levels 3 and 4).
    """

    name: str
    build_classifier: Callable[[], nn.Module]
    blocks: Callable[[nn.Module], list[nn.Module]]
    extra_channels: tuple[int, int]


_REGISTRY: Registry[BackboneSpec] = Registry("backbone")


def register(
    name: str, blocks: Callable[[nn.Module], list[nn.Module]], extra_channels: tuple[int, int]
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator registering a classifier factory under ``name`` (timm's ``register_model``)."""

    def decorate(build_classifier: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _REGISTRY.add(name, BackboneSpec(name, build_classifier, blocks, tuple(extra_channels)))
        return build_classifier

    return decorate


def available_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY.names())


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; ``KeyError`` names the choices."""
    return _REGISTRY.get(name)


# --------------------------------------------------------------------------------------------
# registered backbones


def _mobilenet_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


def _resnet_blocks(model: nn.Module) -> list[nn.Module]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return [getattr(model, name) for name in names]


# Extra-block channels follow the backbone's capacity: width-reduced students get thinner extras.
_MOBILENET_V2_VARIANTS = (
    ("mobilenet_v2", 1.0, (512, 256)),
    ("mobilenet_v2_0.5", 0.5, (256, 128)),
    ("mobilenet_v2_0.35", 0.35, (128, 64)),
)
for _name, _width, _extras in _MOBILENET_V2_VARIANTS:
    register(_name, _mobilenet_blocks, _extras)(partial(torchvision.models.mobilenet_v2, width_mult=_width))

register("mobilenet_v3_small", _mobilenet_blocks, (256, 128))(torchvision.models.mobilenet_v3_small)
register("mobilenet_v3_large", _mobilenet_blocks, (512, 256))(torchvision.models.mobilenet_v3_large)
register("resnet18", _resnet_blocks, (512, 256))(torchvision.models.resnet18)
register("resnet50", _resnet_blocks, (512, 256))(torchvision.models.resnet50)


# --------------------------------------------------------------------------------------------
# the feature extractor


class LevelFeatureExtractor(nn.Module):
    """Runs ``blocks`` in sequence and returns every block's output as one named level.

    Args:
        blocks: one module per level, each consuming the previous one's output.
        level_names: names of the levels, same length as ``blocks``.

    Shapes:
        ``forward(x: Tensor[B, 3, S, S] normalised) -> OrderedDict[level_names[k] -> Tensor[B, C_k,
        ceil(S / stride_k), ceil(S / stride_k)]]``.
    """

    def __init__(self, blocks: Sequence[nn.Module], level_names: Sequence[str]) -> None:
        super().__init__()
        if len(blocks) != len(level_names):
            raise ValueError(f"{len(blocks)} blocks for {len(level_names)} level names")
        self.blocks = nn.ModuleList(blocks)
        self.level_names = list(level_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        levels: dict[str, Tensor] = OrderedDict()
        for index, block in enumerate(self.blocks):
            x = block(x)
            levels[self.level_names[index]] = x
        return levels


def build_feature_extractor(
    name: str, weights: str | None = None
) -> tuple[LevelFeatureExtractor, OrderedDict[str, int], OrderedDict[str, int]]:
    """Build backbone ``name`` as a five-level feature extractor.

    Args:
        name: a registered backbone (see :func:`available_backbones`).
        weights: optional local torchvision-layout state dict for the classifier (ImageNet weights);
            loaded before the taps are cut, so the file's keys are the classifier's own.

    Returns:
        ``(extractor, level_channels, level_strides)``; the mappings are ordered ``level0..level4``.

    Raises:
        KeyError: unknown backbone.
        ConfigError: ``weights`` is missing, unreadable or does not match the classifier.
    """
    spec = backbone_spec(name)
    classifier = spec.build_classifier()
    if weights is not None:
        from gankd_ray.models.weights import load_classifier_weights

        load_classifier_weights(classifier, weights, name)
    stages = split_by_stride(spec.blocks(classifier), BACKBONE_STRIDES)
    channels = [out_channels(stage) for stage in stages]
    for out in spec.extra_channels:
        stages.append(extra_block(channels[-1], out))
        channels.append(out)
    extractor = LevelFeatureExtractor(stages, LEVEL_NAMES)
    set_bn_momentum(extractor, BN_MOMENTUM)
    return (
        extractor,
        OrderedDict(zip(LEVEL_NAMES, channels)),
        OrderedDict(zip(LEVEL_NAMES, LEVEL_STRIDES)),
    )


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Give every BatchNorm in ``module`` the same running-statistics ``momentum`` (see ``BN_MOMENTUM``)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


def extra_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """SSD's extra layer: 1x1 bottleneck to ``out/2`` then a 3x3 stride-2 conv (``ceil(n/2)`` pixels)."""
    middle = max(out_channels // 2, 16)
    block = nn.Sequential(
        nn.Conv2d(in_channels, middle, kernel_size=1, bias=False),
        nn.BatchNorm2d(middle),
        nn.ReLU(inplace=True),
        nn.Conv2d(middle, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
    for layer in block.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return block


def feature_shapes(
    image_size: int, level_strides: Mapping[str, int] | None = None
) -> OrderedDict[str, tuple[int, int]]:
    """``{level: (h, w)}`` of the feature maps for an ``image_size`` square input, on any backbone.

    Each stride-2 step maps ``n`` to ``ceil(n / 2)``, so a level of stride ``s`` is ``ceil(S / s)``.
    """
    strides = level_strides if level_strides is not None else dict(zip(LEVEL_NAMES, LEVEL_STRIDES))
    return OrderedDict((name, (-(-image_size // s),) * 2) for name, s in strides.items())


# --------------------------------------------------------------------------------------------
# helpers


def block_stride(block: nn.Module) -> int:
    """The downsampling factor of one block: its largest conv/pool stride.

    A block of these networks downsamples at most once; a ResNet stage's 1x1 shortcut runs in
    parallel with its strided 3x3, so taking the max (not the product) is right.
    """
    stride = 1
    for layer in block.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            value = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
            stride = max(stride, int(value))
    return stride


def split_by_stride(blocks: Sequence[nn.Module], strides: Sequence[int]) -> list[nn.Sequential]:
    """Group ``blocks`` into one stage per target stride.

    Stage ``k`` holds every block whose output stride is in ``(strides[k-1], strides[k]]``, so it
    ends with the last (deepest) block at ``strides[k]``.

    Raises:
        ValueError: the blocks do not reach exactly ``strides[-1]`` or skip a target stride.
    """
    stages: list[list[nn.Module]] = [[] for _ in strides]
    current = 1
    for block in blocks:
        current *= block_stride(block)
        stage = next((k for k, target in enumerate(strides) if current <= target), None)
        if stage is None:
            raise ValueError(f"backbone reaches stride {current}, beyond {strides[-1]}")
        stages[stage].append(block)
    if current != strides[-1] or any(not stage for stage in stages):
        raise ValueError(f"backbone blocks do not cover strides {list(strides)} (final stride {current})")
    return [nn.Sequential(*stage) for stage in stages]


def out_channels(stage: nn.Module) -> int:
    """Output channels of a stage: its last conv's (blocks end in a conv + norm in every backbone here)."""
    convs = [layer for layer in stage.modules() if isinstance(layer, nn.Conv2d)]
    if not convs:
        raise ValueError("stage has no convolution")
    return convs[-1].out_channels
