"""Adversarial losses for feature-level GAN distillation.

Conventions used by every function here:

- The teacher's feature maps are the *real* samples, the (adapted) student's maps the *fake* ones.
- A discriminator returns raw scores ``Tensor[B, P]``: ``P == 1`` for a global critic, ``P = h * w``
  for a patch critic. Scores are logits / critic values, never probabilities; every loss averages
  over all ``B * P`` scores.
- Higher score = "looks like the teacher". The discriminator *minimises* ``d_loss``; the student
  *minimises* ``g_loss``.

Per kind, with ``r = D(teacher)``, ``f = D(student)`` and ``E`` the mean over scores:

=========  ===============================================  ==============================
kind       d_loss (discriminator)                           g_loss (student)
=========  ===============================================  ==============================
wgan       E[f] - E[r]                                      -E[f]
wgan-gp    E[f] - E[r]  (+ gp_weight * gradient_penalty)    -E[f]
lsgan      0.5 E[(r - 1)^2] + 0.5 E[f^2]                    0.5 E[(f - 1)^2]
bce        E[softplus(-r)] + E[softplus(f)]                 E[softplus(-f)]  (non-saturating)
hinge      E[relu(1 - r)] + E[relu(1 + f)]                  -E[f]
=========  ===============================================  ==============================

``softplus(-x) = -log(sigmoid(x))``, so the ``bce`` rows are the usual binary cross-entropies with
real = 1, fake = 0. The paper (Wang et al. 2019) writes the critic with the opposite sign
(``L_D = E[D(teacher)] - E[D(student)]``, ``L_G = E[D(student)]``); negating the critic maps one
convention onto the other, so the game and the Wasserstein estimate are the same. ``wgan`` relies on
weight clipping (:func:`clip_weights_`, after every discriminator step) to keep the critic
Lipschitz; ``wgan-gp`` on the penalty of Gulrajani et al. 2017 instead. Any kind can add the R1
penalty on real samples (:func:`r1_penalty`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gankd_ray.config import ADV_LOSSES

WASSERSTEIN_LOSSES = ("wgan", "wgan-gp")

# The decision threshold on a raw score for the accuracy diagnostic: lsgan regresses to {0, 1},
# bce and hinge separate at 0.
_ACCURACY_THRESHOLD = {"lsgan": 0.5, "bce": 0.0, "hinge": 0.0}


def d_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator loss (gradient penalty excluded, see :func:`gradient_penalty`).

    Args:
        kind: one of ``ADV_LOSSES``.
        real: scores on teacher maps, ``Tensor[B, P]``.
        fake: scores on student maps, ``Tensor[B, P]`` (normally computed from detached maps).

    Returns:
        Scalar tensor, the formula in the module table.
    """
    _check_kind(kind)
    if kind in WASSERSTEIN_LOSSES:
        return fake.mean() - real.mean()
    if kind == "lsgan":
        return 0.5 * (real - 1.0).pow(2).mean() + 0.5 * fake.pow(2).mean()
    if kind == "bce":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()  # hinge


def g_loss(kind: str, fake: Tensor) -> Tensor:
    """Student (generator) adversarial loss on the scores of its own maps ``fake: Tensor[B, P]``.

    Returns:
        Scalar tensor, the formula in the module table.
    """
    _check_kind(kind)
    if kind == "lsgan":
        return 0.5 * (fake - 1.0).pow(2).mean()
    if kind == "bce":
        return F.softplus(-fake).mean()
    return -fake.mean()  # wgan, wgan-gp, hinge


def interpolate(real: Tensor, fake: Tensor) -> Tensor:
    """Random points on the segments between real and fake samples, for the gradient penalty.

    ``x_hat = eps * real + (1 - eps) * fake`` with one ``eps ~ U[0, 1]`` per sample.

    Args:
        real, fake: ``Tensor[B, C, H, W]``, detached.

    Returns:
        ``Tensor[B, C, H, W]`` that requires grad, so the critic's input gradient can be taken.
    """
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    return torch.lerp(fake, real, eps).requires_grad_(True)


def gradient_penalty(scores: Tensor, inputs: Tensor) -> Tensor:
    """WGAN-GP penalty ``E_b[(||grad_x D(x_b)||_2 - 1)^2]`` (Gulrajani et al. 2017).

    The per-sample critic value is the mean of its ``P`` scores, so a patch critic is penalised as a
    whole. The graph is kept (``create_graph=True``) so the penalty trains the critic.

    Args:
        scores: critic scores on ``inputs``, ``Tensor[B, P]``.
        inputs: the critic's input ``Tensor[B, C, H, W]`` with ``requires_grad``, usually from
            :func:`interpolate`.

    Returns:
        Scalar tensor.
    """
    (grad,) = torch.autograd.grad(scores.mean(dim=1).sum(), inputs, create_graph=True)
    # In float32 with a floor under the squared norm: the norm's own gradient is 0/0 where a sample's input
    # gradient vanishes, which bf16 activations make likely (seen as a non-finite critic gradient norm).
    squared = grad.float().flatten(1).pow(2).sum(dim=1)
    return (squared.clamp_min(1e-12).sqrt() - 1.0).pow(2).mean()


def r1_penalty(scores: Tensor, inputs: Tensor) -> Tensor:
    """R1 penalty ``0.5 * E_b[||grad_x D(x_b)||_2^2]`` on real samples (Mescheder et al. 2018).

    Multiplied by ``gamma`` (``distill.r1_weight``) it is the paper's ``gamma / 2 * E||grad D||^2``:
    it pulls the critic's gradient on teacher maps to zero, so a critic that separates the two
    sides cannot do it with an ever steeper slope. As in :func:`gradient_penalty`, the per-sample
    value is the mean of its ``P`` scores and the graph is kept.

    Args:
        scores: critic scores on ``inputs``, ``Tensor[B, P]``.
        inputs: the teacher maps the critic scored, ``Tensor[B, C, H, W]`` with ``requires_grad``.

    Returns:
        Scalar tensor (float32).
    """
    (grad,) = torch.autograd.grad(scores.mean(dim=1).sum(), inputs, create_graph=True)
    return 0.5 * grad.float().flatten(1).pow(2).sum(dim=1).mean()


def diagnostics(kind: str, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
    """What a discriminator's scores say about the game, as detached scalar tensors.

    Returns:
        ``real`` / ``fake``: mean score on teacher / student maps; for Wasserstein kinds ``wdist``
        = ``E[r] - E[f]`` (the critic's Wasserstein estimate, up to its Lipschitz constant),
        otherwise ``acc``: the fraction of scores on the right side of the decision threshold
        (0.5 for lsgan, 0 for bce and hinge), real and fake weighted equally.
    """
    _check_kind(kind)
    real, fake = real.detach().float(), fake.detach().float()
    out = {"real": real.mean(), "fake": fake.mean()}
    if kind in WASSERSTEIN_LOSSES:
        out["wdist"] = out["real"] - out["fake"]
    else:
        threshold = _ACCURACY_THRESHOLD[kind]
        out["acc"] = 0.5 * ((real > threshold).float().mean() + (fake <= threshold).float().mean())
    return out


@torch.no_grad()
def clip_weights_(module: nn.Module, bound: float) -> None:
    """Clamp every parameter of ``module`` into ``[-bound, bound]`` in place (WGAN weight clipping)."""
    params = list(module.parameters())
    if params:
        torch._foreach_clamp_min_(params, -bound)
        torch._foreach_clamp_max_(params, bound)


def _check_kind(kind: str) -> None:
    if kind not in ADV_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {', '.join(ADV_LOSSES)}")
