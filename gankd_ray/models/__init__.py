"""SSD-family detectors on torchvision's SSD machinery, with a small backbone registry.

Public API (see DESIGN.md, "Detectors"): :func:`available_backbones`, :func:`build_detector`,
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
    build_detector,
    check_detector_config,
    default_anchor_generator,
    level_names_for,
    new_head,
)

__all__ = [
    "ANCHOR_ASPECT_RATIOS",
    "ANCHOR_SCALES",
    "LEVEL_NAMES",
    "LEVEL_STRIDES",
    "LOSS_NAMES",
    "LevelFeatureExtractor",
    "SSDDetector",
    "available_backbones",
    "build_detector",
    "build_feature_extractor",
    "check_detector_config",
    "default_anchor_generator",
    "feature_shapes",
    "level_names_for",
    "new_head",
    "register",
]
