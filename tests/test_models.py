"""Detectors: level structure per backbone, losses, detection coordinates, head swap, TorchScript."""

from __future__ import annotations

import io
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gankd_ray.config import ConfigError, DetectorConfig
from gankd_ray.models import (
    LEVEL_NAMES,
    SSDDetector,
    available_backbones,
    build_detector,
    build_feature_extractor,
    feature_shapes,
    level_names_for,
    register,
)

torch.set_num_threads(1)

REQUIRED_BACKBONES = {
    *("mobilenet_v2", "mobilenet_v2_0.5", "mobilenet_v2_0.35"),
    *("mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50"),
}
SIZES = (160, 192, 320, 512)
STUDENT = "mobilenet_v2_0.35"
NUM_CLASSES = 3


def make_detector(backbone: str = STUDENT, image_size: int = 160, seed: int = 0, **overrides) -> SSDDetector:
    torch.manual_seed(seed)
    cfg = DetectorConfig(backbone=backbone, num_classes=NUM_CLASSES, image_size=image_size, **overrides)
    return build_detector(cfg)


def tiny_targets() -> list[dict[str, Tensor]]:
    """Two images, small and large objects, in 160 px S-space."""
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 26.0, 30.0], [60.0, 50.0, 130.0, 120.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[100.0, 20.0, 120.0, 36.0]]), "labels": torch.tensor([3])},
    ]


@pytest.fixture(scope="module")
def student() -> SSDDetector:
    return make_detector().eval()


# --------------------------------------------------------------------------------------------
# registry and level structure


def test_registry_lists_required_backbones_and_rejects_duplicates():
    assert REQUIRED_BACKBONES <= set(available_backbones())
    with pytest.raises(ValueError, match="already registered"):
        register("resnet18", lambda model: [], (8, 8))(nn.Identity)


def test_unknown_backbone_and_unset_classes_are_config_errors():
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_detector(DetectorConfig(backbone="vgg99", num_classes=1))
    with pytest.raises(ConfigError, match="num_classes"):
        build_detector(DetectorConfig(backbone=STUDENT, num_classes=0))


@pytest.mark.parametrize("backbone", sorted(REQUIRED_BACKBONES))
def test_levels_known_without_forward_and_match_forward_at_every_size(backbone):
    extractor, channels, strides = build_feature_extractor(backbone)
    assert list(channels) == list(strides) == list(LEVEL_NAMES) == [f"level{k}" for k in range(5)]
    assert list(strides.values()) == [8, 16, 32, 64, 128]
    # One running-statistics momentum everywhere (torchvision's MobileNetV3 alone would use 0.01).
    assert {m.momentum for m in extractor.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    extractor.eval()
    with torch.no_grad():
        for size in SIZES:
            levels = extractor(torch.rand(1, 3, size, size))
            assert list(levels) == list(LEVEL_NAMES)
            got = {name: (t.shape[1], tuple(t.shape[-2:])) for name, t in levels.items()}
            want = {name: (channels[name], (math.ceil(size / strides[name]),) * 2) for name in LEVEL_NAMES}
            assert got == want, f"{backbone} at {size}"
            assert dict(feature_shapes(size)) == {name: hw for name, (_, hw) in want.items()}


def test_eval_mode_catches_up_with_batch_statistics_within_a_short_run():
    """Short CPU runs train a few hundred steps: running statistics must follow the weights by then.

    Random-init activations can have variances far below the initial running_var = 1. With
    torchvision's MobileNetV3 momentum (0.01), 150 train-mode passes leave 22% of that 1 in place and
    eval-mode features are off by ~100%; at 0.1 the rest is 1e-7. Checked on level0: the deeper
    levels of a 64 px input hold too few pixels for the unbiased running variance to equal the batch's.
    """
    torch.manual_seed(0)
    extractor, _, _ = build_feature_extractor("mobilenet_v3_small")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        extractor.train()
        for _ in range(150):
            trained = extractor(images)["level0"]
        extractor.eval()
        evaluated = extractor(images)["level0"]
    error = (evaluated - trained).norm() / trained.norm()
    assert error < 0.05, f"eval-mode level0 features off by {error:.2f}"


def test_detector_exposes_level_metadata(student):
    assert student.level_names == level_names_for(student.config) == list(LEVEL_NAMES)
    assert student.level_strides == dict(zip(LEVEL_NAMES, (8, 16, 32, 64, 128)))
    assert student.feature_shapes() == feature_shapes(160)
    assert student.feature_shapes(192)["level4"] == (2, 2)
    # mobilenet_v2_0.35 taps: 16 ch @ 8, 32 ch @ 16, the 1280 ch final conv @ 32, then extras 128, 64
    assert list(student.level_channels.values()) == [16, 32, 1280, 128, 64]


def test_normalize_matches_torchvision_transform(student):
    images = torch.rand(2, 3, 160, 160)
    expected = torch.stack([student.transform.normalize(image) for image in images])
    assert torch.allclose(student.normalize(images), expected)


# --------------------------------------------------------------------------------------------
# losses


def test_head_losses_finite_and_decreasing_on_a_tiny_batch():
    detector = make_detector().train()
    images, targets = torch.rand(2, 3, 160, 160), tiny_targets()
    # Random-init BN nets have stem gradients of norm ~500 here, so lr 1e-3 (0.01 overshoots).
    optimizer = torch.optim.SGD(detector.parameters(), lr=1e-3, momentum=0.9)
    totals = []
    for _ in range(10):
        losses = detector.head_losses(detector.extract(detector.normalize(images)), targets, 160)
        assert set(losses) == {"det/classification", "det/bbox_regression"}
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.7 * totals[0], totals


def test_head_losses_without_objects_give_zero_regression(student):
    with torch.no_grad():
        features = student.extract(student.normalize(torch.rand(1, 3, 160, 160)))
        empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
        losses = student.head_losses(features, empty, 160)
    assert losses["det/bbox_regression"].item() == 0.0
    assert torch.isfinite(losses["det/classification"])


def test_given_head_is_used_instead_of_own(student):
    other_head = make_detector(seed=1).head
    features = student.extract(student.normalize(torch.rand(2, 3, 160, 160)))
    features = {name: t.detach() for name, t in features.items()}
    own = student.head_losses(features, tiny_targets(), 160)
    swapped = student.head_losses(features, tiny_targets(), 160, head=other_head)
    sum(swapped.values()).backward()
    assert not torch.allclose(own["det/classification"], swapped["det/classification"])
    assert all(p.grad is not None for p in other_head.parameters())
    assert all(p.grad is None for p in student.head.parameters())


def test_anchors_are_cached_per_size(student):
    features = student.extract(student.normalize(torch.rand(1, 3, 160, 160)))
    first = student.anchors(list(features.values()), 160)
    assert student.anchors(list(features.values()), 160) is first
    assert first.shape == (2420, 4) and first.dtype == torch.float32
    bigger = student.extract(student.normalize(torch.rand(1, 3, 192, 192)))
    assert student.anchors(list(bigger.values()), 192).shape[0] > first.shape[0]


def test_bf16_autocast_keeps_losses_and_boxes_in_float32():
    detector = make_detector().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = detector.extract(detector.normalize(torch.rand(2, 3, 160, 160)))
        losses = detector.head_losses(features, tiny_targets(), 160)
        detections = detector.detect({k: v.detach() for k, v in features.items()}, 160, [(512, 512)] * 2)
    assert features["level0"].dtype == torch.bfloat16  # the autocast really ran
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert detections[0]["boxes"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# detection


def torchvision_resize(image: Tensor, size: int) -> Tensor:
    """The resize ``GeneralizedRCNNTransform`` applies with ``fixed_size=(size, size)``."""
    return F.interpolate(image[None], size=[size, size], mode="bilinear", align_corners=False)[0]


def assert_same_detections(got: list[dict[str, Tensor]], want: list[dict[str, Tensor]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["boxes"].shape[0] > 0
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_detect_returns_original_coordinates_like_forward(student):
    originals = [torch.rand(3, 200, 150), torch.rand(3, 120, 260)]
    with torch.no_grad():
        reference = student(originals)
        resized = torch.stack([torchvision_resize(image, 160) for image in originals])
        features = student.extract(student.normalize(resized))
        detected = student.detect(features, 160, [(200, 150), (120, 260)])
    assert_same_detections(detected, reference)
    assert detected[1]["boxes"][:, 0::2].max() > 160  # x reaches past S: really in original pixels


def test_detect_scales_boxes_by_original_size_in_any_mode(student):
    with torch.no_grad():
        features = student.extract(student.normalize(torch.rand(1, 3, 160, 160)))
        in_s_space = student.detect(features, 160, [(160, 160)])[0]
        student.train()  # torchvision's transform.postprocess would skip the rescaling here
        try:
            scaled = student.detect(features, 160, [(320, 480)])[0]
        finally:
            student.eval()
    assert torch.allclose(scaled["boxes"], in_s_space["boxes"] * torch.tensor([3.0, 2.0, 3.0, 2.0]))


def test_torchscript_round_trip_matches_eager(student):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(student), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)
    images = [torch.rand(3, 180, 240), torch.rand(3, 300, 170)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "SSD always returns a (Losses, Detections) tuple in scripting"
        _, scripted_detections = scripted(images)
    with torch.no_grad():
        eager_detections = student(images)
    assert_same_detections(scripted_detections, eager_detections)


# --------------------------------------------------------------------------------------------
# composing: student features -> adapters -> teacher head


class AdaptedExtractor(nn.Module):
    """Student extractor followed by 1x1 convs to the teacher's channels (what distill builds)."""

    def __init__(self, extractor: nn.Module, student_channels: dict[str, int], teacher_channels: dict[str, int]):
        super().__init__()
        self.extractor = extractor
        self.adapters = nn.ModuleDict(
            {name: nn.Conv2d(student_channels[name], teacher_channels[name], 1) for name in teacher_channels}
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = OrderedDict()
        for name, level in self.extractor(x).items():
            out[name] = self.adapters[name](level)
        return out


def test_detector_from_student_extractor_and_teacher_head(student):
    teacher = make_detector("mobilenet_v3_small").eval()
    extractor = AdaptedExtractor(student.backbone, student.level_channels, teacher.level_channels)
    composed = SSDDetector(extractor, teacher.level_channels, teacher.level_strides, teacher.head, student.config)
    composed.eval()
    assert composed.head is teacher.head
    assert composed.level_channels == teacher.level_channels
    with torch.no_grad():
        detections = composed([torch.rand(3, 160, 160)])
        features = composed.extract(composed.normalize(torch.rand(2, 3, 160, 160)))
        losses = composed.head_losses(features, tiny_targets(), 160)
    assert detections[0]["boxes"].shape[1] == 4
    assert {name: t.shape[1] for name, t in features.items()} == teacher.level_channels
    assert all(torch.isfinite(v) for v in losses.values())
