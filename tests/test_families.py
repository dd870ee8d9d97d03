"""torchvision's one-stage families as gankd-ray detectors: contract, weights, cross-family GAN-KD, export.

Tiny and real: random-initialised torchvision models (``weights=None, weights_backbone=None``) at 128 px
(ssd300_vgg16 at its smallest input, 268 px: its unpadded extras need a 5x5 map at stride 64). The
ResNet50 families are the slow part on a 2-core CPU (a few seconds per build and step); nothing smaller
exists for them, so each is built as few times as possible.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from gankd_ray.config import ConfigError, DetectorConfig, RunConfig
from gankd_ray.distill import build_step
from gankd_ray.distill.pairs import level_pairs
from gankd_ray.models import available_archs, build_detector, family_of, level_strides_for
from gankd_ray.models.detection_weights import hub_cache_file

TORCHVISION_ARCHS = [arch for arch in available_archs() if arch != "ssd"]
STUDENT_ARCHS = [
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet18_fpn",
    "retinanet_mobilenet_v3_large_fpn",
    "fcos_resnet18_fpn",
    "fcos_mobilenet_v3_large_fpn",
]
SIZE = 128
VGG_SIZE = family_of("ssd300_vgg16").min_image_size


def detector_cfg(arch: str, size: int | None = None, **fields) -> DetectorConfig:
    default = VGG_SIZE if arch == "ssd300_vgg16" else SIZE
    return DetectorConfig(arch=arch, image_size=size or default, **{"num_classes": 2, **fields})


def build(arch: str, seed: int = 0, **fields):
    torch.manual_seed(seed)
    return build_detector(detector_cfg(arch, **fields))


def tiny_targets(size: int) -> list[dict[str, torch.Tensor]]:
    box = torch.tensor([[0.1, 0.15, 0.55, 0.6]]) * size
    return [
        {"boxes": box, "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


def test_every_required_arch_is_registered_and_unknown_is_a_config_error():
    required = {
        "ssd",
        "ssd300_vgg16",
        "ssdlite320_mobilenet_v3_large",
        "retinanet_resnet50_fpn",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
        *STUDENT_ARCHS,
    }
    assert required <= set(available_archs()) and available_archs()[0] == "ssd"
    with pytest.raises(ConfigError, match=r"detector.arch='yolo': unknown arch; choose one of ssd, "):
        build_detector(DetectorConfig(arch="yolo", num_classes=1))
    with pytest.raises(ConfigError, match="ssd300_vgg16 needs at least 268"):
        build_detector(DetectorConfig(arch="ssd300_vgg16", num_classes=1, image_size=256))
    with pytest.raises(ConfigError, match="must be in 160..512 for arch ssd"):
        build_detector(DetectorConfig(num_classes=1, image_size=128))


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_family_contract_levels_losses_and_prediction(arch):
    detector = build(arch)
    size = detector.image_size
    assert list(detector.level_strides.items()) == list(level_strides_for(detector.config).items())
    images = torch.rand(2, 3, size, size)
    features = detector.extract(detector.normalize(images))
    # Levels, channels and map sizes known without a forward pass are the forward's.
    assert list(features) == detector.level_names
    assert {level: tuple(x.shape[-2:]) for level, x in features.items()} == dict(detector.feature_shapes())
    assert {level: x.shape[1] for level, x in features.items()} == detector.level_channels
    losses = detector.head_losses(features, tiny_targets(size), size)
    assert {"det/classification", "det/bbox_regression"} <= set(losses)
    assert all(torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    assert next(detector.head.parameters()).grad is not None
    # The training-side prediction path and torchvision's own forward agree on an S x S image.
    detector.eval()
    with torch.no_grad():
        mine = detector.predict_resized(images[:1], [(size, size)])[0]
        theirs = detector([images[0]])[0]
    assert torch.allclose(mine["boxes"], theirs["boxes"], atol=1e-3)
    assert torch.equal(mine["labels"], theirs["labels"])


def test_state_dict_of_the_torchvision_builder_loads_and_other_classes_reinit_the_class_head(tmp_path):
    torch.manual_seed(1)
    coco = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    file = tmp_path / "ssdlite_coco.pth"
    torch.save(coco.state_dict(), file)
    same = build("ssdlite320_mobilenet_v3_large", seed=2, weights=str(file), num_classes=90)
    assert all(torch.equal(value, coco.state_dict()[key]) for key, value in same.state_dict().items())
    mine = build("ssdlite320_mobilenet_v3_large", seed=2, weights=str(file))  # 2 classes
    fresh = build("ssdlite320_mobilenet_v3_large", seed=2)
    for key, value in mine.state_dict().items():
        if key.startswith("head.classification_head.") and value.shape != coco.state_dict()[key].shape:
            assert torch.equal(value, fresh.state_dict()[key]), key  # the builder's own initialisation
        else:
            assert torch.equal(value, coco.state_dict()[key]), key


def test_weights_of_another_arch_name_the_file_and_first_mismatching_key(tmp_path):
    file = tmp_path / "retina.pth"
    torch.save(build("retinanet_resnet18_fpn").state_dict(), file)
    with pytest.raises(ConfigError) as err:
        build("fcos_resnet18_fpn", weights=str(file))
    message = str(err.value)
    assert str(file) in message and "not a fcos_resnet18_fpn state dict: first mismatching key" in message
    assert "\n" not in message


def test_coco_v1_reads_torchs_hub_cache_offline_and_names_it_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision.models import get_model_weights

    url = get_model_weights("ssdlite320_mobilenet_v3_large")["COCO_V1"].url
    cache = hub_cache_file(url)
    assert cache == tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    # No hub here and no cache file yet: one line naming where the file was expected.
    if not _reachable("download.pytorch.org"):
        with pytest.raises(ConfigError, match=f"no cached file {cache}"):
            build("ssdlite320_mobilenet_v3_large", weights="COCO_V1")
    torch.manual_seed(3)
    coco = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(coco.state_dict(), cache)
    loaded = build("ssdlite320_mobilenet_v3_large", weights="COCO_V1", num_classes=90)
    assert torch.equal(
        loaded.state_dict()["backbone.features.0.0.0.weight"], coco.state_dict()["backbone.features.0.0.0.weight"]
    )
    with pytest.raises(ConfigError, match="no detection weights for arch fcos_resnet18_fpn"):
        build("fcos_resnet18_fpn", weights="COCO_V1")


def _reachable(host: str) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_levels_pair_by_nearest_stride_and_no_common_stride_is_an_error():
    vgg = level_strides_for(detector_cfg("ssd300_vgg16", 300))  # strides 8/16/30/60/100/300
    lite = level_strides_for(detector_cfg("ssdlite320_mobilenet_v3_large"))
    pairs = level_pairs(lite, vgg)
    # 16->16, 32->32 (30), 64->64 (60), 128->100, 256->300; nothing within half an octave of 512.
    assert pairs == {"level0": "level1", "level1": "level2", "level2": "level3", "level3": "level4", "level4": "level5"}
    fpn = level_strides_for(detector_cfg("fcos_resnet18_fpn"))
    assert level_pairs(fpn, fpn) == {level: level for level in fpn}
    with pytest.raises(ConfigError, match="no common stride"):
        level_pairs({"level0": 512}, fpn)
    with pytest.raises(ConfigError, match="level5 \\(stride 512\\) has no teacher level"):
        level_pairs(lite, vgg, ["level5"])


GANKD_PAIRS = [
    ("retinanet_resnet50_fpn", DetectorConfig(num_classes=2, image_size=160, backbone="mobilenet_v3_small")),
    ("ssd300_vgg16", detector_cfg("ssdlite320_mobilenet_v3_large")),
    ("fcos_resnet50_fpn", detector_cfg("fcos_mobilenet_v3_large_fpn")),
]


@pytest.mark.parametrize(("teacher_arch", "student_cfg"), GANKD_PAIRS, ids=[p[0] for p in GANKD_PAIRS])
def test_one_gankd_step_across_families(teacher_arch, student_cfg):
    teacher = build(teacher_arch).eval()
    cfg = RunConfig(role="gankd")
    cfg.detector = student_cfg
    cfg.teacher = teacher.config
    cfg.optim.bf16 = False
    cfg.optim.warmup_epochs = 0  # a first step at learning rate 0 would change nothing
    step = build_step(cfg, teacher=teacher)
    expected = level_pairs(level_strides_for(student_cfg), teacher.level_strides)
    size = student_cfg.image_size
    before = [p.detach().clone() for p in step.student.detector.parameters()]
    metrics = step.train_step(torch.rand(2, 3, size, size), tiny_targets(size), progress=0.0)
    assert {name.split("/")[-1] for name in metrics if name.startswith("kd/adv/")} == set(expected)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    after = list(step.student.detector.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # The adapted student maps have the paired teacher level's channels and teacher-input map size.
    shapes = teacher.feature_shapes()
    for level, source in expected.items():
        adapter = step.student.adapters[level]
        assert adapter.conv.out_channels == teacher.level_channels[source]
        assert tuple(adapter.output_size) == shapes[source]


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_export_and_torchscript_reload_in_a_fresh_process(arch, tmp_path, synthetic_data):
    from gankd_ray.export.evaluate import evaluate_export
    from gankd_ray.export.model import export_model, load_export
    from gankd_ray.train.checkpoint import model_payload, save_torch

    cfg = RunConfig(role="student")
    cfg.data.path = synthetic_data
    cfg.detector = detector_cfg(arch)
    detector = build(arch).eval()
    model_file = save_torch(model_payload(detector, cfg), tmp_path / "model.pt")
    out = export_model(model_file, tmp_path / "export", {})
    loaded = load_export(out)
    assert type(loaded.model) is type(detector) and loaded.config.detector.arch == arch
    names = {key.split(".")[0] for key in loaded.model.state_dict()}
    assert names == {"backbone", "head"}  # no teacher, no critics, no adapters
    image = torch.rand(3, 150, 170)
    with torch.no_grad():
        eager = detector([image])[0]
    torch.save(image, tmp_path / "image.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import torchvision  # noqa: F401  (registers the torchvision ops the scripted model calls)
        # The parent's thread count: another one reorders float sums, and an untrained detector's near-tied
        # scores then come out in another order (seen once in a full run, where an earlier test set 1 thread).
        torch.set_num_threads({torch.get_num_threads()})
        model = torch.jit.load({str(Path(out) / "student.ts")!r}).eval()
        image = torch.load({str(tmp_path / "image.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model([image])
        out = out[1] if isinstance(out, tuple) else out
        torch.save({{k: v for k, v in out[0].items()}}, {str(tmp_path / "scripted.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    scripted = torch.load(tmp_path / "scripted.pt", weights_only=True)
    assert torch.allclose(scripted["boxes"], eager["boxes"], atol=1e-3)
    assert torch.equal(scripted["labels"], eager["labels"])
    # evaluate.py's two paths on the export: student.pt (predict_resized) and student.ts (forward).
    for torchscript in (False, True):
        metrics = evaluate_export(out, synthetic_data, "val", torchscript=torchscript)
        assert metrics["num_images"] == 16 and metrics["file"] == ("student.ts" if torchscript else "student.pt")
