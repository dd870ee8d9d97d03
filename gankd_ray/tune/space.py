"""Declarative search spaces (``search_spaces/*.yaml``) and their Optuna define-by-run sampler.

A space file::

    base:                      # fixed RunConfig overrides shared by every trial (dotted keys)
      optim.batch_size: 16
    params:                    # the searched (or fixed) hyperparameters, by product key
      adv_weight: {type: loguniform, low: 0.01, high: 1.0}
      disc_norm: {type: categorical, choices: [none, spectral]}
      levels: {type: categorical, choices: [all, [level0, level1], [level2, level3, level4]]}
      adv_loss: {type: categorical, choices: [lsgan, wgan, wgan-gp]}
      clip: {type: loguniform, low: 0.01, high: 0.1, when: {adv_loss: wgan}}
      n_critic: 1              # a plain value fixes the parameter

Parameter types: ``loguniform``/``uniform`` (floats, ``low < high``, loguniform needs ``low > 0``),
``int`` (``low <= high``, optional ``log``), ``categorical`` (non-empty ``choices``). ``when`` makes a
parameter conditional on other parameters' values, so it only exists in the trials where it matters
(Optuna's define-by-run API keeps such spaces consistent for TPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gankd_ray.config import ConfigError, RunConfig, load_yaml
from gankd_ray.utils import SHORT_REPR_CHARS, first_line, short_repr

# product key -> RunConfig dotted path
PARAM_PATHS: dict[str, str] = {
    "adv_weight": "distill.adv_weight",
    "adv_loss": "distill.adv_loss",
    "adv_warmup_epochs": "distill.adv_warmup_epochs",
    "clip": "distill.clip",
    "gp_weight": "distill.gp_weight",
    "n_critic": "distill.n_critic",
    "lr_ratio": "distill.lr_ratio",
    "levels": "distill.levels",
    "head_mode": "distill.head_mode",
    "feat_weight": "distill.feat_weight",
    "match_activation": "distill.match_activation",
    "standardize": "distill.standardize",
    "instance_noise": "distill.instance_noise",
    "instance_noise_epochs": "distill.instance_noise_epochs",
    "r1_weight": "distill.r1_weight",
    "update": "distill.update",
    "disc_depth": "discriminator.depth",
    "disc_width": "discriminator.width",
    "disc_norm": "discriminator.norm",
    "disc_output": "discriminator.output",
    "lr": "optim.lr",
    "optimizer": "optim.optimizer",
    "betas": "optim.betas",  # a fixed [beta1, beta2] (choices must be scalars)
    "disc_betas": "optim.disc_betas",
    "weight_decay": "optim.weight_decay",
    "batch_size": "optim.batch_size",
    # the student's architecture, for accuracy/latency searches (--objectives map,latency)
    "backbone": "detector.backbone",
}
PARAM_TYPES = ("loguniform", "uniform", "int", "categorical")
ALL_LEVELS = "all"


class SpaceError(ConfigError):
    """A space file is invalid; the message names the file and the key."""


@dataclass
class Param:
    key: str
    type: str  # one of PARAM_TYPES, or "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] = field(default_factory=list)
    value: Any = None
    when: dict[str, list[Any]] = field(default_factory=dict)

    def active(self, sampled: dict[str, Any]) -> bool:
        return all(key in sampled and sampled[key] in allowed for key, allowed in self.when.items())


@dataclass
class SearchSpace:
    params: list[Param]
    base: dict[str, Any]
    source: str

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def sample(self, trial) -> dict[str, Any] | None:
        """Optuna define-by-run: suggest every active parameter; fixed values are returned as constants."""
        sampled: dict[str, Any] = {}
        constants: dict[str, Any] = {}
        for param in self.params:
            if not param.active({**sampled, **constants}):
                continue
            if param.type == "fixed":
                constants[param.key] = param.value
            else:
                sampled[param.key] = _suggest(trial, param)
        return constants or None

    def to_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Trial hyperparameters (product keys) -> RunConfig dotted overrides, base first."""
        overrides = dict(self.base)
        for key, value in params.items():
            if key in PARAM_PATHS:
                overrides[PARAM_PATHS[key]] = decode_levels(value) if key == "levels" else value
        return overrides

    def fixed_values(self) -> dict[str, Any]:
        return {p.key: p.value for p in self.params if p.type == "fixed"}


def _suggest(trial, param: Param) -> Any:
    if param.type == "loguniform":
        return trial.suggest_float(param.key, param.low, param.high, log=True)
    if param.type == "uniform":
        return trial.suggest_float(param.key, param.low, param.high)
    if param.type == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), log=param.log)
    return trial.suggest_categorical(param.key, param.choices)


def encode_levels(value: Any, where: str = "levels") -> str:
    """Optuna choices must be scalars: ``[level0, level2]`` -> ``"level0+level2"``; ``all`` stays."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(level, str) for level in value):
        raise SpaceError(f"{where}: {short_repr(value)} is not 'all' or a list of level names")
    return "+".join(value)


def decode_levels(value: Any) -> list[str]:
    if isinstance(value, list):
        return value
    return [] if value == ALL_LEVELS else value.split("+")


# --------------------------------------------------------------------------------------------
# loading and validation


def load_space(path: str | Path, config: RunConfig | None = None, level_names: list[str] | None = None) -> SearchSpace:
    """Parse and check a space file; every problem raises ``SpaceError`` naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: space file not found")
    try:
        data = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise SpaceError(f"{path}: cannot read the space file ({first_line(err)})") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: invalid YAML: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: top level must be a mapping with 'params' (and optional 'base')")
    unknown = sorted(set(data) - {"base", "params", "description"}, key=str)
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key {short_repr(unknown[0])} (expected base, params, description)")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpaceError(f"{path}: 'params' must be a non-empty mapping")
    params = [_parse_param(path, key, spec) for key, spec in raw_params.items()]
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SpaceError(f"{path}: 'base' must be a mapping of dotted config keys")
    space = SearchSpace(params=params, base=dict(base), source=str(path))
    _check_conditions(path, space)
    if level_names is not None:
        _check_levels(path, space, level_names)
    _check_against_config(path, space, config or RunConfig())
    return space


def _parse_param(path: Path, key: str, spec: Any) -> Param:
    if key not in PARAM_PATHS:
        # YAML keys are scalars, so str() is cheap; cut, since the key is the user's.
        raise SpaceError(
            f"{path}: params.{str(key)[:SHORT_REPR_CHARS]}: unknown parameter (known: {', '.join(PARAM_PATHS)})"
        )
    where = f"{path}: params.{key}"
    if not isinstance(spec, dict):
        value = encode_levels(spec, where) if key == "levels" else spec
        return Param(key=key, type="fixed", value=value)
    unknown = sorted(set(spec) - {"type", "low", "high", "log", "choices", "when", "value"}, key=str)
    if unknown:
        raise SpaceError(f"{where}: unknown field {short_repr(unknown[0])}")
    kind = spec.get("type")
    when = _parse_when(where, spec.get("when"))
    if kind == "fixed" or (kind is None and "value" in spec):
        value = spec.get("value")
        return Param(key=key, type="fixed", value=encode_levels(value, where) if key == "levels" else value, when=when)
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{where}: type {short_repr(kind)} must be one of {', '.join(PARAM_TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: categorical needs a non-empty 'choices' list")
        if key == "levels":
            choices = [encode_levels(c, where) for c in choices]
        if any(isinstance(c, (list, dict)) for c in choices):
            raise SpaceError(f"{where}: choices must be plain values")
        return Param(key=key, type=kind, choices=choices, when=when)
    low, high = _number(where, "low", spec.get("low")), _number(where, "high", spec.get("high"))
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"{where}: int range needs integer low/high, got {low}..{high}")
    if low > high or (kind != "int" and low == high):
        raise SpaceError(f"{where}: empty or inverted range low={low} high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):  # bool("no") is True
        raise SpaceError(f"{where}: 'log' must be true or false, got {short_repr(log)}")
    if (kind == "loguniform" or log) and low <= 0:
        raise SpaceError(f"{where}: log range needs low > 0, got {low}")
    return Param(key=key, type=kind, low=low, high=high, log=log, when=when)


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where}: '{name}' must be a finite number, got {short_repr(value)}")
    return float(value)


def _parse_when(where: str, when: Any) -> dict[str, list[Any]]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise SpaceError(f"{where}: 'when' must map parameter names to a value or list of values")
    return {k: (v if isinstance(v, list) else [v]) for k, v in when.items()}


def _check_conditions(path: Path, space: SearchSpace) -> None:
    seen: set[str] = set()
    for param in space.params:
        for key in param.when:
            if key not in seen:
                raise SpaceError(
                    f"{path}: params.{param.key}: 'when' refers to {short_repr(key)}, which must be listed before it"
                )
        seen.add(param.key)


def _check_levels(path: Path, space: SearchSpace, level_names: list[str]) -> None:
    for param in space.params:
        if param.key != "levels":
            continue
        for choice in param.choices or [param.value]:
            bad = [lvl for lvl in decode_levels(choice) if lvl not in level_names]
            if bad:
                raise SpaceError(
                    f"{path}: params.levels: {short_repr(bad[0])} is not a level of the detector "
                    f"({', '.join(level_names)})"
                )


def _check_against_config(path: Path, space: SearchSpace, config: RunConfig) -> None:
    """Every value a trial could get must make a valid RunConfig: catches wrong types and bad choices.

    Raises ``ConfigError`` (not ``SpaceError``) when ``config`` is invalid before the space touches it:
    then the culprit is the base config or its overrides (e.g. ``optim.lr=0``), not the space file.
    """
    _validate_searched_sections(config)
    try:
        base_cfg = config.with_overrides(space.base)
    except ConfigError as err:
        raise SpaceError(f"{path}: base: {err}") from None
    for param in space.params:
        for value in _probe_values(param):
            overrides = space.to_overrides({param.key: value})
            overrides = {k: v for k, v in overrides.items() if k not in space.base}
            try:
                _validate_searched_sections(base_cfg.with_overrides(overrides))
            except ConfigError as err:
                raise SpaceError(f"{path}: params.{param.key}: {err}") from None


def _validate_searched_sections(config: RunConfig) -> None:
    config.distill.validate()
    config.discriminator.validate()
    config.optim.validate()


def _probe_values(param: Param) -> list[Any]:
    if param.type == "fixed":
        return [param.value]
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        return [int(param.low), int(param.high)]
    return [param.low, param.high]
