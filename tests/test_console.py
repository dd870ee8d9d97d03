"""What a search prints and how it judges the KD gain, without Ray: the per-epoch line, a single run's progress
followed from its metrics log, and the verdict rule of --confirm-seeds (the status table is checked on a real
search, tests/test_search.py)."""

from __future__ import annotations

import time

import pytest

from gankd_ray.records import EpochRecord, RecordLog, Status
from gankd_ray.train.run import ProgressFollower
from gankd_ray.tune.confirm import MIN_EFFECT, verdict_of
from gankd_ray.tune.console import epoch_line


def test_epoch_line_has_the_figures_a_user_wants():
    result = {"epoch": 2, "epochs": 8, "map": 0.01234, "ap50": 0.0456, "status": "running"}
    result.update({"disc/acc/level1": 0.9, "disc/acc/level2": 1.0, "disc/loss/level1": 0.3})
    line = epoch_line("ab12c_00003", result)
    assert line == (
        "[gankd-ray] trial ab12c_00003 epoch 2/8  val mAP 0.0123  AP50 0.0456  critic acc 0.9500  status running"
    )
    assert "critic acc -" in epoch_line("t", {"epoch": 1, "epochs": 2, "map": 0.0, "status": "running"})


def test_progress_follower_prints_each_new_epoch_once(tmp_path, capsys):
    run_dir = str(tmp_path / "teacher")
    log = RecordLog(run_dir)
    log.add(EpochRecord(epoch=1, epochs=3, status=Status.RUNNING, quality={"map": 0.1}))  # before: a resume
    with ProgressFollower(run_dir, 3, poll_s=0.05, heartbeat_s=0.2):
        time.sleep(0.4)
        log.add(EpochRecord(epoch=2, epochs=3, status=Status.RUNNING, quality={"map": 0.2}))
        log.add(EpochRecord(epoch=3, epochs=3, status=Status.COMPLETED, quality={"map": 0.3}))
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if "  map " in line]
    assert [line.split(":")[0] for line in epochs] == ["[gankd-ray] run teacher"] * 2
    assert "epoch 2/3" in epochs[0] and "epoch 3/3" in epochs[1] and "status completed" in epochs[1]
    assert any("epoch 2/3 running" in line for line in lines), lines  # the heartbeat while epoch 2 ran


@pytest.mark.parametrize(
    "kd, baseline, verdict",
    [
        ([0.30, 0.31, 0.32], [0.20, 0.21, 0.22], "helps"),
        ([0.20, 0.21, 0.22], [0.30, 0.31, 0.32], "hurts"),
        ([0.30, 0.20], [0.25, 0.24], "no_effect"),  # a gain within the seeds' spread
        ([0.10, 0.10], [0.10, 0.10], "no_effect"),  # no spread at all, no difference
        ([0.1 + MIN_EFFECT / 2] * 2, [0.1] * 2, "no_effect"),  # below 0.1 AP50 point whatever the spread
    ],
)
def test_verdict_rule(kd, baseline, verdict):
    result = verdict_of(kd, baseline)
    assert result.verdict == verdict, result
    assert f"{len(kd)} seeds)" in result.line()


def test_verdict_line_reads_in_ap50_points():
    line = verdict_of([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]).line()
    assert line == "GAN-KD helps: +10.0 +- 0.8 AP50 over no KD (3 seeds)"
