"""What a search was asked to do (``SearchRequest``): built once from the command line, saved beside the
experiment as ``search.yaml``, and reloaded as it is by ``--resume``.

Every location in a request is absolute (local paths resolved against the directory the search started in,
URIs normalised), so a saved request means the same thing from any directory. The same YAML can start a new
search (``gankd-search --from search.yaml``): its values become the command line's defaults, and the flags
given override them. Where to connect (``--address``, the dashboard) is never saved: a resume takes it from
its own command line, and so a password of ``--optuna-storage`` (only a redacted URL, or an ``env:``/``file:``
reference, is saved).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gankd_ray import storage
from gankd_ray.config import from_plain, load_yaml
from gankd_ray.distill.health import DEFAULT_PATIENCE
from gankd_ray.errors import InputError
from gankd_ray.train.spec import Resources
from gankd_ray.utils import first_line

REQUEST_FILE = "search.yaml"
DEFAULT_DATA = "data/synthetic"
DEFAULT_STORAGE = "runs"
DEFAULT_NAME = "default"
DEFAULT_SPACE = str(Path(__file__).resolve().parents[2] / "search_spaces" / "default.yaml")
# ``--smoke``: the smallest search that shows every feature (ASHA cuts after one epoch of three).
SMOKE = {"num_samples": 6, "max_epochs": 3, "grace_period": 1, "reduction_factor": 2, "teacher_epochs": 3}
# request fields whose CLI flag has another name
RESOURCE_FLAGS = {
    "workers": "workers_per_trial",
    "cpus_per_worker": "cpus_per_worker",
    "gpus_per_worker": "gpus_per_worker",
}


def default_grace_period(max_epochs: int) -> int:
    """ASHA's first cut at a quarter of the budget: after one epoch from-scratch students all sit near mAP 0
    and distillation terms slow the first epochs, so an earlier cut ranks noise (bench/search_efficiency.py)."""
    return max(1, max_epochs // 4)


@dataclass
class SearchRequest:
    """Every option of a search but where to connect; the flags of ``gankd-search`` by the same names."""

    data: str = DEFAULT_DATA
    storage: str = DEFAULT_STORAGE
    name: str = DEFAULT_NAME
    teacher: str | None = None  # None: train one (reused next time)
    teacher_epochs: int = 4
    teacher_weights: str = "imagenet"
    space: str = DEFAULT_SPACE
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 6
    max_epochs: int = 8
    scheduler: str = "asha"
    sampler: str = "tpe"
    grace_period: int | None = None  # None: default_grace_period(max_epochs)
    reduction_factor: int = 2
    max_concurrent: int | None = None
    gan_patience: int = DEFAULT_PATIENCE  # epochs of an ended adversarial game before its trial stops (0: never)
    resources: Resources = field(default_factory=Resources)  # of each trial
    seed: int = 0
    optuna_storage: str | None = None
    # after the search, retrain the best configuration and the no-KD baseline with this many fresh seeds each
    # and judge the KD gain (gankd_ray.tune.confirm); 0: off
    confirm_seeds: int = 0
    # "map" or "map,latency": with latency, the searcher looks for the accuracy/latency front (gankd_ray.tune.pareto)
    objectives: str = "map"
    pick: str = "map"  # which trial best/ is: the highest val mAP, or the highest within a budget (latency_ms<=5)
    mlflow: str | None = None  # MLflow tracking URI: every trial becomes an MLflow run (gankd_ray.tune.tracking)
    smoke: bool = False

    def resolved(self) -> SearchRequest:
        """A copy with ``--smoke`` and the defaults applied and every location absolute."""
        request = dataclasses.replace(
            self, overrides=list(self.overrides), resources=dataclasses.replace(self.resources)
        )
        if request.smoke:
            request.num_samples = max(request.num_samples, SMOKE["num_samples"])
            request.max_epochs, request.grace_period = SMOKE["max_epochs"], SMOKE["grace_period"]
            request.reduction_factor = SMOKE["reduction_factor"]
            request.teacher_epochs = min(request.teacher_epochs, SMOKE["teacher_epochs"])
            request.smoke = False  # applied: a request started --from this one keeps these values, not re-smoked
        if request.grace_period is None:
            request.grace_period = default_grace_period(request.max_epochs)
        for name in ("data", "storage", "teacher", "space", "config"):
            value = getattr(request, name)
            if value:
                setattr(request, name, storage.normalize_uri(value))
        if request.mlflow and "://" not in request.mlflow:  # a local store's folder, found from any working dir
            request.mlflow = os.path.abspath(request.mlflow)
        if request.teacher_weights not in ("imagenet", "none"):
            request.teacher_weights = os.path.abspath(request.teacher_weights)
        return request

    @property
    def experiment_dir(self) -> str:
        return storage.join(storage.normalize_uri(self.storage), self.name)

    # ----------------------------------------------------------------------------------------
    # as YAML, and as a command line's defaults

    def to_yaml(self) -> str:
        from gankd_ray.tune.optuna_storage import redact

        plain = dataclasses.asdict(self)
        plain["optuna_storage"] = redact(self.optuna_storage) if self.optuna_storage else None
        return yaml.safe_dump(plain, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str) -> SearchRequest:
        try:
            plain = load_yaml(text)
        except yaml.YAMLError as err:
            raise InputError(f"{where}: invalid YAML: {first_line(err)}") from None
        if not isinstance(plain, dict):
            raise InputError(f"{where}: not a gankd-ray search request (top level must be a mapping)")
        return from_plain(cls, plain, where)

    def cli_defaults(self) -> dict[str, Any]:
        """This request as ``argparse`` defaults (``parser.set_defaults(**...)``)."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resources"}
        plain.update({flag: getattr(self.resources, name) for name, flag in RESOURCE_FLAGS.items()})
        return plain

    @classmethod
    def from_cli(cls, args: Any) -> SearchRequest:
        """The request a parsed command line (``argparse.Namespace`` with the flags' names) asks for."""
        names = {f.name for f in dataclasses.fields(cls)} - {"resources"}
        resources = Resources(**{name: getattr(args, flag) for name, flag in RESOURCE_FLAGS.items()})
        return cls(resources=resources, **{name: getattr(args, name) for name in names})


# --------------------------------------------------------------------------------------------
# beside the experiment


def save_request(request: SearchRequest) -> None:
    """Keep what was asked so ``--resume`` continues the same search from ``--storage``/``--name`` alone."""
    storage.write_text(storage.join(request.experiment_dir, REQUEST_FILE), request.to_yaml())


def load_request(storage_uri: str, name: str) -> SearchRequest:
    """The request an experiment was started with (``InputError`` when there is no such experiment)."""
    experiment_dir = storage.join(storage.normalize_uri(storage_uri), name)
    path = storage.join(experiment_dir, REQUEST_FILE)
    if not storage.exists(path):
        older = storage.exists(storage.join(experiment_dir, "search.json"))
        hint = " (it was started by an older gankd-ray, which saved search.json: resume it with that version)"
        raise InputError(
            f"--resume: no experiment named {name!r} in {storage_uri} ({path} is missing)" + (hint if older else "")
        )
    check_trusted_experiment(experiment_dir)
    request = SearchRequest.from_yaml(storage.read_text(path), where=path)
    # The folder the user names now is the experiment, wherever it was when the search started; resolving is
    # idempotent for what a search saved, and fills the defaults of a request written by hand.
    return dataclasses.replace(request, storage=storage.normalize_uri(storage_uri), name=name).resolved()


def check_trusted_experiment(experiment_dir: str) -> None:
    """``--resume`` unpickles Tune's experiment and searcher state from the experiment folder, and unpickling
    can run code: refuse a local folder (or any file in it) that another user owns or that group or others
    may write. Object storage has no owners to check: there, write access to the experiment's prefix is trust
    (README)."""
    if not storage.is_local(experiment_dir):
        return
    root = storage.local_path(experiment_dir)
    for path in [root, *root.rglob("*")]:
        status = path.lstat()
        if status.st_uid != os.getuid():
            raise InputError(
                f"--resume: {path} belongs to uid {status.st_uid}, not to you (uid {os.getuid()}); "
                "resuming unpickles state from this folder, which can run code: refused"
            )
        if status.st_mode & 0o022 and not path.is_symlink():
            raise InputError(
                f"--resume: {path} is writable by others (mode {status.st_mode & 0o777:o}); resuming "
                "unpickles state from this folder, which can run code: refused (chmod go-w it)"
            )
