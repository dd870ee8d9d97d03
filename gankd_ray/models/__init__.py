"""One-stage detectors: our SSD family over a backbone registry, and torchvision's SSD/RetinaNet/FCOS families.

Public API (see DESIGN.md, "Detectors"): :func:`available_backbones`, :func:`build_detector`,
:func:`available_archs`, :func:`level_strides_for`,
:class:`SSDDetector`, :func:`level_names_for`, :func:`feature_shapes`, :func:`register`.
"""

from gankd_ray.models.backbones import (
    LEVEL_NAMES,
    LEVEL_STRIDES,
    LevelFeatureExtractor,
    available_backbones,
    build_feature_extractor,
    feature_shapes,
    register,
)
from gankd_ray.models.detector import (
    ANCHOR_ASPECT_RATIOS,
    ANCHOR_SCALES,
    LOSS_NAMES,
    SSDDetector,
    default_anchor_generator,
    new_head,
)
from gankd_ray.models.families import (
    Family,
    available_archs,
    build_detector,
    check_detector_config,
    family_of,
    level_names_for,
    level_strides_for,
    register_family,
)

__all__ = [
    "ANCHOR_ASPECT_RATIOS",
    "ANCHOR_SCALES",
    "LEVEL_NAMES",
    "LEVEL_STRIDES",
    "LOSS_NAMES",
    "Family",
    "LevelFeatureExtractor",
    "SSDDetector",
    "available_archs",
    "available_backbones",
    "build_detector",
    "build_feature_extractor",
    "check_detector_config",
    "default_anchor_generator",
    "family_of",
    "feature_shapes",
    "level_names_for",
    "level_strides_for",
    "new_head",
    "register",
    "register_family",
]
