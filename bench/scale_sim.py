"""A gankd-ray search at 8, 64 and 512 GPUs (one GPU per trial: concurrency = GPUs), without a Ray runtime.

Measured here: Tune's ASHAScheduler itself (``search_efficiency.asha_schedule``: its decisions and their CPU
time), ``build_sampler``'s TPE on search_spaces/default.yaml (ask/tell seconds after 100/500/2000 completed
trials with 8/64/512 running; the study's pickle, saved with every Tune snapshot), the default student's
checkpoint files (``engine.write_checkpoint`` after one real step), an epoch record's reported JSON, and the
memory of a bare process importing what each head-node actor imports. Assumed (``Assumptions``): learning
curves ``a * (1 - exp(-k * epoch)) + noise`` per trial, best so far as ``search.METRIC``; epoch times with
log-normal jitter; S3 requests per file. Curves are random, not TPE's: ASHA figures are the scheduler's.

Usage: python bench/scale_sim.py [--epoch-s 60] [--concurrency 8 64 512] [--out bench/results/scale_sim.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from search_efficiency import asha_schedule

from gankd_ray.ray_compat import HEAD_NODE_SHARE
from gankd_ray.tune.request import SearchRequest, default_grace_period
from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale_sim.json"
S3_PUT_PER_S, S3_GET_PER_S = 3500, 5500  # per prefix, S3's documented request rates
# Per running trial, on the head node (Ray 2.60 code + gankd_ray): process -> what it imports.
HEAD_PROCESSES = {
    # runs trial_driver, which builds the trainer (GankdTorchTrainer: no torch in the driver or the controller)
    "tune_trial_actor": "import ray.tune, ray.tune.integration.ray_train, gankd_ray.tune.search, gankd_ray.train.run, "
    "gankd_ray.ray_compat as c; c.GankdTorchTrainer",
    # Ray Train's controller, unpickling the run's backend config and callbacks
    "train_controller": "import ray.train.v2._internal.execution.controller.controller, gankd_ray.train.run, "
    "gankd_ray.ray_compat as c; c.TorchProcessGroup; c.PlacementGroupReaperCallback",
    "sync_actor": "import ray.train.v2._internal.execution.checkpoint.sync_actor",  # on the controller's node
    "placement_group_reaper": "import ray, gankd_ray.cluster",  # ours, detached, on the head
}
TUNE_FILES_PER_TRIAL = 5  # params.json, params.pkl, result.json, progress.csv, TensorBoard events
# An epoch record's keys (the engine's names): per distilled level, per run, COCOeval's figures.
LEVEL_TERMS = "disc/loss disc/real disc/fake disc/acc kd/adv".split()
RUN_TERMS = "grad_norm/disc det/classification det/bbox_regression loss/total grad_norm/student kd/adv_weight".split()
RUN_TERMS += "kd/noise_std kd/feat lr num_images num_detections".split()
COCO_FIGURES = "map ap50 ap75 ap_small ap_medium ap_large ar1 ar10 ar100 ar_small ar_medium ar_large".split()


@dataclasses.dataclass
class Assumptions:
    trials_per_gpu: int = 4  # budget: num_samples = 4 x concurrency
    max_t: int = 16
    reduction_factor: int = SearchRequest.reduction_factor
    epoch_s: float = 60.0  # one epoch on one GPU, train + eval
    epoch_jitter: float = 0.2  # sigma of the log-normal factor on each epoch's duration
    startup_s: float = 13.7  # trial start-up: bench/results/trial_startup.json (gankd, measured here)
    asymptote_mean: float = 0.30  # mAP a trial would reach with unlimited epochs
    asymptote_sd: float = 0.06
    rate_range: tuple[float, float] = (0.08, 0.5)  # k, per epoch
    noise_sd: float = 0.01  # per-epoch mAP noise
    part_mib: float = 10.0  # pyarrow's S3 multipart part size: bigger files take create + parts + complete
    put_latency_s: float = 0.03  # one small-object PUT, serial (Ray copies files with use_threads=False on S3)

    @property
    def grace_period(self) -> int:
        return default_grace_period(self.max_t)


def learning_curves(count: int, a: Assumptions, rng: np.random.Generator) -> np.ndarray:
    """(count, max_t) best-so-far mAP: saturating curves with per-trial asymptotes and rates, plus noise."""
    asymptote = np.clip(rng.normal(a.asymptote_mean, a.asymptote_sd, (count, 1)), 0.01, 1.0)
    rate = rng.uniform(*a.rate_range, (count, 1))
    noisy = asymptote * (1 - np.exp(-rate * np.arange(1, a.max_t + 1))) + rng.normal(0, a.noise_sd, (count, a.max_t))
    return np.maximum.accumulate(np.clip(noisy, 0, 1), axis=1)


def simulate_search(concurrency: int, a: Assumptions, seed: int = 0) -> dict:
    """One ASHA search of ``trials_per_gpu * concurrency`` trials: its rungs, epochs, best found and rates, and
    the same trials (curves, durations) through ASHA one at a time, the least asynchronous order."""
    rng = np.random.default_rng(seed)
    count = a.trials_per_gpu * concurrency
    scores = learning_curves(count, a, rng)
    durations = a.epoch_s * rng.lognormal(0, a.epoch_jitter, (count, a.max_t))
    durations[:, 0] += a.startup_s
    schedule = asha_schedule(scores, durations, a.grace_period, a.reduction_factor, concurrency, a.max_t)
    sequential = asha_schedule(scores, durations, a.grace_period, a.reduction_factor, 1, a.max_t)
    ran, ran_alone = np.array(schedule.epochs), np.array(sequential.epochs)
    busy_s = sum(durations[i, :n].sum() for i, n in enumerate(ran))
    return {
        "concurrency": concurrency,
        "trials": count,
        **asha_outcome(ran, scores, a),
        "one_at_a_time": asha_outcome(ran_alone, scores, a),
        "trials_cut_otherwise_than_one_at_a_time": int((ran != ran_alone).sum()),
        "wall_h": schedule.wall_s / 3600,
        "gpu_busy_share": float(busy_s / (concurrency * schedule.wall_s)),
        "epochs_per_min": float(ran.sum() * 60 / schedule.wall_s),
        "trials_started_per_min": float((count - concurrency) * 60 / schedule.wall_s),  # after the first wave
        "peak_trials_ended_per_min": float(np.bincount((np.array(schedule.ended) // 60).astype(int)).max()),
        "asha_decision_ms_per_result": 1000 * schedule.decision_s / ran.sum(),
    }


def asha_outcome(ran: np.ndarray, scores: np.ndarray, a: Assumptions) -> dict:
    """Trials reaching each rung (and the ideal count), the share of ``trials x max_t`` epochs used, and the best
    score found against the true best (each trial's score at max_t, what FIFO finds), in mAP points."""
    milestones = [m for m in (a.grace_period * a.reduction_factor**k for k in range(8)) if m <= a.max_t]
    full, found = scores[:, -1], scores[np.arange(len(ran)), ran - 1]
    return {
        "rungs": {str(m): int((ran >= m).sum()) for m in milestones},
        "rungs_ideal": {str(m): len(ran) / a.reduction_factor**k for k, m in enumerate(milestones)},
        "epochs_share": float(ran.sum() / (len(ran) * a.max_t)),
        "best_minus_true_best_points": float(100 * (found.max() - full.max())),
        "found_trial_true_rank": int((full > full[found.argmax()]).sum() + 1),
        "true_best_trial_epochs": int(ran[full.argmax()]),
    }


def time_optuna(completed=(100, 500, 2000), running=(8, 64, 512), repeats: int = 5, seed: int = 0) -> dict:
    """TPE ask (define-by-run) and tell seconds after ``completed`` trials (filled by a RandomSampler, same
    distributions) with ``running`` open ones (constant liar counts them; failed afterwards)."""
    import optuna

    from gankd_ray.tune.search import build_sampler
    from gankd_ray.tune.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(ROOT / "search_spaces" / "default.yaml")
    rng = np.random.default_rng(seed)
    randomly = optuna.samplers.RandomSampler(seed=seed)
    tpe = build_sampler(SimpleNamespace(request=SearchRequest(seed=seed, num_samples=max(completed))))
    study = optuna.create_study(direction="maximize", sampler=randomly)
    done, cells, state = 0, [], []

    def ask() -> optuna.Trial:
        trial = study.ask()
        space.sample(trial)
        return trial

    for target in sorted(completed):
        study.sampler = randomly
        for _ in range(target - done):
            study.tell(ask(), float(rng.uniform(0, 0.4)))
        done, pending = max(done, target), []
        for live in sorted(running):
            study.sampler = randomly
            pending += [ask() for _ in range(live - len(pending))]
            study.sampler = tpe
            asks = [timed(ask) for _ in range(repeats)]
            tells = [timed(study.tell, trial, float(rng.uniform(0, 0.4)))[1] for trial, _ in asks]
            done += repeats
            ask_s = statistics.median(seconds for _, seconds in asks)
            cells.append({"completed": target, "running": live, "ask_s": ask_s, "tell_s": statistics.median(tells)})
        for trial in pending:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        blob, seconds = timed(pickle.dumps, study)
        state.append({"completed": target, "pickle_bytes": len(blob), "pickle_s": seconds})
    params = study.get_trials(deepcopy=False)[-1].params  # Tune adds them to every result as "config"
    return {"cells": cells, "study_pickle": state, "params_json_bytes": len(json.dumps(params))}


def timed(call, *args):
    """``call(*args)`` and the seconds it took."""
    tick = time.perf_counter()
    return call(*args), time.perf_counter() - tick


def checkpoint_files(num_classes: int) -> dict[str, int]:
    """Bytes of each file ``engine.write_checkpoint`` writes for the default student and critics after one real
    train step (Adam's moments exist only after one), against the search's teacher (pipeline.TEACHER_BACKBONE)."""
    import torch

    from gankd_ray.config import DetectorConfig, RunConfig
    from gankd_ray.distill import build_step
    from gankd_ray.models import build_detector
    from gankd_ray.train.engine import write_checkpoint
    from gankd_ray.tune.pipeline import TEACHER_BACKBONE

    torch.manual_seed(0)
    cfg = RunConfig(detector=DetectorConfig(num_classes=num_classes))
    cfg.teacher = DetectorConfig(backbone=TEACHER_BACKBONE, num_classes=num_classes)
    step = build_step(cfg, build_detector(cfg.teacher).eval())
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])}] * 2
    step.train_step(torch.rand(2, 3, cfg.detector.image_size, cfg.detector.image_size), targets, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, step, cfg, 1, {})
        return {path.name: path.stat().st_size for path in sorted(Path(tmp).iterdir())}


def record_bytes() -> int:
    """JSON bytes of one realistic epoch record as reported (five distilled levels, COCO figures, an S3
    checkpoint)."""
    from gankd_ray.records import EpochRecord, RunContext, Status, Throughput

    terms = {f"{name}/level{i}": 0.123456789 for i in range(5) for name in LEVEL_TERMS}
    terms.update(dict.fromkeys(RUN_TERMS, 0.123456789))
    quality = dict.fromkeys(COCO_FIGURES, 0.123456789)
    record = EpochRecord(
        epoch=8, epochs=16, status=Status.RUNNING, quality=quality, terms=terms,
        throughput=Throughput(1, 812.345678, 118287, 118287, 140.123456, 20.123456),
        best_map=0.3, best_ap50=0.5, best_epoch=8, score=0.3, node="f" * 56, reported_at=time.time(),
        checkpoint="s3://bucket/searches/coco-gankd/trials/8d9c8a6e/checkpoint_2026-12-02_04-17-46.534480",
        context=RunContext(trial_id="8d9c8a6e", trial_started=time.time()),
    )  # fmt: skip
    return len(json.dumps(record.to_dict()))


def process_memory_mib() -> dict[str, dict[str, float]]:
    """Resident and anonymous (private: what each more process adds; shared libraries count once) memory of a
    fresh Python importing what each head-node process imports. No ray.init: a live Ray worker holds more."""
    probe = "{}; print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmRSS', 'RssAnon'))])"
    memory = {}
    for name, imports in HEAD_PROCESSES.items():
        out = subprocess.run([sys.executable, "-c", probe.format(imports)], capture_output=True, text=True, check=True)
        rss_kib, anon_kib = out.stdout.split()[-2:]
        memory[name] = {"rss_mib": int(rss_kib) / 1024, "anon_mib": int(anon_kib) / 1024}
    return memory


def load_figures(sim: dict, measured: dict, a: Assumptions) -> dict:
    """Per-minute head-node, searcher and S3 load of one simulated search, at steady state (every GPU busy)."""
    reports = sim["concurrency"] * 60 / (a.epoch_s * math.exp(a.epoch_jitter**2 / 2))  # epochs per minute
    cell = min(
        (c for c in measured["optuna"]["cells"] if c["running"] == sim["concurrency"]),
        key=lambda c: (c["completed"] < sim["trials"], abs(c["completed"] - sim["trials"])),
    )
    starts = sim["trials_started_per_min"]
    driver_s = starts * cell["ask_s"] + starts * cell["tell_s"] + reports * sim["asha_decision_ms_per_result"] / 1000
    part, files = a.part_mib * 2**20, measured["checkpoint_files"]
    puts = sum(1 if size <= part else math.ceil(size / part) + 2 for size in files.values())
    puts += 4  # directory marker, checkpoint_manager_snapshot.json, metrics.jsonl (whole), the replaced one's delete
    gets = 2  # the replaced checkpoint's listing, an existence check
    tune_files = 3 + TUNE_FILES_PER_TRIAL * sim["trials"]  # experiment state, searcher, tuner + trial dirs
    result_bytes = measured["record_bytes"] + measured["optuna"]["params_json_bytes"]
    anon_mib = sum(kind["anon_mib"] for kind in measured["process_memory_mib"].values())
    return {
        "epochs_per_min_steady": reports,
        "optuna_cell": f"{cell['completed']} completed, {cell['running']} running",
        "suggestions_needed_per_min": starts,
        "suggestions_possible_per_min": 60 / cell["ask_s"],
        "driver_busy_share": driver_s / 60,
        "head_processes": sim["concurrency"] * len(HEAD_PROCESSES),
        "head_private_gib_floor": sim["concurrency"] * anon_mib / 1024,
        "result_messages_per_min": 3 * reports,  # worker -> controller -> trial actor -> Tune driver
        "result_kib_per_min": 3 * reports * result_bytes / 1024,
        "controller_polls_per_s": sim["concurrency"] * 2,  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 0.5, one worker
        "reaper_pings_per_s": sim["concurrency"],  # one per second per run
        "head_resource_used": sim["concurrency"] * 2 * HEAD_NODE_SHARE,  # driver + reaper, of the head's 1.0
        "checkpoint_gib_per_min": reports * sum(files.values()) / 2**30,
        "s3_put_per_s": reports * puts / 60,
        "s3_get_per_s": reports * gets / 60,
        "s3_share_of_prefix_limits": max(reports * puts / 60 / S3_PUT_PER_S, reports * gets / 60 / S3_GET_PER_S),
        "tune_snapshot_files_at_end": tune_files,
        "tune_snapshot_upload_s_at_end": tune_files * a.put_latency_s,
        "epoch_s_where_driver_saturates": a.epoch_s * driver_s / 60,
        "epoch_s_where_s3_put_limit_hits": a.epoch_s * reports * puts / 60 / S3_PUT_PER_S,
    }


def print_table(rows: list[dict]) -> None:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "concurrency"]
    print(f"{'GPUs':>34}" + "".join(f"{row['concurrency']:>12}" for row in rows))
    for key in keys:
        print(f"{key:>34}" + "".join(f"{row[key]:>12.4g}" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--epoch-s", type=float, default=Assumptions.epoch_s, help="assumed seconds per epoch")
    parser.add_argument("--num-classes", type=int, default=80, help="the student's classes (checkpoint size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    a = Assumptions(epoch_s=args.epoch_s)
    measured = {
        "checkpoint_files": checkpoint_files(args.num_classes),
        "record_bytes": record_bytes(),
        "process_memory_mib": process_memory_mib(),
        "optuna": time_optuna(running=tuple(args.concurrency), seed=args.seed),
    }
    sims = [simulate_search(concurrency, a, args.seed) for concurrency in args.concurrency]
    rows = [{**sim, **load_figures(sim, measured, a)} for sim in sims]
    print_table(rows)
    print(json.dumps(measured))
    assumed = {**dataclasses.asdict(a), "grace_period": a.grace_period, "num_classes": args.num_classes}
    entry = {"benchmark": "scale_sim", "machine": machine_description(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_benchmark_json(args.out, {**entry, "assumptions": assumed, "measured": measured, "by_concurrency": rows})
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
