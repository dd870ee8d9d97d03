"""``card.json``: what an export is, built in one place for the search's ``best/`` and ``gankd-export``.

Fields (``None`` where unknown; keys the caller has no value for are absent):

- the trial (:func:`trial_card`): ``trial_id``, ``hyperparameters`` (``{key: value}``), ``val_map``,
  ``val_ap50``, ``best_epoch``, ``status``; and the search's references when known: ``teacher`` (its
  model location), ``baseline_val_map`` (the no-KD student), ``teacher_val_map``;
- the model (:func:`model_card`, from the exported model file): ``backbone``, ``image_size``,
  ``num_classes``, ``head_mode`` (``own`` unless a GAN-KD student reuses the teacher's head), ``dataset``,
  ``classes`` (category id ``k`` is ``classes[k - 1]``; absent when the dataset cannot be read),
  ``parameters``, ``exported`` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from gankd_ray.utils import plain_value

# The search-level figures a trial's card repeats, so an export can be judged on its own.
REFERENCE_KEYS = ("teacher", "baseline_val_map", "teacher_val_map", "kd_verdict")


def trial_card(
    trial: Mapping[str, Any], hyperparameters: Sequence[str], references: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The card fields of a search trial.

    Args:
        trial: its ``trials.parquet`` row (``trial_id``, ``best_map``, ``best_ap50``, ``best_epoch``,
            ``status`` and one value per hyperparameter).
        hyperparameters: the keys of the search space.
        references: ``REFERENCE_KEYS`` values (other keys are ignored).
    """
    card = {
        "trial_id": str(trial["trial_id"]),
        "hyperparameters": {key: plain_value(trial.get(key)) for key in hyperparameters},
        "val_map": plain_value(trial.get("best_map")),
        "val_ap50": plain_value(trial.get("best_ap50")),
        "best_epoch": plain_value(trial.get("best_epoch")),
        "status": plain_value(trial.get("status")),
    }
    # an accuracy/latency search's measurement of this trial's student, and whether it is on the front
    measured = {key: plain_value(trial.get(key)) for key in ("latency_ms", "latency_threads", "is_pareto")}
    card.update({key: value for key, value in measured.items() if value is not None})
    references = references or {}
    card.update({key: plain_value(references[key]) for key in REFERENCE_KEYS if key in references})
    return card


def model_card(detector, config, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` (e.g. :func:`trial_card`'s) plus what the model file says about the model."""
    card = {
        **fields,
        "arch": config.detector.arch,
        "backbone": config.detector.backbone,
        "image_size": config.detector.image_size,
        "num_classes": config.detector.num_classes,
        "head_mode": config.distill.head_mode if config.role == "gankd" else "own",
        "dataset": config.data.path,
        "parameters": sum(p.numel() for p in detector.parameters()),
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    classes = dataset_classes(config.data.path)
    if classes and "classes" not in card:
        card["classes"] = classes
    return card


def class_names(card: Mapping[str, Any], config=None) -> list[str] | None:
    """Class names (category id k -> names[k-1]): the card's ``classes``, else the training dataset's."""
    if isinstance(card.get("classes"), list):
        return [str(c) for c in card["classes"]]
    path = card.get("dataset") or (config.data.path if config is not None else None)
    return dataset_classes(path)


def dataset_classes(path: str | None) -> list[str] | None:
    """``classes`` of the prepared dataset at ``path``, or ``None`` when it is not reachable."""
    if not path:
        return None
    from gankd_ray.data import read_dataset_info

    try:
        classes = read_dataset_info(path).get("classes")
    except Exception:  # the names are a nicety; the dataset may live elsewhere
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None
