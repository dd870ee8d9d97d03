"""Has the adversarial game ended? A verdict from a run's epoch terms, so a search stops spending epochs on it.

Two ends, each held for ``patience`` consecutive epochs on every distilled level:
- **saturated**: the critic tells teacher from student maps (accuracy >= ``SATURATED_ACCURACY``) while the
  student's adversarial term does not fall over those epochs (by more than ``RECOVERY``): the student gets
  gradients of a game it is losing and not catching up, the critic has nothing left to learn (the project's
  own measurements: ~100 % accuracy within an epoch). A term that falls means the student is closing the
  gap, and that game goes on. (With a saturated lsgan critic the term plateaus rather than grows: a rule
  that waited for growth never fired on a run saturated on purpose.)
- **collapsed**: the critic scores both sides ~0 (``|E[D(teacher)]|`` and ``|E[D(student)]|`` below
  ``COLLAPSED_SCORE``): it says nothing any more (the paper's public log: the critic loss collapsing to ~0).
Wasserstein critics report no accuracy, so only collapse applies to them. A run without adversarial terms
(``adv_weight`` 0, or no teacher) never gets a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SATURATED_ACCURACY = 0.98
COLLAPSED_SCORE = 1e-3
RECOVERY = 0.10  # a fall of the adversarial term by more than this fraction over the window: the game goes on
DEFAULT_PATIENCE = 3


def gan_verdict(history: Sequence[Mapping[str, float]], patience: int = DEFAULT_PATIENCE) -> str | None:
    """Why the game has ended, judged on the last ``patience`` epochs' terms (oldest first), or None."""
    if patience < 1 or len(history) < patience:
        return None
    window = list(history[-patience:])
    if all(epoch.get("kd/adv_weight") == 0.0 for epoch in window):
        return None  # adv_weight 0: the critics train, but the student plays no game against them
    levels = sorted(key.removeprefix("kd/adv/") for key in window[-1] if key.startswith("kd/adv/"))
    if not levels or not all(f"kd/adv/{level}" in epoch for epoch in window for level in levels):
        return None
    if all(_collapsed(window, level) for level in levels):
        return (
            f"critics collapsed: |score| < {COLLAPSED_SCORE:g} on teacher and student maps at every level for "
            f"{patience} epochs"
        )
    if all(_saturated(window, level) for level in levels):
        return (
            f"critics saturated: accuracy >= {SATURATED_ACCURACY:g} at every level for {patience} epochs "
            f"while the student's adversarial term did not fall"
        )
    return None


def _collapsed(window: Sequence[Mapping[str, float]], level: str) -> bool:
    return all(
        abs(epoch.get(f"disc/{side}/{level}", 1.0)) < COLLAPSED_SCORE for epoch in window for side in ("real", "fake")
    )


def _saturated(window: Sequence[Mapping[str, float]], level: str) -> bool:
    accurate = all(epoch.get(f"disc/acc/{level}", 0.0) >= SATURATED_ACCURACY for epoch in window)
    first, last = window[0][f"kd/adv/{level}"], window[-1][f"kd/adv/{level}"]
    return accurate and last >= first * (1.0 - RECOVERY)
