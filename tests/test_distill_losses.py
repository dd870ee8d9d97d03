"""Adversarial loss maths on hand-computed cases, gradient and R1 penalties, clipping, discriminators, adapters
and the tap activations they end in, the distillation inputs (standardisation, noise, relative imitation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gankd_ray.config import ADV_LOSSES, DISC_NORMS, DiscriminatorConfig
from gankd_ray.distill import DiscriminatorModule, adversarial, features
from gankd_ray.distill.adapters import FeatureAdapter, build_adapters, tap_activations
from gankd_ray.distill.discriminators import LevelDiscriminator, build_discriminators
from gankd_ray.models import available_backbones, build_feature_extractor

torch.set_num_threads(1)

REAL = torch.tensor([[1.0], [3.0]])
FAKE = torch.tensor([[-1.0], [0.0]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# d_loss and g_loss values for REAL/FAKE, worked out by hand from the formulas in adversarial.py.
EXPECTED = {
    "wgan": (-0.5 - 2.0, 0.5),
    "wgan-gp": (-0.5 - 2.0, 0.5),
    "lsgan": (0.5 * (0 + 4) / 2 + 0.5 * (1 + 0) / 2, 0.5 * (4 + 1) / 2),
    "bce": (
        (softplus(-1) + softplus(-3)) / 2 + (softplus(-1) + softplus(0)) / 2,
        (softplus(1) + softplus(0)) / 2,
    ),
    "hinge": ((0 + 0) / 2 + (0 + 1) / 2, 0.5),
}


@pytest.mark.parametrize("kind", ADV_LOSSES)
def test_loss_values_match_hand_computation(kind: str) -> None:
    want_d, want_g = EXPECTED[kind]
    assert adversarial.d_loss(kind, REAL, FAKE).item() == pytest.approx(want_d, abs=1e-6)
    assert adversarial.g_loss(kind, FAKE).item() == pytest.approx(want_g, abs=1e-6)


@pytest.mark.parametrize("kind", ADV_LOSSES)
def test_loss_signs_teacher_is_real(kind: str) -> None:
    # Inside every margin: the discriminator's descent raises teacher scores and lowers student
    # scores; the student's descent raises its own scores.
    real = torch.full((4, 1), 0.2, requires_grad=True)
    fake = torch.full((4, 1), 0.1, requires_grad=True)
    adversarial.d_loss(kind, real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()
    fake_g = fake.detach().clone().requires_grad_(True)
    adversarial.g_loss(kind, fake_g).backward()
    assert (fake_g.grad < 0).all()


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        adversarial.d_loss("wasserstein", REAL, FAKE)


def test_diagnostics_values() -> None:
    wgan = adversarial.diagnostics("wgan", REAL, FAKE)
    assert set(wgan) == {"real", "fake", "wdist"}
    assert wgan["wdist"].item() == pytest.approx(2.0 - (-0.5))
    # bce threshold 0: real [1, 3] both right; fake [-1, 0] both right (0 counts as fake).
    assert adversarial.diagnostics("bce", REAL, FAKE)["acc"].item() == pytest.approx(1.0)
    # lsgan threshold 0.5: real [0.2, 0.9] -> 1/2 right; fake [0.7, 0.1] -> 1/2 right.
    lsgan = adversarial.diagnostics("lsgan", torch.tensor([[0.2], [0.9]]), torch.tensor([[0.7], [0.1]]))
    assert lsgan["acc"].item() == pytest.approx(0.5)
    assert set(lsgan) == {"real", "fake", "acc"}


def _linear_critic_scores(x: torch.Tensor, weight: torch.Tensor, patch: bool) -> torch.Tensor:
    products = x * weight
    return products.flatten(1) if patch else products.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("patch", [False, True])
def test_gradient_penalty_on_linear_critic(patch: bool) -> None:
    # D(x) = <w, x> has input gradient w everywhere, so the penalty is (||w|| - 1)^2. As a patch
    # critic each of the P scores is w_i x_i and the per-sample value is their mean: gradient w / P.
    weight = torch.zeros(2, 3, 3)
    weight[0, 0, 0], weight[1, 2, 2] = 2.0, 2.0 * math.sqrt(2.0)  # ||w|| = sqrt(4 + 8) = sqrt(12)
    real, fake = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    x_hat = adversarial.interpolate(real, fake)
    penalty = adversarial.gradient_penalty(_linear_critic_scores(x_hat, weight, patch), x_hat)
    grad_norm = math.sqrt(12.0) / (weight.numel() if patch else 1)
    assert penalty.item() == pytest.approx((grad_norm - 1.0) ** 2, rel=1e-5)


def test_gradient_penalty_trains_the_critic() -> None:
    # For D(x) = <w, x>: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||; the graph must be kept.
    weight = torch.tensor([[[3.0]], [[4.0]]], requires_grad=True)  # ||w|| = 5
    x_hat = adversarial.interpolate(torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1))
    adversarial.gradient_penalty(_linear_critic_scores(x_hat, weight, patch=False), x_hat).backward()
    expected = 2 * (5.0 - 1.0) * weight.detach() / 5.0
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("patch", [False, True])
def test_r1_penalty_on_linear_critic(patch: bool) -> None:
    # D(x) = <w, x>: input gradient w (w / P per sample for a patch critic), so R1 = 0.5 ||w||^2.
    weight = torch.zeros(2, 3, 3)
    weight[0, 0, 0], weight[1, 2, 2] = 2.0, 2.0 * math.sqrt(2.0)  # ||w||^2 = 12
    real = torch.randn(5, 2, 3, 3, requires_grad=True)
    penalty = adversarial.r1_penalty(_linear_critic_scores(real, weight, patch), real)
    squared_norm = 12.0 / (weight.numel() ** 2 if patch else 1)
    assert penalty.item() == pytest.approx(0.5 * squared_norm, rel=1e-5)


def test_r1_weight_adds_the_penalty_and_changes_the_critic_gradient() -> None:
    torch.manual_seed(0)
    disc = nn.ModuleDict({"level0": LevelDiscriminator(4, depth=2, width=8, norm="spectral", output="global")})
    real, fake = {"level0": torch.randn(3, 4, 8, 8)}, {"level0": torch.randn(3, 4, 8, 8) + 1.0}
    grads, losses, terms = [], [], []
    for r1_weight in (0.0, 10.0):
        critics = DiscriminatorModule(disc, "lsgan", r1_weight=r1_weight).eval()  # eval: same spectral vectors
        disc.zero_grad(set_to_none=True)
        loss, level_terms = critics(real, fake)
        loss.backward()
        losses.append(loss.item())
        terms.append(level_terms)
        grads.append([p.grad.clone() for p in disc.parameters()])
    assert "disc/r1/level0" not in terms[0]
    r1 = terms[1]["disc/r1/level0"].item()
    assert r1 > 0
    assert losses[1] == pytest.approx(losses[0] + 10.0 * r1, rel=1e-5)
    assert terms[1]["disc/loss/level0"].item() == pytest.approx(losses[1], rel=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0], grads[1]))
    assert real["level0"].grad is None  # the penalty differentiates a copy of the teacher maps, not them


def test_interpolate_lies_between_real_and_fake() -> None:
    real, fake = torch.ones(64, 1, 2, 2), torch.zeros(64, 1, 2, 2)
    x_hat = adversarial.interpolate(real, fake)
    assert x_hat.requires_grad
    per_sample = x_hat.detach().flatten(1)
    assert (per_sample >= 0).all() and (per_sample <= 1).all()
    assert (per_sample == per_sample[:, :1]).all()  # one eps per sample
    assert per_sample[:, 0].std() > 0.1  # eps differs across samples


def test_clip_weights_bounds_every_parameter() -> None:
    disc = LevelDiscriminator(4, depth=2, width=8, norm="batch", output="global")
    with torch.no_grad():
        for p in disc.parameters():
            p.normal_(0, 1)
    adversarial.clip_weights_(disc, 0.03)
    assert all(p.abs().max() <= 0.03 for p in disc.parameters())
    assert any(p.abs().max().item() == pytest.approx(0.03) for p in disc.parameters())


# ------------------------------------------------------------------------------------------------
# discriminators


@pytest.mark.parametrize("norm", DISC_NORMS)
@pytest.mark.parametrize("output", ["global", "patch"])
def test_discriminator_shapes_on_tiny_and_normal_maps(norm: str, output: str) -> None:
    for depth in (1, 3):
        disc = LevelDiscriminator(6, depth=depth, width=8, norm=norm, output=output).train()
        for size, patch_side in ((1, 1), (2, 1), (5, math.ceil(5 / 2**depth)), (20, math.ceil(20 / 2**depth))):
            x = torch.randn(2, 6, size, size, requires_grad=True)
            disc.zero_grad(set_to_none=True)
            scores = disc(x)
            expected = 1 if output == "global" else patch_side**2
            assert scores.shape == (2, expected), (norm, output, depth, size)
            scores.sum().backward()
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
            # DDP needs every parameter in every backward, even when the map has shrunk to 1x1.
            assert all(p.grad is not None for p in disc.parameters()), (norm, depth, size)


@pytest.mark.parametrize("norm", DISC_NORMS)
def test_strided_discriminator_strides_down_to_one_score(norm: str) -> None:
    for size, depth, blocks in ((20, 1, 5), (5, 1, 3), (2, 1, 1), (1, 2, 2), (20, 6, 6)):
        disc = LevelDiscriminator(6, depth=depth, width=8, norm=norm, output="strided", input_size=(size, size))
        maps: list[torch.Tensor] = []
        disc.score.register_forward_hook(lambda module, args, out, maps=maps: maps.append(out))
        assert disc.depth == blocks, (size, depth)
        assert disc(torch.randn(2, 6, size, size)).shape == (2, 1)
        assert maps[-1].shape == (2, 1, 1, 1)  # the score is the 1x1 map itself, nothing averaged
    with pytest.raises(ValueError, match="larger than the level size"):
        LevelDiscriminator(6, 1, 8, norm, "strided", input_size=(5, 5))(torch.randn(1, 6, 20, 20))
    with pytest.raises(ValueError, match="needs the level's input_size"):
        LevelDiscriminator(6, 1, 8, norm, "strided")


def test_discriminator_norm_layers() -> None:
    def count(disc: nn.Module, kind: type) -> int:
        return sum(isinstance(m, kind) for m in disc.modules())

    spectral = LevelDiscriminator(4, depth=3, width=8, norm="spectral", output="global")
    convs = [m for m in spectral.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    assert count(LevelDiscriminator(4, 3, 8, "batch", "global"), nn.BatchNorm2d) == 3
    assert count(LevelDiscriminator(4, 3, 8, "instance", "global"), nn.InstanceNorm2d) == 3
    plain = LevelDiscriminator(4, 3, 8, "none", "global")
    assert count(plain, nn.BatchNorm2d) + count(plain, nn.InstanceNorm2d) == 0
    assert not any(torch.nn.utils.parametrize.is_parametrized(c) for c in plain.modules())


def test_build_discriminators_one_per_level() -> None:
    cfg = DiscriminatorConfig(depth=2, width=16, norm="none", output="patch")
    discs = build_discriminators(["level1", "level4"], {"level1": 8, "level4": 3, "level5": 2}, cfg)
    assert list(discs.keys()) == ["level1", "level4"]
    assert discs["level1"].blocks[0].in_channels == 8 and discs["level4"].blocks[0].in_channels == 3
    assert discs["level1"].blocks[0].out_channels == 16


# ------------------------------------------------------------------------------------------------
# adapters


def test_adapter_maps_channels_and_resizes() -> None:
    adapters = build_adapters(
        ["level0", "level1"], {"level0": 4, "level1": 6}, {"level0": 10, "level1": 3}, {"level0": (5, 5)}
    )
    assert adapters["level0"](torch.randn(2, 4, 10, 10)).shape == (2, 10, 5, 5)
    assert adapters["level1"](torch.randn(2, 6, 7, 7)).shape == (2, 3, 7, 7)  # no size given: kept


def test_adapter_is_scriptable() -> None:
    adapter = FeatureAdapter(4, 8, (3, 3)).eval()
    scripted = torch.jit.script(adapter)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(scripted(x), adapter(x))


# What each backbone's taps end in, from reading torchvision's code: MobileNet stages end in a
# linear bottleneck (plus residual) at strides 8/16 and in Conv-BN-ReLU6 (v2) or Hardswish (v3) at
# 32; ResNet stages end in the ReLU after the residual add; the extra blocks in ReLU.
EXPECTED_TAPS = {
    "mobilenet_v2": (nn.Identity, nn.Identity, nn.ReLU6, nn.ReLU, nn.ReLU),
    "mobilenet_v3": (nn.Identity, nn.Identity, nn.Hardswish, nn.ReLU, nn.ReLU),
    "resnet": (nn.ReLU,) * 5,
}


@pytest.mark.parametrize("backbone", available_backbones())
def test_tap_activations_are_read_from_the_backbone(backbone: str) -> None:
    extractor, _, _ = build_feature_extractor(backbone)
    found = tap_activations(extractor)
    family = next(name for name in EXPECTED_TAPS if backbone.startswith(name))
    assert [type(found[level]) for level in extractor.level_names] == list(EXPECTED_TAPS[family])
    assert not any(getattr(module, "inplace", False) for module in found.values())


def test_adapter_applies_its_activation_before_the_resize() -> None:
    adapters = build_adapters(
        ["level0", "level1"],
        {"level0": 4, "level1": 4},
        {"level0": 6, "level1": 6},
        {"level0": (3, 3), "level1": (3, 3)},
        {"level0": nn.ReLU6(), "level1": nn.Identity()},
    ).train()
    x = 10 * torch.randn(8, 4, 7, 7)
    post_relu6, linear = adapters["level0"](x), adapters["level1"](x)
    assert post_relu6.min() >= 0 and post_relu6.max() <= 6 and post_relu6.max() > 0
    assert linear.min() < 0
    scripted = torch.jit.script(adapters["level0"].eval())
    torch.testing.assert_close(scripted(x), adapters["level0"](x))


# ------------------------------------------------------------------------------------------------
# distillation inputs


def test_imitation_is_relative_per_level_whatever_the_channels_and_scale() -> None:
    torch.manual_seed(0)
    real = {"level0": torch.randn(2, 8, 10, 10), "level2": 3.0 + 5.0 * torch.rand(2, 256, 3, 3)}
    fake = {level: 1.1 * x for level, x in real.items()}  # 10 % relative error everywhere
    terms = features.imitation_losses(fake, real)
    assert terms["level0"].item() == pytest.approx(0.01, rel=1e-5)
    assert terms["level2"].item() == pytest.approx(0.01, rel=1e-5)
    plain_mse = {level: nn.functional.mse_loss(fake[level], x).item() for level, x in real.items()}
    assert plain_mse["level2"] > 10 * plain_mse["level0"]  # what an unnormalised term would weigh


def test_standardize_per_channel_each_side_on_its_own() -> None:
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1) + 7.0
    tiny = 1e-6 * torch.randn(4, 3, 5, 5)  # a random teacher's deep level: the scale must not matter
    out = features.standardize({"level0": x, "level1": torch.zeros(2, 2, 1, 1), "level2": tiny})
    per_channel = out["level0"].transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    tiny_std = out["level2"].transpose(0, 1).flatten(1).std(1, unbiased=False)
    torch.testing.assert_close(tiny_std, torch.ones(3), atol=1e-3, rtol=0)
    assert torch.equal(out["level1"], torch.zeros(2, 2, 1, 1))  # a constant channel: 0, not nan


def test_instance_noise_anneals_linearly_to_zero() -> None:
    schedule = [features.instance_noise_std(0.4, 2.0, p) for p in (0.0, 0.5, 1.0, 2.0, 3.0, 100.0)]
    assert schedule == pytest.approx([0.4, 0.3, 0.2, 0.0, 0.0, 0.0])
    assert features.instance_noise_std(0.0, 2.0, 0.0) == 0.0
