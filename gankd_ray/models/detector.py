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

import contextlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from gankd_ray.config import ConfigError, DetectorConfig
from gankd_ray.models.backbones import LEVEL_NAMES, available_backbones, build_feature_extractor, feature_shapes
from gankd_ray.utils import short_repr

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


def build_detector(cfg: DetectorConfig) -> SSDDetector:
    """The normal path: registered backbone (optionally with ImageNet weights) + extras + a fresh SSDHead.

    Raises:
        ConfigError: invalid config, ``num_classes`` still 0 (resolve it from the dataset first), or a
            weights file that does not match the backbone.
    """
    check_detector_config(cfg)
    if cfg.num_classes < 1:
        raise ConfigError("detector.num_classes=0: set it (or take it from the dataset) before building")
    extractor, channels, strides = build_feature_extractor(cfg.backbone, cfg.weights)
    return SSDDetector(extractor, channels, strides, None, cfg)


def check_detector_config(cfg: DetectorConfig, where: str = "detector") -> None:
    """``cfg.validate`` plus what only the models know: that the backbone is registered."""
    cfg.validate(where)
    if cfg.backbone not in available_backbones():
        raise ConfigError(
            f"{where}.backbone={short_repr(cfg.backbone)}: unknown backbone; "
            f"choose one of {', '.join(available_backbones())}"
        )


def level_names_for(cfg: DetectorConfig) -> list[str]:
    """The level names a detector built from ``cfg`` exposes (every backbone has the same levels)."""
    check_detector_config(cfg)
    return list(LEVEL_NAMES)


class SSDDetector(SSD):
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
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            head=head,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )
        self.config = cfg
        self.image_size = cfg.image_size
        self.level_names = list(level_channels)
        self.level_channels = dict(level_channels)
        self.level_strides = dict(level_strides)
        self._anchor_cache = {}  # (size, device, level shapes) -> Tensor[A, 4]

    # ----------------------------------------------------------------------------------------
    # the training / distillation path (Python only)

    def normalize(self, images: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S] in [0, 1] -> (images - mean) / std``, the transform's own mean/std."""
        mean = torch.as_tensor(self.transform.image_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.transform.image_std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    def extract(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``Tensor[B, 3, S, S]`` normalised -> ``OrderedDict[level -> Tensor[B, C_level, h, w]]`` (head input)."""
        return self.backbone(x)

    def head_losses(
        self,
        features: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        image_size: int | tuple[int, int],
        head: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """SSD losses of ``head`` (default: this detector's) on ``features``.

        Args:
            features: ``{level: Tensor[B, C, h, w]}`` in level order (from :meth:`extract`, or adapted
                student features matching ``head``'s channels).
            targets: per image ``{"boxes": FloatTensor[N, 4] xyxy in S-space, "labels": Int64Tensor[N]}``
                with labels in ``1..num_classes``; ``N`` may be 0.
            image_size: ``S`` (or ``(h, w)``) of the network input the boxes refer to.
            head: a head with this detector's anchor layout (e.g. the teacher's).

        Returns:
            ``{"det/classification": Tensor[], "det/bbox_regression": Tensor[]}``: torchvision's SSD
            losses (hard-negative mining 3:1, smooth-L1 on encoded boxes), each divided by the number
            of matched anchors.
        """
        levels = list(features.values())
        head_outputs = self._run_head(levels, head)
        anchors = self.anchors(levels, image_size)
        matched = [self._match(target["boxes"], anchors) for target in targets]
        batch = levels[0].shape[0]
        losses = self.compute_loss(list(targets), head_outputs, [anchors] * batch, matched)
        return dict(zip(LOSS_NAMES, (losses["classification"], losses["bbox_regression"])))

    def detect(
        self,
        features: Mapping[str, Tensor],
        image_size: int | tuple[int, int],
        orig_sizes: Sequence[tuple[int, int]],
        head: nn.Module | None = None,
    ) -> list[dict[str, Tensor]]:
        """Post-processed detections of ``head`` (default: this detector's), in original coordinates.

        Args:
            features: ``{level: Tensor[B, C, h, w]}`` as for :meth:`head_losses`.
            image_size: ``S`` (or ``(h, w)``) of the network input.
            orig_sizes: ``(h, w)`` of each original image; boxes are scaled from S-space to it.
            head: optional replacement head.

        Returns:
            Per image ``{"boxes": FloatTensor[N, 4] xyxy original pixels, "labels": Int64Tensor[N],
            "scores": Tensor[N]}``, at most ``detections_per_img``, after per-class NMS.
        """
        levels = list(features.values())
        size = _pair(image_size)
        return self.decode(self._run_head(levels, head), self.anchors(levels, size), size, orig_sizes)

    def predict_resized(
        self,
        images: Tensor,
        orig_sizes: Sequence[tuple[int, int]],
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections on images already resized to ``S x S``: the one prediction path of training's validation
        (``TrainStep.predict``) and of an export's evaluation, so both give the same figure.

        ``normalize -> extract`` (under ``autocast`` when given) in eval mode, then head and decoding in
        float32 (:meth:`detect`); no gradients; the train/eval mode is restored after.

        Args:
            images: ``Tensor[B, 3, S, S]`` in [0, 1] on this detector's device (the eval loader's output).
            orig_sizes: ``(h, w)`` of each original image.
            autocast: e.g. the training step's bf16 autocast; ``None`` runs in the weights' dtype.

        Returns:
            Per image ``{"boxes": FloatTensor[N, 4] xyxy original pixels, "labels": Int64Tensor[N],
            "scores": Tensor[N]}``.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                with autocast if autocast is not None else contextlib.nullcontext():
                    features = self.extract(self.normalize(images))
                # Head and box decoding in float32: bf16 cannot hold pixel coordinates of a 512 px input.
                features = OrderedDict((level, feature.float()) for level, feature in features.items())
                return self.detect(features, images.shape[-2:], orig_sizes)
        finally:
            self.train(was_training)

    def decode(
        self,
        head_outputs: Mapping[str, Tensor],
        anchors: Tensor,
        image_size: int | tuple[int, int],
        orig_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
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
        size = _pair(image_size)
        batch = head_outputs["cls_logits"].shape[0]
        detections = self.postprocess_detections(dict(head_outputs), [anchors] * batch, [size] * batch)
        for detection, orig in zip(detections, orig_sizes):
            # Not transform.postprocess: that one skips the rescaling whenever the model is in train mode.
            detection["boxes"] = resize_boxes(detection["boxes"], list(size), [int(orig[0]), int(orig[1])])
        return detections

    def anchors(self, levels: Sequence[Tensor], image_size: int | tuple[int, int]) -> Tensor:
        """Default boxes ``FloatTensor[A, 4]`` xyxy in S-space, cached per (size, device, level shapes).

        Always float32, even under autocast: bf16 cannot hold pixel coordinates of a 512 px input.
        """
        size = _pair(image_size)
        shapes = tuple(tuple(level.shape[-2:]) for level in levels)
        device = levels[0].device
        key = (size, device, shapes)
        cached = self._anchor_cache.get(key)
        if cached is None:
            # The generator reads only shapes, dtype and device, so zero-stride views stand in for data.
            placeholder = torch.zeros((), dtype=torch.float32, device=device)
            canvas = placeholder.expand(1, 3, size[0], size[1])
            grids = [placeholder.expand(1, 1, h, w) for h, w in shapes]
            cached = self.anchor_generator(ImageList(canvas, [size]), grids)[0]
            self._anchor_cache[key] = cached
        return cached

    def feature_shapes(self, image_size: int | None = None) -> OrderedDict[str, tuple[int, int]]:
        """``{level: (h, w)}`` for an ``image_size`` (default: this detector's ``S``) input, no forward pass."""
        return feature_shapes(self.image_size if image_size is None else image_size, self.level_strides)

    def _run_head(self, levels: list[Tensor], head: nn.Module | None) -> dict[str, Tensor]:
        """Run ``head`` (default: this detector's) and return its outputs in float32.

        Under bf16 autocast decoded boxes would otherwise keep ~3 significant digits (2 px steps at 256-512 px).
        """
        outputs = (head if head is not None else self.head)(levels)
        return {name: value.float() for name, value in outputs.items()}

    def _match(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Anchor -> target index (``-1`` background): IoU >= 0.5 plus each target's best anchor."""
        if boxes.numel() == 0:
            return torch.full((anchors.size(0),), -1, dtype=torch.int64, device=anchors.device)
        return self.proposal_matcher(box_ops.box_iou(boxes, anchors))


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))
