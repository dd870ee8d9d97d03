"""GAN health: the verdict on a run's epoch terms, the Tune stopper built on it, and the trial table's
``gan_failed`` status with its reason."""

from __future__ import annotations

from gankd_ray.distill.health import gan_verdict
from gankd_ray.records import EpochRecord, Status
from gankd_ray.tune.results import trial_row
from gankd_ray.tune.search import GanHealthStopper

LEVELS = ("level0", "level1")


def epoch(acc: float, adv: float, real: float = 0.9, fake: float = 0.1, levels=LEVELS) -> dict[str, float]:
    terms = {}
    for level in levels:
        terms.update(
            {f"disc/acc/{level}": acc, f"kd/adv/{level}": adv, f"disc/real/{level}": real, f"disc/fake/{level}": fake}
        )
    return terms


def test_saturated_critics_that_keep_winning_end_the_game():
    history = [epoch(0.7, 0.3), epoch(0.99, 0.4), epoch(1.0, 0.5), epoch(1.0, 0.7)]
    assert "saturated" in gan_verdict(history, patience=3)
    assert gan_verdict(history[:3], patience=3) is None, "epoch 1 was not saturated"
    assert gan_verdict([epoch(0.99, 0.5), epoch(1.0, 0.4), epoch(1.0, 0.3)], patience=3) is None, (
        "the student is catching up: its adversarial term falls"
    )
    assert "saturated" in gan_verdict([epoch(1.0, 0.44), epoch(1.0, 0.41)], patience=2), "a plateau is not a recovery"


def test_every_level_must_have_ended():
    one_level_fine = [{**epoch(1.0, x), "disc/acc/level1": 0.6} for x in (0.1, 0.2, 0.3)]
    assert gan_verdict(one_level_fine, patience=3) is None


def test_collapsed_critics_end_the_game_wasserstein_included():
    wgan = [
        {"kd/adv/level0": 0.0, "disc/real/level0": 2e-4, "disc/fake/level0": -3e-4, "disc/wdist/level0": 5e-4}
        for _ in range(2)
    ]
    assert "collapsed" in gan_verdict(wgan, patience=2)
    wgan[-1]["disc/real/level0"] = 0.2
    assert gan_verdict(wgan, patience=2) is None


def test_no_adversarial_terms_no_verdict():
    assert gan_verdict([{"loss/total": 1.0}] * 5, patience=2) is None
    # adv_weight 0 (imitation only): the critics still train and win, but the student's loss ignores them.
    unplayed = [{**epoch(1.0, x), "kd/adv_weight": 0.0} for x in (0.3, 0.4, 0.5)]
    assert gan_verdict(unplayed, patience=3) is None
    ramping = [{**epoch(1.0, x), "kd/adv_weight": w} for x, w in ((0.3, 0.0), (0.4, 0.05), (0.5, 0.1))]
    assert "saturated" in gan_verdict(ramping, patience=3), "a warm-up ramp from 0 is still a game"
    assert gan_verdict([epoch(1.0, x) for x in (0.1, 0.2, 0.3)], patience=0) is None, "patience 0 turns it off"


def test_stopper_stops_only_the_trial_whose_game_ended():
    stopper = GanHealthStopper(patience=2)
    healthy = [epoch(0.7, 0.3), epoch(0.8, 0.2), epoch(0.7, 0.3)]
    ended = [epoch(1.0, 0.3), epoch(1.0, 0.5)]
    assert [stopper("a", {"epoch": i, **terms}) for i, terms in enumerate(healthy)] == [False, False, False]
    assert [stopper("b", {"epoch": i, **terms}) for i, terms in enumerate(ended)] == [False, True]


def test_a_trial_stopped_on_its_verdict_is_gan_failed_with_the_reason():
    records = [
        EpochRecord(epoch=i + 1, epochs=4, status=Status.RUNNING, quality={"map": 0.1, "ap50": 0.2}, terms=terms)
        for i, terms in enumerate([epoch(1.0, 0.3), epoch(1.0, 0.5)])
    ]
    row = trial_row("t", {}, records, None, max_epochs=4, keys=[], gan_patience=2)
    assert row["status"] == Status.GAN_FAILED and "saturated" in row["gan_reason"]
    assert row["best_map"] == 0.1, "its student is still as good as its best epoch"
    plain = trial_row("t", {}, records, None, max_epochs=4, keys=[], gan_patience=0)
    assert plain["status"] == Status.STOPPED_EARLY and plain["gan_reason"] is None
