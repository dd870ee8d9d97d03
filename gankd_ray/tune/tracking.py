"""Experiment tracking: every trial of a search as an MLflow run, through Tune's own ``MLflowLoggerCallback``.

``--mlflow`` takes a tracking URI (a server, ``sqlite:///...``) or a local folder, which becomes the SQLite store
``<folder>/mlflow.db`` (MLflow's recommended local backend: its plain-file store is in maintenance mode and refused
by default since MLflow 3; view it with ``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``). The callback
runs in the search's driver, so a local store works on one machine; on a cluster it is on the driver's machine, and
a tracking server is the usual choice. Runs are named after the trials and grouped in an MLflow experiment named
after the search; parameters are the trial's sampled configuration, metrics every reported epoch (val mAP, AP50,
losses, critic diagnostics). mlflow (``mlflow-skinny``) is the optional ``tracking`` extra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from gankd_ray import storage
from gankd_ray.errors import InputError

if TYPE_CHECKING:
    from gankd_ray.tune.search import SearchJob

INSTALL_HINT = "pip install 'gankd-ray[tracking]'"
LOCAL_STORE_FILE = "mlflow.db"


def tracking_uri(value: str) -> str:
    """The MLflow tracking URI of ``--mlflow``'s value: a URI as given, a local folder as its SQLite store."""
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).resolve() / LOCAL_STORE_FILE}"


def check_mlflow(value: str) -> None:
    """Before any Ray work: mlflow importable, and a local store's folder writable (servers are not contacted
    here, and nothing is created)."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise InputError(f"--mlflow {value}: mlflow is not installed ({INSTALL_HINT})") from None
    if "://" not in value:
        try:
            storage.check_writable(value)
        except OSError as err:
            raise InputError(f"--mlflow: {err}") from None


def tracking_callbacks(job: SearchJob) -> list:
    """The Tune callbacks the request asks for (none without ``--mlflow``)."""
    if not job.request.mlflow:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    if "://" not in job.request.mlflow:
        Path(job.request.mlflow).mkdir(parents=True, exist_ok=True)
    for name in ("mlflow", "alembic"):  # their INFO lines (database set-up) are not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(job.request.mlflow)
    print(f"[gankd-ray] MLflow: every trial is a run of experiment {job.name!r} at {uri}", flush=True)
    tags = {"gankd_ray.experiment": job.experiment_dir, "gankd_ray.sampler": job.request.sampler}
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=job.name, tags=tags)]
