"""``SSDDetector``: torchvision's SSD plus the hooks GAN-KD needs (levels, head swap, S-space training).

Training never goes through torchvision's transform: the data loader already resized images to
``S x S`` in ``[0, 1]``, so a step is ``normalize -> extract -> head_losses``. Export and evaluation
use torchvision's ``forward`` (resize to ``S x S``, the same mean/std, detections mapped back to the
original image), which is why :meth:`SSDDetector.normalize` reuses the transform's own mean/std.

Anchors (one ``DefaultBoxGenerator`` for every backbone, sizes relative to the input side ``S``):

=======  ======  ===========  ============================  ==========================
level    stride  scale s_k    extra square sqrt(s_k s_k+1)  aspect ratios (besides 1)
=======  ======  ===========  ============================  ==========================
level0   8       0.07         0.10                          2, 1/2
level1   16      0.15         0.22                          2, 1/2, 3, 1/3
level2   32      0.33         0.41                          2, 1/2, 3, 1/3
level3   64      0.51         0.59                          2, 1/2, 3, 1/3
level4   128     0.69         0.77                          2, 1/2
=======  ======  ===========  ============================  ==========================

Why: the synthetic objects are 14-70 px at S = 160 in its hard mix (0.09-0.44 of the side; 32-72 px
by default), NEON tree crowns about 0.07-0.10. The stride-8 level's squares (11 and 16 px at 160) sit at
1.4-2 cells, small enough for the smallest objects yet matched by IoU >= 0.5 to 14-20 px boxes; each coarser
level roughly doubles the scale, following SSD300's 0.07/0.15/0.33/0.51/0.69/0.87 progression. Only four
anchors per cell on level0 (the largest grid) keep the anchor count and head cost low: 2420 anchors at S = 160. Anchor
centres are spread evenly over the image (``steps=None``), because with ``ceil`` padding the coarse
grids (3x3 and 2x2 at S = 160) would otherwise put centres outside the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import boxes as box_ops

from gankd_ray.config import DetectorConfig
from gankd_ray.models.backbones import build_feature_extractor
from gankd_ray.models.contract import LevelDetector, pair, to_original

ANCHOR_SCALES: tuple[float, ...] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87)
ANCHOR_ASPECT_RATIOS: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,))
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

LOSS_NAMES = ("det/classification", "det/bbox_regression")  # the keys head_losses returns


def default_anchor_generator() -> DefaultBoxGenerator:
    """The anchor layout of every detector here (see the module docstring for the reasoning)."""
    return DefaultBoxGenerator([list(r) for r in ANCHOR_ASPECT_RATIOS], scales=list(ANCHOR_SCALES), steps=None)


def new_head(in_channels: list[int], num_anchors: list[int], num_classes: int) -> SSDHead:
    """torchvision's ``SSDHead`` (one 3x3 conv per level for classes, one for boxes), re-initialised.

    Xavier init (torchvision's) on 1280-2048 channel, non-negative inputs gives logits of std 2-3,
    i.e. confident random predictions and a first loss about 4x the uniform-prior value; N(0, 0.01)
    weights and zero biases start every anchor near the uniform prior instead (as SSDLite/RetinaNet do).
    """
    head = SSDHead(in_channels, num_anchors, num_classes)
    for layer in head.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return head


def build_ssd_detector(cfg: DetectorConfig) -> SSDDetector:
    """The ``ssd`` family: registered backbone (optionally with ImageNet weights) + extras + a fresh SSDHead.

    ``cfg`` is checked by :func:`gankd_ray.models.build_detector`, the one entry point.
    """
    extractor, channels, strides = build_feature_extractor(cfg.backbone, cfg.weights)
    return SSDDetector(extractor, channels, strides, None, cfg)


class SSDDetector(LevelDetector, SSD):
    """A torchvision ``SSD`` over named feature levels, whose head can be swapped per call.

    Args:
        feature_extractor: ``Tensor[B, 3, S, S] (normalised) -> OrderedDict[level -> Tensor[B, C, h, w]]``
            with the keys of ``level_channels`` in order (e.g. a student backbone followed by adapters).
        level_channels: ``{level: channels}`` of the extractor's outputs, in level order.
        level_strides: ``{level: stride}``; the input side over the level's side, rounded up.
        head: module mapping the list of level tensors to ``{"bbox_regression": Tensor[B, A, 4],
            "cls_logits": Tensor[B, A, num_classes + 1]}``; ``None`` builds a fresh ``SSDHead``.
        cfg: ``num_classes`` (foreground), ``image_size`` ``S`` and post-processing settings.
        anchor_generator: defaults to :func:`default_anchor_generator`; a shared head needs the
            same anchor layout on both detectors.
        image_mean / image_std: the input normalisation (ImageNet's; torchvision's SSD builders bring theirs).

    In eval mode ``forward(list[Tensor[3, H, W] in [0, 1]])`` is torchvision's and returns
    ``[{"boxes": FloatTensor[N, 4] xyxy in original pixels, "labels": Int64Tensor[N], "scores":
    Tensor[N]}]``; it is TorchScript-compatible.
    """

    # Python-only state: TorchScript must not try to type these.
    __jit_ignored_attributes__ = ["config", "_anchor_cache"]

    def __init__(
        self,
        feature_extractor: nn.Module,
        level_channels: Mapping[str, int],
        level_strides: Mapping[str, int],
        head: nn.Module | None,
        cfg: DetectorConfig,
        anchor_generator: DefaultBoxGenerator | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if list(level_channels) != list(level_strides):
            raise ValueError(f"level_channels {list(level_channels)} and level_strides {list(level_strides)} differ")
        anchor_generator = anchor_generator or default_anchor_generator()
        if len(anchor_generator.aspect_ratios) != len(level_channels):
            raise ValueError(f"{len(level_channels)} levels but anchors for {len(anchor_generator.aspect_ratios)}")
        num_classes = cfg.num_classes + 1  # background is class 0
        if head is None:
            head = new_head(list(level_channels.values()), anchor_generator.num_anchors_per_location(), num_classes)
        super().__init__(
            feature_extractor,
            anchor_generator,
            (cfg.image_size, cfg.image_size),
            num_classes,
            image_mean=list(image_mean),
            image_std=list(image_std),
            head=head,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )
        self._init_levels(cfg, level_channels, level_strides)

    # ----------------------------------------------------------------------------------------
    # the training / distillation path (Python only; normalize, extract, anchors, predict_resized,
    # feature_shapes come from LevelDetector)

    def _head_loss_terms(self, targets, head_outputs, anchors, levels) -> dict[str, Tensor]:
        """torchvision's SSD losses (hard-negative mining 3:1, smooth-L1 on encoded boxes), each divided by the
        number of matched anchors: ``det/classification``, ``det/bbox_regression``."""
        matched = [self._match(target["boxes"], anchors) for target in targets]
        batch = levels[0].shape[0]
        losses = self.compute_loss(targets, head_outputs, [anchors] * batch, matched)
        return dict(zip(LOSS_NAMES, (losses["classification"], losses["bbox_regression"])))

    def decode(self, head_outputs, anchors, image_size, orig_sizes) -> list[dict[str, Tensor]]:
        """Raw head outputs -> detections in original coordinates: the post-processing of :meth:`detect`.

        torchvision's ``postprocess_detections`` (softmax, box decoding against ``anchors``, clip to the
        input, per class ``score > score_thresh`` and top-k, per-class NMS, ``detections_per_img``), then
        the boxes scaled from S-space to each original image. ``student.onnx`` outputs exactly
        ``head_outputs`` and ``anchors``, so its predictions go through this same code.

        Args:
            head_outputs: ``{"cls_logits": Tensor[B, A, num_classes + 1], "bbox_regression": Tensor[B, A, 4]}``.
            anchors: ``FloatTensor[A, 4]`` xyxy in S-space (:meth:`anchors`).
            image_size: ``S`` (or ``(h, w)``) of the network input.
            orig_sizes: ``(h, w)`` of each original image.
        """
        size = pair(image_size)
        batch = head_outputs["cls_logits"].shape[0]
        detections = self.postprocess_detections(dict(head_outputs), [anchors] * batch, [size] * batch)
        return to_original(detections, size, orig_sizes)

    def _match(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Anchor -> target index (``-1`` background): IoU >= 0.5 plus each target's best anchor."""
        if boxes.numel() == 0:
            return torch.full((anchors.size(0),), -1, dtype=torch.int64, device=anchors.device)
        return self.proposal_matcher(box_ops.box_iou(boxes, anchors))
