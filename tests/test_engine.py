"""The Ray-free engine and the records it reports: ``fit`` in a plain process, resumed from its checkpoint, and
the record schema's flat form (what metrics.jsonl, Ray and Tune see)."""

from __future__ import annotations

import json
import math

import pytest

from gankd_ray.config import RunConfig
from gankd_ray.records import (
    EpochRecord,
    RecordLog,
    RunContext,
    Status,
    Throughput,
    best_record,
    read_metrics,
    read_records,
    summarize,
)
from gankd_ray.train.engine import LocalRuntime, fit
from gankd_ray.train.spec import Resources, TrainJob, resolve_job

TINY = ["detector.backbone=mobilenet_v2_0.35", "optim.batch_size=8", "data.loader_workers=0"]


def _job(data: str, tmp_path, epochs: int, role: str = "student", teacher: str | None = None) -> TrainJob:
    config = RunConfig().with_overrides([*TINY, f"role={role}", f"optim.epochs={epochs}", f"data.path={data}"])
    return resolve_job(
        TrainJob(
            config=config,
            storage=str(tmp_path / "runs"),
            name="local",
            teacher=teacher,
            resources=Resources(cpus_per_worker=1),
        )
    )


def test_fit_in_a_plain_process_then_resumes_from_its_checkpoint(synthetic_data, tmp_path):
    """Two epochs, scored; a second fit with the same checkpoint folder and one more epoch trains only epoch 3."""
    checkpoints = str(tmp_path / "ckpt")
    seen: list[EpochRecord] = []
    first = fit(_job(synthetic_data, tmp_path, 2), LocalRuntime(checkpoints, on_report=seen.append))
    assert [r.epoch for r in first] == [1, 2] and seen == first
    assert [r.status for r in first] == [Status.RUNNING, Status.COMPLETED]
    for record in first:
        assert 0.0 <= record.map <= record.ap50 <= 1.0 and math.isfinite(record.terms["loss/total"])
        assert record.throughput.train_images == 48 and record.throughput.world_size == 1
    assert first[0].worker_started_at is not None and first[0].first_step_at >= first[0].worker_started_at
    assert first[1].worker_started_at is None, "start-up is accounted on the first epoch only"
    best = max(first, key=lambda r: (r.map, r.epoch))
    assert first[1].best_map == best.map and first[1].best_epoch == best.epoch
    assert [r.score for r in first] == [r.best_map for r in first], "the searcher sees the best so far"

    resumed = fit(_job(synthetic_data, tmp_path, 3), LocalRuntime(checkpoints))
    assert [r.epoch for r in resumed] == [3] and resumed[0].status is Status.COMPLETED
    assert resumed[0].best_map >= first[1].best_map, "the best so far travels with the checkpoint"


def test_eval_every_scores_only_the_asked_epochs(synthetic_data, tmp_path):
    records = fit(_job(synthetic_data, tmp_path, 3), LocalRuntime(), eval_every=2)
    assert [r.map is not None for r in records] == [False, True, True]  # epoch 2, and the last
    assert records[0].best_map is None and records[0].status is Status.RUNNING


def test_gankd_fit_reports_distillation_terms(synthetic_data, untrained_teacher, tmp_path):
    (record,) = fit(_job(synthetic_data, tmp_path, 1, role="gankd", teacher=untrained_teacher), LocalRuntime())
    assert any(key.startswith("disc/") for key in record.terms), sorted(record.terms)
    assert record.status is Status.COMPLETED


def test_record_flat_form_round_trips_and_drops_non_finite():
    record = EpochRecord(
        epoch=2,
        epochs=4,
        status=Status.DIVERGED,
        quality={"map": 0.0, "ap50": 0.0},
        terms={"loss/total": float("nan"), "lr": 1e-3},
        throughput=Throughput(world_size=2),
        best_map=0.1,
        best_epoch=1,
        context=RunContext(trial_id="abc_00001", trial_started=1.5),
    )
    flat = record.to_dict()
    assert flat["status"] == "diverged" and flat["trial_id"] == "abc_00001" and flat["world_size"] == 2
    assert "loss/total" not in flat and "checkpoint" not in flat, "non-finite and unset fields are left out"
    json.dumps(flat)  # plain data
    back = EpochRecord.from_dict(flat)
    assert back.status is Status.DIVERGED and back.context == record.context and back.terms == {"lr": 1e-3}
    assert back.to_dict() == flat


def test_record_log_replaces_epochs_a_resumed_run_reports_again(tmp_path):
    def record(epoch: int, map_: float, status: Status = Status.RUNNING) -> EpochRecord:
        return EpochRecord(
            epoch=epoch, epochs=3, status=status, quality={"map": map_, "ap50": map_}, checkpoint=f"ckpt{epoch}"
        )

    RecordLog(str(tmp_path)).add(record(1, 0.2))
    RecordLog(str(tmp_path)).add(record(2, 0.1))
    resumed = RecordLog(str(tmp_path))  # a restart that reports epoch 2 again
    resumed.add(record(2, 0.3))
    resumed.add(record(3, 0.3, Status.COMPLETED))
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    records = read_records(str(tmp_path))
    assert best_record(records).checkpoint == "ckpt3", "ties go to the later epoch (the checkpoint Ray keeps)"
    summary = summarize(str(tmp_path))
    assert (summary.status, summary.epochs_done, summary.best_map, summary.checkpoint) == (
        Status.COMPLETED,
        3,
        0.3,
        "ckpt3",
    )
    assert summarize(str(tmp_path / "absent")).status is Status.ERROR


@pytest.mark.parametrize(
    "status, ended",
    [(Status.RUNNING, False), (Status.COMPLETED, True), (Status.DIVERGED, True), (Status.STOPPED_EARLY, False)],
)
def test_status_is_the_plain_word(status, ended):
    assert status == status.value and str(status) == status.value and status.ended is ended


def test_a_run_that_measures_cost_reports_the_students_latency_on_every_record(synthetic_data, tmp_path):
    import dataclasses

    job = dataclasses.replace(_job(synthetic_data, tmp_path, 2), measure_cost=True)
    records = fit(job, LocalRuntime())
    costs = {(r.cost.latency_ms, r.cost.student_params, r.cost.student_gflops) for r in records}
    assert len(records) == 2 and len(costs) == 1  # measured once, carried by every record
    latency, params, gflops = costs.pop()
    assert latency > 0 and gflops > 0 and params == sum(p.numel() for p in _student(job).parameters())
    assert records[0].cost.latency_threads >= 1 and "latency_ms" in records[0].to_dict()
    assert EpochRecord.from_dict(records[0].to_dict()).cost == records[0].cost
    assert fit(_job(synthetic_data, tmp_path / "plain", 1), LocalRuntime())[0].cost.latency_ms is None


def _student(job):
    from gankd_ray.models import build_detector

    return build_detector(job.config.detector)
