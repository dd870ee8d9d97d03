"""The training step shared by every role: plain detection training or GAN-KD.

One call of :meth:`TrainStep.train_step` on a batch, with ``G`` the student side and ``D`` the critics:

1. teacher forward once, under ``no_grad`` (GAN-KD only);
2. student forward once: detection losses and the adapted maps of the distilled levels;
3. the distillation inputs: both sides standardised per channel (``distill.standardize``), and
   the critics' inputs with instance noise (``distill.instance_noise``, annealed to 0);
4. critic forward/backward on the *detached* student maps (``D`` gradients at ``D_t``; R1 and
   gradient penalties included);
5. student adversarial term through the unwrapped, frozen critics (also ``D_t``), plus detection
   and optional feature-imitation terms; one backward (``G`` gradients);
6. ONE device->host transfer of every scalar; if any is non-finite the gradients are dropped,
   buffers restored, nothing is stepped and :class:`Diverged` is raised;
7. both learning rates are set from the epoch progress (warm-up + cosine, a pure function of it)
   and both optimisers step (weights clipped after the critic step for ``wgan``), then
   ``n_critic - 1`` further critic updates reuse the same detached maps.

So, with ``distill.update = simultaneous``, the first critic update and the student update are
simultaneous (both gradients at ``(G_t, D_t)``), which is what lets a single synchronisation guard
every update of the step. The extra critic updates run after the check (their inputs were checked;
a critic that blows up in them is caught by the next step's check).

With ``distill.update = alternating`` the steps take turns, each on its own batch: ``n_critic``
critic steps (the student forward runs without a graph, step 5 without its backward), then one
student step (step 4 without its backward, through the unwrapped critics). Every step still
reports every term, computes them all before its one synchronisation and updates one player
after it; the idle player's ``grad_norm`` is reported as 0. The student's BatchNorm statistics see
every batch, as in any training-mode forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gankd_ray.config import ConfigError, RunConfig
from gankd_ray.distill import adversarial
from gankd_ray.distill import features as kd_maps
from gankd_ray.distill.adapters import build_adapters, tap_activations
from gankd_ray.distill.discriminators import build_discriminators
from gankd_ray.distill.modules import DiscriminatorModule, Features, FrozenTeacher, StudentModule, Targets
from gankd_ray.distill.optim import WarmupCosine, build_disc_optimizer, build_student_optimizer, set_lr
from gankd_ray.distill.pairs import level_pairs
from gankd_ray.distill.teacher_head import student_with_teacher_head

if TYPE_CHECKING:
    from gankd_ray.models import SSDDetector

Wrap = Callable[[nn.Module], nn.Module]

# Which players a step updates (see the module docstring).
BOTH, CRITIC, STUDENT = "both", "critic", "student"


@dataclass
class DistillInputs:
    """The maps the distillation terms of one step see.

    ``real``/``fake``: teacher and (graph-carrying) student maps, standardised when configured; the
    imitation term compares these. ``critic_real``/``critic_fake``: the critics' inputs (the student
    side detached), with instance noise; ``adv_fake``: the student's maps with the same noise as
    ``critic_fake``, for its adversarial term. ``noise_std``: this step's noise std.
    """

    real: Features
    fake: Features
    critic_real: Features
    critic_fake: Features
    adv_fake: Features
    noise_std: float


class Diverged(RuntimeError):
    """A loss or gradient norm became non-finite; that step's update was not applied.

    Attributes:
        metrics: the last finite metrics (the previous successful step's; ``{}`` on the first step).
        nonfinite: ``{name: value}`` of the failed step's non-finite terms.
    """

    def __init__(self, metrics: dict[str, float], nonfinite: dict[str, float]) -> None:
        super().__init__(f"non-finite training terms: {', '.join(sorted(nonfinite))}")
        self.metrics = dict(metrics)
        self.nonfinite = dict(nonfinite)


def identity(module: nn.Module) -> nn.Module:
    """The default ``wrap``: train the module as is (no DDP)."""
    return module


class TrainStep:
    """Optimisation state and the step of one run (any role).

    Args:
        cfg: the resolved run config (``optim`` and ``distill`` are read).
        student: the trainable detector side.
        teacher: the frozen feature source; ``None`` for the plain ``teacher``/``student`` roles.
        critics: the trainable critic side; ``None`` without a teacher.
        wrap: applied once to ``student`` and ``critics`` (the trainer passes torch DDP; ``None`` =
            :func:`identity`); the unwrapped modules stay reachable for checkpoints, evaluation
            and the student's adversarial term.

    Optimisers: the student's is ``optim.optimizer`` at ``optim.lr``; the critics' Adam at
    ``distill.lr_ratio * optim.lr`` with ``optim.disc_betas``; both follow
    :class:`~gankd_ray.distill.optim.WarmupCosine` of the progress given to :meth:`train_step`,
    and both players' gradients are clipped to ``optim.grad_clip``
    (0 = no clipping). ``wgan`` critics are clipped into ``[-clip, clip]`` at construction and after
    every critic update.

    ``iteration`` counts successful steps (checkpointed); ``distill.update = alternating`` reads its
    turn from it (:meth:`phase`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        student: StudentModule,
        teacher: FrozenTeacher | None = None,
        critics: DiscriminatorModule | None = None,
        wrap: Wrap | None = None,
    ) -> None:
        if (teacher is None) != (critics is None):
            raise ValueError("teacher and critics come together (GAN-KD) or not at all (plain roles)")
        wrap = wrap or identity
        self.cfg = cfg
        self.student, self.teacher, self.critics = student, teacher, critics
        self.student_train = wrap(student)
        self.critics_train = wrap(critics) if critics is not None else None
        self.schedule = WarmupCosine(cfg.optim.warmup_epochs, cfg.optim.epochs)
        self.student_optimizer = build_student_optimizer(student, cfg.optim)
        self.disc_optimizer = None
        if critics is not None:
            self.disc_optimizer = build_disc_optimizer(critics, cfg.optim, cfg.distill.lr_ratio)
            if cfg.distill.adv_loss == "wgan":
                # The critic is K-Lipschitz only inside the clipping box: start inside it too.
                adversarial.clip_weights_(critics, cfg.distill.clip)
        self.device = next(student.parameters()).device
        self.last_metrics: dict[str, float] = {}
        self.iteration = 0
        self._buffers = _BufferBackup([m for m in (student, critics) if m is not None])

    # ------------------------------------------------------------------ public API

    def train_step(self, images: Tensor, targets: Targets, progress: float) -> dict[str, float]:
        """One training step on a batch.

        Args:
            images: ``Tensor[B, 3, S, S]`` in [0, 1] (the loader's output, not normalised).
            targets: per image ``{"boxes": Tensor[N, 4] xyxy in S-space, "labels": Int64Tensor[N]}``.
            progress: fractional epoch progress, ``epoch_index + batch_index / batches`` (from 0),
                driving the learning-rate schedule and the adv_weight ramp.

        Returns:
            Flat ``{name: float}``: ``det/classification``, ``det/bbox_regression``, ``loss/total``,
            ``grad_norm/student``, ``lr`` and, in GAN-KD, ``kd/adv/<l>``, ``kd/feat/<l>`` (when
            ``feat_weight > 0``), ``kd/adv_weight``, ``kd/noise_std`` (when ``instance_noise > 0``),
            ``disc/loss|real|fake/<l>``, ``disc/acc/<l>`` or ``disc/wdist/<l>``, ``disc/gp/<l>``
            (wgan-gp), ``disc/r1/<l>`` (``r1_weight > 0``), ``grad_norm/disc``.

        Raises:
            Diverged: a term was non-finite; no parameter, buffer or optimiser state changed.
        """
        images, targets = self._to_device(images, targets)
        adv_weight = self.adv_weight(progress)
        phase = self.phase()
        self._buffers.save()
        self.student_optimizer.zero_grad(set_to_none=True)
        with self.autocast(), torch.set_grad_enabled(phase != CRITIC):
            real = self.teacher(images) if self.teacher is not None else {}
            det_losses, fake = self.student_train(images, targets)
        inputs = self._distill_inputs(real, fake, progress) if self.critics is not None else None
        terms = self._critic_terms(inputs, update=phase != STUDENT) if inputs is not None else {}
        terms.update(self._student_terms(det_losses, inputs, adv_weight, update=phase != CRITIC))
        metrics = _to_floats(terms)  # the step's only synchronisation
        if inputs is not None:
            metrics["kd/adv_weight"] = adv_weight
            if self.cfg.distill.instance_noise > 0:
                metrics["kd/noise_std"] = inputs.noise_std
        nonfinite = {name: value for name, value in metrics.items() if not math.isfinite(value)}
        if nonfinite:
            self._discard_update()
            raise Diverged(self.last_metrics, nonfinite)
        metrics["lr"] = self._set_learning_rates(progress)
        self._apply_update(inputs, phase)
        self.iteration += 1
        self.last_metrics = metrics
        return metrics

    def phase(self) -> str:
        """The players this step updates: ``both`` (simultaneous), or, alternating, ``critic`` for
        ``n_critic`` steps then ``student`` for one (by :attr:`iteration`). Plain roles: ``student``."""
        if self.critics is None:
            return STUDENT
        distill = self.cfg.distill
        if distill.update != "alternating":
            return BOTH
        return CRITIC if self.iteration % (distill.n_critic + 1) < distill.n_critic else STUDENT

    def noise_std(self, progress: float) -> float:
        """The instance-noise std at ``progress``: ``distill.instance_noise``, linearly to 0 over
        ``distill.instance_noise_epochs``, then 0."""
        distill = self.cfg.distill
        return kd_maps.instance_noise_std(distill.instance_noise, distill.instance_noise_epochs, progress)

    def adv_weight(self, progress: float) -> float:
        """``distill.adv_weight``, ramped linearly from 0 over ``distill.adv_warmup_epochs``."""
        distill = self.cfg.distill
        if distill.adv_warmup_epochs <= 0:
            return distill.adv_weight
        return distill.adv_weight * min(1.0, max(0.0, progress) / distill.adv_warmup_epochs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when ``optim.bf16``; a no-op context otherwise."""
        enabled = self.cfg.optim.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train(self, mode: bool = True) -> TrainStep:
        """Train/eval mode of the trainable modules (the teacher always stays in eval)."""
        self.student.train(mode)
        if self.critics is not None:
            self.critics.train(mode)
        return self

    @property
    def detector(self) -> SSDDetector:
        """The live detector being trained (shares weights; for per-epoch validation)."""
        return self.student.detector

    def export_detector(self) -> SSDDetector:
        """:func:`export_student` of this step's student side (the trained detector of any role)."""
        return export_student(self.student)

    def predict(self, images: Tensor, orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections of the live detector: ``SSDDetector.predict_resized`` under this step's autocast.

        Args:
            images: ``Tensor[B, 3, S, S]`` in [0, 1] (the eval loader's output).
            orig_sizes: ``(h, w)`` of each original image.

        Returns:
            Per image ``{"boxes": FloatTensor[N, 4] xyxy original pixels, "labels": Int64Tensor[N],
            "scores": Tensor[N]}`` on the step's device.
        """
        images = images.to(self.device, non_blocking=True)
        return self.student.detector.predict_resized(images, orig_sizes, autocast=self.autocast())

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs besides the teacher: weights (student, adapters, critics),
        optimisers (with their base lr) and the last finite metrics. The schedule has no state:
        it is a function of the progress passed to :meth:`train_step`."""
        state: dict[str, Any] = {
            "student": self.student.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "last_metrics": dict(self.last_metrics),
            "iteration": self.iteration,
        }
        if self.critics is not None:
            state["critics"] = self.critics.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (strict: a GAN-KD state needs a GAN-KD step)."""
        has_critics = "critics" in state
        if has_critics != (self.critics is not None):
            raise ValueError("state and step disagree on having discriminators (GAN-KD vs plain role)")
        # Optimizer.load_state_dict keeps the given state tensors when dtype and device already
        # match; copies keep an in-memory source (another step) from sharing moments with this one.
        self.student.load_state_dict(state["student"])
        self.student_optimizer.load_state_dict(copy.deepcopy(state["student_optimizer"]))
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.iteration = int(state.get("iteration", 0))  # states written before the counter existed: 0
        if self.critics is not None:
            self.critics.load_state_dict(state["critics"])
            self.disc_optimizer.load_state_dict(copy.deepcopy(state["disc_optimizer"]))

    # ------------------------------------------------------------------ step internals

    def _set_learning_rates(self, progress: float) -> float:
        """Both optimisers at ``initial_lr * schedule(progress)``; returns the student's lr."""
        multiplier = self.schedule(progress)
        if self.disc_optimizer is not None:
            set_lr(self.disc_optimizer, multiplier)
        return set_lr(self.student_optimizer, multiplier)

    def _distill_inputs(self, real: Features, fake: Features, progress: float) -> DistillInputs:
        """Standardise both sides (if configured), then add this step's instance noise to the critics' inputs."""
        if self.cfg.distill.standardize:
            real, fake = kd_maps.standardize(real), kd_maps.standardize(fake)
        std = self.noise_std(progress)
        real_noise = kd_maps.noise_like(real, std) if std > 0 else None
        fake_noise = kd_maps.noise_like(fake, std) if std > 0 else None
        return DistillInputs(
            real=real,
            fake=fake,
            critic_real=kd_maps.add(real, real_noise),
            critic_fake=kd_maps.add(_detached(fake), fake_noise),
            adv_fake=kd_maps.add(fake, fake_noise),
            noise_std=std,
        )

    def _critic_terms(self, inputs: DistillInputs, update: bool) -> dict[str, Tensor]:
        """Critic loss and its terms; with ``update``, also its (clipped) gradients.

        Without ``update`` (an alternating student step) the unwrapped critics compute the terms for
        the log only: no backward, ``grad_norm/disc`` 0.
        """
        if not update:
            with self.autocast():
                _, terms = self.critics(inputs.critic_real, inputs.critic_fake)
            terms["grad_norm/disc"] = torch.zeros((), device=self.device)
            return terms
        self.disc_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, terms = self.critics_train(inputs.critic_real, inputs.critic_fake)
        loss.backward()
        terms["grad_norm/disc"] = _clip_grad_norm(self.disc_optimizer, self.cfg.optim.grad_clip)
        return terms

    def _student_terms(
        self, det_losses: dict[str, Tensor], inputs: DistillInputs | None, adv_weight: float, update: bool
    ) -> dict[str, Tensor]:
        """``L = L_cls + L_box + adv_weight * sum_l L_adv,l + feat_weight * mean_l L_feat,l``; backward if ``update``.

        ``L_feat,l`` is the relative squared error of :func:`~gankd_ray.distill.features.imitation_losses`,
        averaged over levels so ``feat_weight`` means the same whatever the levels. Without ``update``
        (an alternating critic step) nothing has a graph and ``grad_norm/student`` is 0.
        """
        feat_weight = self.cfg.distill.feat_weight
        adv: dict[str, Tensor] = {}
        feat: dict[str, Tensor] = {}
        with torch.set_grad_enabled(update):
            if inputs is not None:
                with self.autocast():
                    adv = self.critics.student_losses(inputs.adv_fake)
                if feat_weight > 0:
                    feat = kd_maps.imitation_losses(inputs.fake, inputs.real)
            total = sum(det_losses.values()) + adv_weight * _sum(adv.values()) + feat_weight * _mean(feat.values())
        terms = {name: loss.detach() for name, loss in det_losses.items()}
        terms.update({f"kd/adv/{level}": loss.detach() for level, loss in adv.items()})
        terms.update({f"kd/feat/{level}": loss.detach() for level, loss in feat.items()})
        terms["loss/total"] = total.detach()
        if update:
            total.backward()
            terms["grad_norm/student"] = _clip_grad_norm(self.student_optimizer, self.cfg.optim.grad_clip)
        else:
            terms["grad_norm/student"] = torch.zeros((), device=self.device)
        return terms

    def _apply_update(self, inputs: DistillInputs | None, phase: str) -> None:
        """Step the players of ``phase``; simultaneous: then the extra critic updates on the same maps."""
        if phase != CRITIC:
            self.student_optimizer.step()
        if inputs is None or phase == STUDENT:
            return
        self._critic_optimizer_step()
        if phase == BOTH:
            for _ in range(self.cfg.distill.n_critic - 1):
                self._critic_terms(inputs, update=True)
                self._critic_optimizer_step()

    def _critic_optimizer_step(self) -> None:
        self.disc_optimizer.step()
        if self.cfg.distill.adv_loss == "wgan":
            adversarial.clip_weights_(self.critics, self.cfg.distill.clip)

    def _discard_update(self) -> None:
        self.student_optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
        self._buffers.restore()

    def _to_device(self, images: Tensor, targets: Targets) -> tuple[Tensor, Targets]:
        images = images.to(self.device, non_blocking=True)
        targets = [{key: value.to(self.device, non_blocking=True) for key, value in t.items()} for t in targets]
        return images, targets


GanKD = TrainStep  # the name DESIGN.md gives the step


# ---------------------------------------------------------------------------------------------
# assembly


def build_step(
    cfg: RunConfig,
    teacher: SSDDetector | None = None,
    device: str | torch.device = "cpu",
    wrap: Wrap | None = None,
    *,
    student: SSDDetector | None = None,
) -> TrainStep:
    """Build the step of ``cfg.role``.

    Args:
        cfg: resolved run config; ``cfg.detector`` describes the trained detector.
        teacher: the trained teacher (required for role ``gankd``, ignored otherwise).
        device: where everything lives.
        wrap: applied to the trainable modules (torch DDP in the trainer); ``None`` = as is.
        student: an already built detector to train; default ``build_detector(cfg.detector)``.

    Raises:
        ConfigError: role ``gankd`` without a teacher, or levels / head that do not fit the pair.
    """
    device = torch.device(device)
    if student is None:
        from gankd_ray.models import build_detector  # late: models is a sibling package

        student = build_detector(cfg.detector)
    student = student.to(device)
    if cfg.role != "gankd":
        module = StudentModule(student, nn.ModuleDict(), distilled_levels=[])
        return TrainStep(cfg, module, wrap=wrap)
    if teacher is None:
        raise ConfigError("role gankd needs a trained teacher detector")
    teacher = teacher.to(device)
    pairs = distilled_pairs(cfg, student, teacher)
    levels = list(pairs)
    teacher_size = cfg.teacher.image_size if cfg.teacher is not None else teacher.image_size
    target = paired_teacher_levels(teacher, pairs, teacher_size)
    module = _student_module(cfg, student, teacher, target, teacher_size).to(device)
    critics = DiscriminatorModule(
        build_discriminators(levels, target.channels, cfg.discriminator, target.shapes),
        cfg.distill.adv_loss,
        cfg.distill.gp_weight,
        cfg.distill.r1_weight,
    ).to(device)
    frozen = FrozenTeacher(teacher, pairs, input_size=teacher_size)
    return TrainStep(cfg, module, frozen, critics, wrap=wrap)


@dataclass
class PairedTeacherLevels:
    """What each distilled student level is aligned to, keyed by the *student* level: its paired teacher
    level's channels, map size at the teacher's input size and tap activation (absent = linear)."""

    pairs: dict[str, str]
    channels: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    activations: dict[str, nn.Module]


def paired_teacher_levels(teacher: SSDDetector, pairs: dict[str, str], teacher_size: int) -> PairedTeacherLevels:
    """The teacher side of ``pairs`` (student level -> teacher level), re-keyed by student level."""
    shapes = teacher.feature_shapes(teacher_size)
    activations = teacher_tap_activations(teacher)
    return PairedTeacherLevels(
        pairs=dict(pairs),
        channels={level: teacher.level_channels[source] for level, source in pairs.items()},
        shapes={level: shapes[source] for level, source in pairs.items()},
        activations={level: activations[source] for level, source in pairs.items() if source in activations},
    )


def teacher_tap_activations(teacher: SSDDetector) -> dict[str, nn.Module]:
    """The activation each teacher level's map comes out of, read from the SSD family's extractor.

    torchvision's families are left linear: their FPN maps are plain conv outputs, and the SSD
    builders' taps are not read (an adapter without a final activation can still match them).
    """
    backbone = teacher.backbone
    if hasattr(backbone, "blocks") or hasattr(backbone, "adapters"):
        return tap_activations(backbone)
    return {}


def export_student(student: StudentModule) -> SSDDetector:
    """A standalone, frozen copy of the student side's detector, in eval mode (eval, TorchScript).

    ``own`` head mode (and plain roles): the trained detector itself. ``teacher`` head mode:
    student backbone -> adapters -> the (copied) teacher head, with the teacher's anchors; the
    same layout :func:`~gankd_ray.distill.teacher_head.build_student` rebuilds from a config.
    """
    return copy.deepcopy(student.detector).eval().requires_grad_(False)


def distilled_levels(cfg: RunConfig, student: SSDDetector, teacher: SSDDetector) -> list[str]:
    """The distilled student levels (see :func:`distilled_pairs`)."""
    return list(distilled_pairs(cfg, student, teacher))


def distilled_pairs(cfg: RunConfig, student: SSDDetector, teacher: SSDDetector) -> dict[str, str]:
    """``{student level: teacher level}``: ``distill.levels`` (all of the student's if empty) matched by
    stride (:func:`gankd_ray.distill.pairs.level_pairs`)."""
    return level_pairs(student.level_strides, teacher.level_strides, cfg.distill.levels)


def _student_module(
    cfg: RunConfig, student: SSDDetector, teacher: SSDDetector, target: PairedTeacherLevels, teacher_size: int
) -> StudentModule:
    match_activation = cfg.distill.match_activation
    levels = list(target.pairs)
    if cfg.distill.head_mode == "teacher":
        detector = student_with_teacher_head(
            student, teacher, cfg.distill.finetune_teacher_head, teacher_size, match_activation
        )
        return StudentModule(detector, nn.ModuleDict(), levels)
    activations = target.activations if match_activation else None
    adapters = build_adapters(levels, student.level_channels, target.channels, target.shapes, activations)
    return StudentModule(student, adapters, levels)


# ---------------------------------------------------------------------------------------------
# helpers


class _BufferBackup:
    """Copies of the modules' buffers (BatchNorm statistics, spectral-norm vectors).

    A forward in training mode updates buffers before the loss is known to be finite; a discarded
    step restores them so nothing of it survives.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.buffers = [b for module in modules for b in module.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.copies)


def _clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Total gradient norm before clipping; clips to ``max_norm`` when it is > 0."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _to_floats(terms: dict[str, Tensor]) -> dict[str, float]:
    """All scalar tensors to Python floats with one device->host copy."""
    if not terms:
        return {}
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()]).tolist()
    return dict(zip(terms.keys(), values))


def _detached(features: Features) -> Features:
    return {level: feature.detach() for level, feature in features.items()}


def _sum(values: Iterable[Tensor]) -> Tensor | float:
    return sum(values, 0.0)


def _mean(values: Iterable[Tensor]) -> Tensor | float:
    values = list(values)
    return sum(values, 0.0) / len(values) if values else 0.0
