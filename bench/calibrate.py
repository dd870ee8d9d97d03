"""Train one configuration in a plain process (no Ray) and report loss / val mAP / AP50 per epoch.

The engine every run uses (``gankd_ray.train.engine.fit``), in this process (``LocalRuntime``), with no
Ray around it: used to calibrate what a few CPU minutes can learn (teacher vs
student, learning rate, warm-up, batch, epochs, dataset difficulty) before a search spends them.

Data: ``--data DIR`` (a prepared dataset), or ``--synthetic key=value ...`` (``SyntheticSpec``
fields, e.g. ``num_train=256 max_objects=4``): that set is generated once into ``--cache`` and reused.
``--train-limit N`` trains on the first N train images only, and ``--eval-on train`` scores those same
images (the overfit check: loss must fall and train mAP rise when the pipeline is sound).

Per epoch it prints the mean training loss terms, wall and CPU seconds (the main process's CPU time
does not move with the machine's other load; wall time does), and val mAP / AP50 / AP small / medium.
Writes (merges) ``bench/results/calibrate.json``: ``{"machine", "notes", "runs": {label: {config,
synthetic_spec, epochs: [...], final, train_s, cpu_s}}}``; a run of the same ``--label`` replaces the
older one.

Usage (the recommended teacher and student on the demo's 256/64/64 set)::

    python launch/prepare_weights.py --out weights
    python bench/calibrate.py --label teacher --synthetic num_train=256 num_val=64 num_test=64 \\
        --set role=teacher detector.backbone=mobilenet_v2 detector.weights=weights/mobilenet_v2-imagenet.pth \\
        optim.epochs=4 optim.batch_size=8
    python bench/calibrate.py --label student --synthetic num_train=256 num_val=64 num_test=64 \\
        --set role=student detector.backbone=mobilenet_v3_small optim.epochs=8 optim.batch_size=8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gankd_ray.cli import run
from gankd_ray.config import ConfigError, RunConfig, parse_overrides
from gankd_ray.data.loader import DetectionBatchLoader
from gankd_ray.data.reader import read_split
from gankd_ray.data.sources.synthetic import SyntheticSpec
from gankd_ray.errors import EXIT_OK, InputError, UserError
from gankd_ray.records import EpochRecord, Status
from gankd_ray.train.checkpoint import MODEL_FILE
from gankd_ray.train.engine import EpochData, LocalRuntime, fit
from gankd_ray.train.spec import Resources, TrainJob, resolve_job
from gankd_ray.utils import first_line, machine_description, write_benchmark_json

RESULTS = Path(__file__).resolve().parent / "results" / "calibrate.json"
DEFAULT_CACHE = Path("/tmp/gankd_calibrate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run in the results file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="prepared dataset folder")
    source.add_argument("--synthetic", nargs="*", metavar="KEY=VALUE", help="SyntheticSpec fields")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where --synthetic sets are kept")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RunConfig overrides")
    parser.add_argument("--teacher", help="teacher model.pt for role=gankd (GAN-KD diagnosis without Ray)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: what a search trial gets)")
    parser.add_argument("--loader-workers", type=int, default=1, help="background decoding processes")
    parser.add_argument("--train-limit", type=int, default=0, help="train on the first N images only (0 = all)")
    parser.add_argument("--eval-on", choices=("val", "train"), default="val", help="split scored each epoch")
    parser.add_argument("--eval-every", type=int, default=1, help="score every K-th epoch (and the last)")
    parser.add_argument("--save", type=Path, help="write the trained detector checkpoint (model.pt) here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def synthetic_spec(fields: list[str]) -> SyntheticSpec:
    """``SyntheticSpec`` with these ``key=value`` fields; the rest keep the generator's defaults."""
    values = parse_overrides(fields)
    known = {f.name for f in dataclasses.fields(SyntheticSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--synthetic {unknown[0]}: unknown field; choose from {', '.join(sorted(known))}")
    from gankd_ray.data.sources.synthetic import check_spec

    spec = SyntheticSpec(**values)
    check_spec(spec)  # before anything is generated
    return spec


def synthetic_dataset(spec: SyntheticSpec, cache: Path) -> str:
    """Generate (once) the synthetic set of ``spec`` under ``cache``; returns its folder."""
    from gankd_ray.data.records import Rejections
    from gankd_ray.data.sources.synthetic import GENERATOR_VERSION, synthetic_source_data
    from gankd_ray.data.writer import write_dataset

    params = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(spec)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / f"synthetic-{key}"
    if not (out / "dataset.json").exists():
        print(f"[calibrate] generating {spec} into {out}", flush=True)
        write_dataset(out, synthetic_source_data(spec), Rejections(), overwrite=True, log=lambda _: None)
    return str(out)


def resolve(args: argparse.Namespace, data: str) -> TrainJob:
    """The run as the product checks it (``resolve_job``: data, teacher, config, levels); role teacher unless
    ``--set role=...`` says otherwise."""
    cfg = RunConfig().with_overrides(["role=teacher", *args.set])
    cfg.data.path = data
    job = TrainJob(
        config=cfg,
        storage=str(args.cache),
        name=args.label,
        teacher=args.teacher,
        resources=Resources(cpus_per_worker=args.threads),
    )
    return resolve_job(job)


def build_data(cfg: RunConfig, args: argparse.Namespace) -> EpochData:
    """Train loader (optionally a prefix of the split) and the scored loader with its ground truth."""
    from gankd_ray.eval import coco_from_dict, load_coco

    size, batch, data = cfg.detector.image_size, cfg.optim.batch_size, cfg.data
    rows = read_split(data.path, data.train_split)
    if args.train_limit:
        rows = rows[: args.train_limit]
    train = DetectionBatchLoader(
        rows,
        size,
        batch,
        train=True,
        seed=cfg.seed,
        hflip=data.hflip,
        jitter=data.jitter,
        num_workers=args.loader_workers,
    )
    if args.eval_on == "train":
        ids = {int(row["image_id"]) for row in rows}
        scored = DetectionBatchLoader(rows, size, batch, train=False, num_workers=0)
        full = load_coco(data.path, data.train_split).dataset
        subset = {
            **full,
            "images": [i for i in full["images"] if i["id"] in ids],
            "annotations": [a for a in full["annotations"] if a["image_id"] in ids],
        }
        return EpochData(train, scored, coco_from_dict(subset))
    scored = DetectionBatchLoader.from_dataset(
        data.path, data.val_split, size, batch, train=False, seed=cfg.seed, num_workers=args.loader_workers
    )
    return EpochData(train, scored, load_coco(data.path, data.val_split))


class EpochRows:
    """The engine's reports as this benchmark's rows: wall and CPU seconds per epoch, the main terms, quality.

    Wall time is what a run costs but moves with the machine's other load; the main process's CPU time (all
    torch threads; decoding workers excluded) is the load-independent measure.
    """

    def __init__(self):
        self.rows: list[dict[str, Any]] = []
        self.train_s = self.cpu_s = 0.0
        self._cpu_mark = time.process_time()

    def add(self, record: EpochRecord) -> None:
        cpu_now = time.process_time()
        self.train_s += record.throughput.train_s
        self.cpu_s += cpu_now - self._cpu_mark
        self._cpu_mark = cpu_now
        if record.status is Status.DIVERGED:
            print(f"[calibrate] diverged in epoch {record.epoch}", flush=True)
            return
        terms = record.terms
        row = {
            "epoch": record.epoch,
            "epoch_s": round(record.throughput.train_s, 2),
            "train_s": round(self.train_s, 2),
            "cpu_s": round(self.cpu_s, 1),
            "loss": terms["loss/total"],
            "cls": terms["det/classification"],
            "box": terms["det/bbox_regression"],
            "lr": terms["lr"],
        }
        if record.map is not None:
            row.update(
                {key: record.quality[key] for key in ("map", "ap50", "ap_small", "ap_medium")},
                eval_s=round(record.throughput.eval_s, 2),
            )
        self.rows.append(row)
        print(_epoch_line(row), flush=True)


def train(job: TrainJob, args: argparse.Namespace) -> dict[str, Any]:
    """The engine (``gankd_ray.train.engine.fit``) in this process, scoring every ``--eval-every`` epoch."""
    rows = EpochRows()
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        runtime = LocalRuntime(checkpoint_dir if args.save else None, on_report=rows.add)
        records = fit(job, runtime, data=build_data(job.config, args), eval_every=args.eval_every)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(checkpoint_dir, MODEL_FILE), args.save)
    scored = [row for row in rows.rows if "map" in row]
    status = records[-1].status.value if records else Status.ERROR.value
    return {
        "status": status,
        "train_s": round(rows.train_s, 2),
        "cpu_s": round(rows.cpu_s, 1),
        "epochs": rows.rows,
        "final": scored[-1] if scored else {},
        "best_ap50": max((r["ap50"] for r in scored), default=0.0),
    }


def _epoch_line(row: dict[str, Any]) -> str:
    line = (
        f"epoch {row['epoch']:3d}  loss {row['loss']:.3f} (cls {row['cls']:.3f} box {row['box']:.3f})  "
        f"lr {row['lr']:.2e}  {row['epoch_s']:.1f}s (total {row['train_s']:.1f}s, cpu {row['cpu_s']:.0f}s)"
    )
    if "map" in row:
        line += (
            f"  mAP {row['map']:.3f}  AP50 {row['ap50']:.3f} (small {row['ap_small']:.3f} "
            f"medium {row['ap_medium']:.3f})  eval {row['eval_s']:.1f}s"
        )
    return line


def save_result(path: Path, label: str, entry: dict[str, Any]) -> None:
    """Merge ``entry`` under ``label`` into the results file (written atomically)."""
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["machine"] = machine_description()
    results["runs"][label] = entry
    write_benchmark_json(path, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        spec = None if args.data else synthetic_spec(args.synthetic)
        data = args.data if args.data else synthetic_dataset(spec, args.cache)
        job = resolve(args, data)
    except UserError:
        raise
    except (TypeError, ValueError) as err:  # a --synthetic field of the wrong type
        raise InputError(first_line(err), flag="--synthetic") from None
    print(f"[calibrate] {args.label}: {' '.join(args.set)} on {data}", flush=True)
    result = train(job, args)
    entry = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "data": data,
        "synthetic": args.synthetic,
        "synthetic_spec": dataclasses.asdict(spec) if spec else None,
        "overrides": args.set,
        "teacher": args.teacher,
        "threads": args.threads,
        "train_limit": args.train_limit,
        "eval_on": args.eval_on,
        "config": job.config.to_dict(),
        **result,
    }
    save_result(args.out, args.label, entry)
    final = result["final"]
    print(
        f"[calibrate] {args.label}: train {result['train_s']:.0f}s  "
        f"mAP {final.get('map', float('nan')):.3f}  AP50 {final.get('ap50', float('nan')):.3f}",
        flush=True,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run(main))
