"""What every detector family shares: named levels known without a forward pass, S-space training, prediction.

``LevelDetector`` is a mixin for a torchvision detection model (``SSD``, ``RetinaNet``, ``FCOS``) whose
``backbone`` returns an ordered dict of feature maps. It adds the contract the distiller and the engine
use (see DESIGN.md, "Detectors"): ``level_names`` / ``level_channels`` / ``level_strides``,
``feature_shapes``, ``normalize``, ``extract``, ``anchors``, ``predict_resized``. A family adds
``head_losses``, ``detect`` and ``decode`` on top of its torchvision model's own loss and
post-processing. ``forward`` stays torchvision's, so every family is TorchScript-compatible.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from gankd_ray.config import DetectorConfig
from gankd_ray.models.backbones import feature_shapes

ShapeFunction = Callable[[int], "OrderedDict[str, tuple[int, int]]"]


class LevelDetector:
    """Mixin: the level metadata and the family-independent half of the detector contract.

    Subclasses call :meth:`_init_levels` after the torchvision model's ``__init__``, which sets
    ``config``, ``arch``, ``image_size``, ``level_names``, ``level_channels`` and ``level_strides``
    (no class-level annotations: TorchScript would try to read them as attribute types).
    """

    def _init_levels(
        self, cfg: DetectorConfig, level_channels: Mapping[str, int], level_strides: Mapping[str, int]
    ) -> None:
        if list(level_channels) != list(level_strides):
            raise ValueError(f"level_channels {list(level_channels)} and level_strides {list(level_strides)} differ")
        self.config = cfg
        self.arch = cfg.arch
        self.image_size = cfg.image_size
        self.level_names = list(level_channels)
        self.level_channels = dict(level_channels)
        self.level_strides = dict(level_strides)
        self._anchor_cache = {}  # (size, device, level shapes) -> Tensor[A, 4]

    def normalize(self, images: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S] in [0, 1] -> (images - mean) / std``, the transform's own mean/std."""
        mean = torch.as_tensor(self.transform.image_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.transform.image_std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    def extract(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``Tensor[B, 3, S, S]`` normalised -> ``OrderedDict[level -> Tensor[B, C_level, h, w]]`` (head input).

        torchvision's backbones name their maps ``'0', '1', ..., 'p6'``; they are handed out under this
        detector's level names, in the same order.
        """
        features = self.backbone(x)
        if list(features) == self.level_names:
            return features
        return OrderedDict(zip(self.level_names, features.values()))

    def feature_shapes(self, image_size: int | None = None) -> OrderedDict[str, tuple[int, int]]:
        """``{level: (h, w)}`` for an ``image_size`` (default: this detector's ``S``) input, no forward pass.

        Every stride-2 step of these networks maps ``n`` to ``ceil(n / 2)``; a family whose layers do
        not (ssd300_vgg16's unpadded extras) overrides this.
        """
        return feature_shapes(self.image_size if image_size is None else image_size, self.level_strides)

    def head_losses(
        self,
        features: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        image_size: int | tuple[int, int],
        head: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """The detection losses of ``head`` (default: this detector's) on ``features``.

        Args:
            features: ``{level: Tensor[B, C, h, w]}`` in level order (from :meth:`extract`, or adapted
                student features matching ``head``'s channels).
            targets: per image ``{"boxes": FloatTensor[N, 4] xyxy in S-space, "labels": Int64Tensor[N]}``
                with labels in ``1..num_classes``; ``N`` may be 0.
            image_size: ``S`` (or ``(h, w)``) of the network input the boxes refer to.
            head: a head with this detector's anchor layout (e.g. the teacher's).

        Returns:
            ``{"det/<name>": Tensor[]}``: the family's torchvision losses (``_head_loss_terms``), e.g.
            ``det/classification`` and ``det/bbox_regression`` (plus ``det/bbox_ctrness`` for FCOS).
        """
        levels = list(features.values())
        head_outputs = self._run_head(levels, head)
        anchors = self.anchors(levels, image_size)
        return self._head_loss_terms(list(targets), head_outputs, anchors, levels)

    def _head_loss_terms(
        self,
        targets: list[Mapping[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: Tensor,
        levels: list[Tensor],
    ) -> dict[str, Tensor]:
        """The family's losses: ``targets`` per image, the head's outputs, the anchors ``[A, 4]`` (one set, every
        image the same size) and the levels' maps."""
        raise NotImplementedError

    def decode(
        self,
        head_outputs: Mapping[str, Tensor],
        anchors: Tensor,
        image_size: int | tuple[int, int],
        orig_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """The family's post-processing: raw head outputs (``_run_head``), the anchors ``[A, 4]`` of an
        ``image_size`` input, and each image's original ``(h, w)`` -> per image ``{"boxes" xyxy in original
        pixels, "scores", "labels"}``."""
        raise NotImplementedError

    def anchors(self, levels: Sequence[Tensor], image_size: int | tuple[int, int]) -> Tensor:
        """The anchors ``FloatTensor[A, 4]`` xyxy in S-space, cached per (size, device, level shapes).

        Always float32, even under autocast: bf16 cannot hold pixel coordinates of a 512 px input.
        """
        size = pair(image_size)
        shapes = tuple(tuple(level.shape[-2:]) for level in levels)
        device = levels[0].device
        key = (size, device, shapes)
        cached = self._anchor_cache.get(key)
        if cached is None:
            # The generators read only shapes, dtype and device, so zero-stride views stand in for data.
            placeholder = torch.zeros((), dtype=torch.float32, device=device)
            canvas = placeholder.expand(1, 3, size[0], size[1])
            grids = [placeholder.expand(1, 1, h, w) for h, w in shapes]
            cached = self.anchor_generator(ImageList(canvas, [size]), grids)[0]
            self._anchor_cache[key] = cached
        return cached

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
        size = pair(image_size)
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
        float32 (``detect``); no gradients; the train/eval mode is restored after.

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

    def _run_head(self, levels: list[Tensor], head: nn.Module | None) -> dict[str, Tensor]:
        """Run ``head`` (default: this detector's) and return its outputs in float32.

        Under bf16 autocast decoded boxes would otherwise keep ~3 significant digits (2 px steps at 256-512 px).
        """
        outputs = (head if head is not None else self.head)(levels)
        return {name: value.float() for name, value in outputs.items()}


def to_original(
    detections: list[dict[str, Tensor]], size: tuple[int, int], orig_sizes: Sequence[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """Scale each detection's boxes from S-space to its original image, in place; returns ``detections``.

    Not ``transform.postprocess``: that one skips the rescaling whenever the model is in train mode.
    """
    for detection, orig in zip(detections, orig_sizes):
        detection["boxes"] = resize_boxes(detection["boxes"], list(size), [int(orig[0]), int(orig[1])])
    return detections


def pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``S`` or ``(h, w)`` as ``(h, w)`` ints."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))
