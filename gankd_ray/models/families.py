"""Detector families, spelled ``detector.arch=<name>``: our SSD (the default) and torchvision's one-stage builders.

=================================  ===================  ==========================  ==================
arch                               levels (strides)     built by                    detection weights
=================================  ===================  ==========================  ==================
``ssd``                            5 (8..128)           registered ``backbone``     no (ImageNet file)
``ssd300_vgg16``                   6 (8..~S)            torchvision builder         COCO_V1
``ssdlite320_mobilenet_v3_large``  6 (16..512)          torchvision builder         COCO_V1
``retinanet_resnet50_fpn[_v2]``    5 (8..128)           torchvision builder         COCO_V1
``fcos_resnet50_fpn``              5 (8..128)           torchvision builder         COCO_V1
``{retinanet,fcos}_resnet18_fpn``  5 (8..128)           ``_resnet_fpn_extractor``   no (file only)
``{retinanet,fcos}_mobilenet_v3_   5 (8..128)           ``_mobilenet_extractor``    no (file only)
large_fpn``
=================================  ===================  ==========================  ==================

Levels are named ``level0..`` in stride order on every family; which teacher level a student level
is distilled from is decided by stride (:func:`gankd_ray.distill.pairs.level_pairs`). Every family's
strides and channels are known from its config without building it (:func:`level_strides_for`).
torchvision's families are built with ``weights=None, weights_backbone=None`` (never a download) and
their own heads and anchors; ``detector.weights`` then loads a whole-detector state dict over them
(:mod:`gankd_ray.models.detection_weights`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn
from torchvision.models.detection import fcos, retinanet, ssd, ssdlite
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from gankd_ray.config import SSD_ARCH, ConfigError, DetectorConfig
from gankd_ray.models.backbones import BN_MOMENTUM, LEVEL_NAMES, LEVEL_STRIDES, available_backbones, set_bn_momentum
from gankd_ray.models.dense import FCOSDetector, RetinaNetDetector, VGGSSDDetector, vgg300_shapes
from gankd_ray.models.detector import SSDDetector, build_ssd_detector
from gankd_ray.utils import Registry, short_repr

FPN_STRIDES = LEVEL_STRIDES  # P3..P7
SSDLITE_STRIDES = (16, 32, 64, 128, 256, 512)  # C4, C5 and four padded stride-2 extras


@dataclass(frozen=True)
class Family:
    """One ``detector.arch``.

    Attributes:
        name: the arch name (torchvision's builder name where there is one).
        build_model: ``cfg -> torchvision model`` (random init, ``cfg.num_classes + 1`` classes), whose
            state dict is the layout ``detector.weights`` files have. ``None`` for ``ssd``.
        wrap: ``(model, cfg) -> detector`` with the contract, sharing the model's modules.
        strides: ``image_size -> (stride per level)``, no model built.
        torchvision_weights: builder whose weight enum ``COCO_V1`` / ``DEFAULT`` resolve; ``None``: none.
        min_image_size: the smallest input whose every level is at least 1x1.
    """

    name: str
    build_model: Callable[[DetectorConfig], nn.Module] | None
    wrap: Callable[[nn.Module, DetectorConfig], nn.Module] | None
    strides: Callable[[int], tuple[int, ...]]
    torchvision_weights: str | None = None
    min_image_size: int = 64


_FAMILIES: Registry[Family] = Registry("detector.arch")


def register_family(family: Family) -> Family:
    return _FAMILIES.add(family.name, family)


def available_archs() -> list[str]:
    """Registered ``detector.arch`` names, in registration order (``ssd`` first)."""
    return _FAMILIES.names()


def family_of(arch: str) -> Family:
    """The family of ``arch``; ``ConfigError`` naming the choices when unknown."""
    if arch not in _FAMILIES.names():
        choices = ", ".join(available_archs())
        raise ConfigError(f"detector.arch={short_repr(arch)}: unknown arch; choose one of {choices}")
    return _FAMILIES.get(arch)


# --------------------------------------------------------------------------------------------
# the public entry points


def check_detector_config(cfg: DetectorConfig, where: str = "detector") -> None:
    """``cfg.validate`` plus what only the models know: the arch (and, for ``ssd``, the backbone) is registered
    and the input is large enough for every level of the family."""
    cfg.validate(where)
    family = _family_under(cfg.arch, where)
    if cfg.arch == SSD_ARCH and cfg.backbone not in available_backbones():
        raise ConfigError(
            f"{where}.backbone={short_repr(cfg.backbone)}: unknown backbone; "
            f"choose one of {', '.join(available_backbones())}"
        )
    if cfg.image_size < family.min_image_size:
        raise ConfigError(
            f"{where}.image_size={cfg.image_size}: {cfg.arch} needs at least {family.min_image_size} "
            "(its smallest level would be empty)"
        )


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """A fresh detector of ``cfg.arch`` with ``cfg.weights`` loaded (ImageNet backbone for ``ssd``, a whole
    detector otherwise).

    Raises:
        ConfigError: invalid config, ``num_classes`` still 0 (resolve it from the dataset first), or a
            weights file that does not match the arch.
    """
    check_detector_config(cfg)
    if cfg.num_classes < 1:
        raise ConfigError("detector.num_classes=0: set it (or take it from the dataset) before building")
    if cfg.arch == SSD_ARCH:
        return build_ssd_detector(cfg)
    family = family_of(cfg.arch)
    model = family.build_model(cfg)
    if cfg.weights is not None:
        from gankd_ray.models.detection_weights import load_detection_weights

        load_detection_weights(model, cfg.weights, family)
    return family.wrap(model, cfg)


def level_strides_for(cfg: DetectorConfig, where: str = "detector") -> OrderedDict[str, int]:
    """``{level: stride}`` of a detector built from ``cfg``, without building it."""
    check_detector_config(cfg, where)
    strides = family_of(cfg.arch).strides(cfg.image_size)
    return OrderedDict((f"level{index}", stride) for index, stride in enumerate(strides))


def level_names_for(cfg: DetectorConfig) -> list[str]:
    """The level names a detector built from ``cfg`` exposes."""
    return list(level_strides_for(cfg))


def _family_under(arch: str, where: str) -> Family:
    try:
        return family_of(arch)
    except ConfigError as err:
        raise ConfigError(str(err).replace("detector.arch", f"{where}.arch", 1)) from None


# --------------------------------------------------------------------------------------------
# builders


def _torchvision_builder(builder: Callable[..., nn.Module], **extra) -> Callable[[DetectorConfig], nn.Module]:
    """``cfg -> builder(weights=None, weights_backbone=None, num_classes=K + 1)``: random init, never a download."""

    def build(cfg: DetectorConfig) -> nn.Module:
        return builder(weights=None, weights_backbone=None, num_classes=cfg.num_classes + 1, **extra)

    return build


def _resnet18_fpn() -> nn.Module:
    """ResNet18 C3-C5 -> FPN (256 channels) -> P6/P7 from P5, all layers trainable (RetinaNet-v2's layout)."""
    backbone = torchvision.models.resnet18(weights=None)
    return _resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


def _mobilenet_v3_fpn() -> nn.Module:
    """MobileNetV3-Large stages at strides 8/16/32 -> FPN (256 channels) -> P6/P7, all layers trainable.

    BatchNorm momentum 0.1 (torchvision's MobileNetV3 uses 0.01, see ``backbones.BN_MOMENTUM``).
    """
    backbone = torchvision.models.mobilenet_v3_large(weights=None)
    fpn = _mobilenet_extractor(backbone, True, 6, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    set_bn_momentum(fpn, BN_MOMENTUM)
    return fpn


def _light_builder(detector_class: type, backbone: Callable[[], nn.Module]) -> Callable[[DetectorConfig], nn.Module]:
    """A torchvision ``RetinaNet`` / ``FCOS`` with its default head and anchors over a light FPN backbone."""

    def build(cfg: DetectorConfig) -> nn.Module:
        return detector_class(backbone(), cfg.num_classes + 1)

    return build


def _wrap_fpn(detector_class: type) -> Callable[[nn.Module, DetectorConfig], nn.Module]:
    return lambda model, cfg: detector_class(model, cfg, _named(FPN_STRIDES))


def _wrap_ssd(detector_class: type, strides: Callable[[int], tuple[int, ...]]):
    def wrap(model: ssd.SSD, cfg: DetectorConfig) -> SSDDetector:
        channels = [_first_conv(block).in_channels for block in model.head.classification_head.module_list]
        level_strides = _named(strides(cfg.image_size))
        return detector_class(
            model.backbone,
            OrderedDict(zip(level_strides, channels)),
            level_strides,
            model.head,
            cfg,
            model.anchor_generator,
            model.transform.image_mean,
            model.transform.image_std,
        )

    return wrap


def _vgg_strides(image_size: int) -> tuple[int, ...]:
    """ssd300_vgg16's strides at ``S``: ``S`` over each map side, rounded (8, 16, 30, 60, 100, 300 at 300)."""
    return tuple(max(1, round(image_size / side)) for side, _ in vgg300_shapes(image_size))


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(layer for layer in module.modules() if isinstance(layer, nn.Conv2d))


def _named(strides: tuple[int, ...]) -> OrderedDict[str, int]:
    return OrderedDict((f"level{index}", stride) for index, stride in enumerate(strides))


_VGG_MIN_SIZE = next(size for size in range(64, 1025) if min(side for side, _ in vgg300_shapes(size)) >= 1)

register_family(Family(SSD_ARCH, None, None, lambda size: LEVEL_STRIDES, min_image_size=160))
register_family(
    Family(
        "ssd300_vgg16",
        _torchvision_builder(ssd.ssd300_vgg16),
        _wrap_ssd(VGGSSDDetector, _vgg_strides),
        _vgg_strides,
        torchvision_weights="ssd300_vgg16",
        min_image_size=_VGG_MIN_SIZE,
    )
)
register_family(
    Family(
        "ssdlite320_mobilenet_v3_large",
        _torchvision_builder(ssdlite.ssdlite320_mobilenet_v3_large),
        _wrap_ssd(SSDDetector, lambda size: SSDLITE_STRIDES),
        lambda size: SSDLITE_STRIDES,
        torchvision_weights="ssdlite320_mobilenet_v3_large",
    )
)
for _name, _builder in (
    ("retinanet_resnet50_fpn", retinanet.retinanet_resnet50_fpn),
    ("retinanet_resnet50_fpn_v2", retinanet.retinanet_resnet50_fpn_v2),
):
    register_family(
        Family(_name, _torchvision_builder(_builder), _wrap_fpn(RetinaNetDetector), lambda size: FPN_STRIDES, _name)
    )
register_family(
    Family(
        "fcos_resnet50_fpn",
        _torchvision_builder(fcos.fcos_resnet50_fpn),
        _wrap_fpn(FCOSDetector),
        lambda size: FPN_STRIDES,
        "fcos_resnet50_fpn",
    )
)
for _head, _torchvision_class, _detector_class in (
    ("retinanet", retinanet.RetinaNet, RetinaNetDetector),
    ("fcos", fcos.FCOS, FCOSDetector),
):
    for _backbone_name, _backbone in (("resnet18", _resnet18_fpn), ("mobilenet_v3_large", _mobilenet_v3_fpn)):
        register_family(
            Family(
                f"{_head}_{_backbone_name}_fpn",
                _light_builder(_torchvision_class, _backbone),
                _wrap_fpn(_detector_class),
                lambda size: FPN_STRIDES,
            )
        )

__all__ = [
    "LEVEL_NAMES",
    "Family",
    "available_archs",
    "build_detector",
    "check_detector_config",
    "family_of",
    "level_names_for",
    "level_strides_for",
    "register_family",
]
