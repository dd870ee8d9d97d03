"""torchvision's RetinaNet and FCOS, and SSD300-VGG16's level geometry, with the detector contract.

Each class takes a model a torchvision builder made (``retinanet_resnet50_fpn(weights=None, ...)``)
and re-creates its torchvision class around the same ``backbone``, ``head`` and ``anchor_generator``,
so the state dict keeps torchvision's layout (``backbone.body...``, ``head.classification_head...``) and
a torchvision checkpoint loads as it is. Only the transform changes: a fixed ``S x S`` resize
(``fixed_size``), the input training and ``predict_resized`` use, so ``forward`` (TorchScript, export)
and the training path see the same geometry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet

from gankd_ray.config import DetectorConfig
from gankd_ray.models.contract import LevelDetector, pair, to_original
from gankd_ray.models.detector import SSDDetector


class DenseDetector(LevelDetector):
    """Mixin for detectors whose head outputs are per-level, per-cell and flattened (RetinaNet, FCOS).

    ``head_losses`` returns ``det/<torchvision loss name>``: ``det/classification`` and
    ``det/bbox_regression``, plus ``det/bbox_ctrness`` for FCOS.
    """

    def _head_loss_terms(self, targets, head_outputs, anchors, levels) -> dict[str, Tensor]:
        cells = [level.shape[-2] * level.shape[-1] for level in levels]
        losses = self._torchvision_losses(targets, head_outputs, [anchors] * levels[0].shape[0], cells)
        return {f"det/{name}": value for name, value in losses.items()}

    def decode(self, head_outputs, anchors, image_size, orig_sizes) -> list[dict[str, Tensor]]:
        """Flat head outputs -> detections in original coordinates (torchvision's ``postprocess_detections``).

        The outputs and anchors are split per level as torchvision's ``forward`` does, from the level
        shapes at ``image_size`` (known without a forward pass).
        """
        size = pair(image_size)
        per_location = self.anchor_generator.num_anchors_per_location()
        counts = [
            -(-size[0] // stride) * -(-size[1] // stride) * anchors_here
            for stride, anchors_here in zip(self.level_strides.values(), per_location)
        ]
        batch = head_outputs["cls_logits"].shape[0]
        split_outputs = {name: list(value.split(counts, dim=1)) for name, value in head_outputs.items()}
        split_anchors = [list(anchors.split(counts))] * batch
        detections = self.postprocess_detections(split_outputs, split_anchors, [size] * batch)
        return to_original(detections, size, orig_sizes)


def fixed_size_transform_args(model: nn.Module, cfg: DetectorConfig) -> dict:
    """The transform arguments of a detector on a fixed ``S x S`` input, with the builder's normalisation."""
    size = cfg.image_size
    return dict(
        min_size=size,
        max_size=size,
        image_mean=list(model.transform.image_mean),
        image_std=list(model.transform.image_std),
        size_divisible=1,
        fixed_size=(size, size),
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )


def fpn_level_channels(model: nn.Module, level_strides: Mapping[str, int]) -> OrderedDict[str, int]:
    """Every FPN level has the FPN's ``out_channels``."""
    return OrderedDict((level, int(model.backbone.out_channels)) for level in level_strides)


class RetinaNetDetector(DenseDetector, RetinaNet):
    """torchvision's ``RetinaNet`` (focal loss, sigmoid classes) over named levels.

    Args:
        model: a ``RetinaNet`` from a torchvision builder (or one built on torchvision's backbone utilities).
        cfg: ``num_classes`` (foreground), ``image_size`` ``S`` and post-processing.
        level_strides: ``{level: stride}`` of the backbone's maps, in order.
    """

    __jit_ignored_attributes__ = ["config", "_anchor_cache"]

    def __init__(self, model: RetinaNet, cfg: DetectorConfig, level_strides: Mapping[str, int]) -> None:
        super().__init__(
            model.backbone,
            cfg.num_classes + 1,
            anchor_generator=model.anchor_generator,
            head=model.head,
            **fixed_size_transform_args(model, cfg),
        )
        self._init_levels(cfg, fpn_level_channels(model, level_strides), level_strides)

    def _torchvision_losses(self, targets, outputs, anchors, cells):
        return self.compute_loss(targets, outputs, anchors)


class FCOSDetector(DenseDetector, FCOS):
    """torchvision's ``FCOS`` (anchor-free, centre-ness) over named levels; arguments as :class:`RetinaNetDetector`."""

    __jit_ignored_attributes__ = ["config", "_anchor_cache"]

    def __init__(self, model: FCOS, cfg: DetectorConfig, level_strides: Mapping[str, int]) -> None:
        super().__init__(
            model.backbone,
            cfg.num_classes + 1,
            anchor_generator=model.anchor_generator,
            head=model.head,
            center_sampling_radius=model.center_sampling_radius,
            **fixed_size_transform_args(model, cfg),
        )
        self._init_levels(cfg, fpn_level_channels(model, level_strides), level_strides)

    def _torchvision_losses(self, targets, outputs, anchors, cells):
        return self.compute_loss(targets, outputs, anchors, cells)


def vgg300_shapes(image_size: int) -> list[tuple[int, int]]:
    """The six map sides of ssd300_vgg16 at ``S``: pools 1-2 floor, pool 3 ``ceil_mode``, pool 4 floor
    (conv4_3 -> fc7), two padded stride-2 extras (``ceil``), two unpadded 3x3 extras (``- 2`` each)."""
    conv4_3 = -(-(image_size // 2 // 2) // 2)
    fc7 = conv4_3 // 2
    extra1 = -(-fc7 // 2)
    extra2 = -(-extra1 // 2)
    sides = [conv4_3, fc7, extra1, extra2, extra2 - 2, extra2 - 4]
    return [(side, side) for side in sides]


class VGGSSDDetector(SSDDetector):
    """``SSDDetector`` over ssd300_vgg16's backbone, whose map sizes are not ``ceil(S / stride)``."""

    def feature_shapes(self, image_size: int | None = None) -> OrderedDict[str, tuple[int, int]]:
        size = self.image_size if image_size is None else image_size
        return OrderedDict(zip(self.level_names, vgg300_shapes(size)))
