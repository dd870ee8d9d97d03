"""The Optuna study's database (``--optuna-storage``) without leaking its password.

A database URL may carry a password (``postgresql://user:pass@host/db``). Typed on the command line it is
visible in ``ps`` and in the dashboard's job view, and a search saves its options (``search.yaml``) and Tune
pickles the searcher (with Optuna's storage object, URL included) under the experiment. So the option also
takes a *reference* that is resolved only in memory:

- ``env:NAME``: the URL is the value of the environment variable ``NAME``;
- ``file:PATH``: the URL is the content of the file ``PATH`` (e.g. a mounted secret), first line.

Whatever the spelling, nothing the project writes holds a password: a reference is saved as the reference,
a literal URL with its password replaced by ``***`` (:func:`redact`), and the pickled storage carries the
same (:class:`ReferencedRDBStorage`). A search started with a literal password therefore needs
``--optuna-storage`` again on ``--resume``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna

from gankd_ray.errors import InputError

ENV_PREFIX = "env:"
FILE_PREFIX = "file:"
HIDDEN = "***"


class OptunaStorageError(InputError):
    """A reference that does not resolve, or a URL that needs its password again; one line."""


def is_reference(value: str) -> bool:
    return value.startswith((ENV_PREFIX, FILE_PREFIX)) and not value.startswith("file://")


def resolve(value: str) -> str:
    """The database URL that ``value`` (a URL or a reference) stands for."""
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX) :]
        if not os.environ.get(name):
            raise OptunaStorageError(f"--optuna-storage {value}: environment variable {name} is not set")
        return os.environ[name]
    if is_reference(value):
        path = Path(value[len(FILE_PREFIX) :]).expanduser()
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise OptunaStorageError(
                f"--optuna-storage {value}: cannot read {path} ({err.__class__.__name__})"
            ) from None
        if not text:
            raise OptunaStorageError(f"--optuna-storage {value}: {path} is empty")
        return text.splitlines()[0]
    if HIDDEN in value:
        raise OptunaStorageError(
            f"--optuna-storage {value}: the password was not saved; give --optuna-storage "
            "again (better: env:NAME or file:PATH)"
        )
    return value


def has_password(url: str) -> bool:
    return redact(url) != url


def redact(value: str) -> str:
    """``value`` with a URL's password replaced by ``***``; references and password-less URLs unchanged."""
    if is_reference(value) or "://" not in value:
        return value
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        return value
    return value if url.password is None else url.render_as_string(hide_password=True)  # password as ***


class ReferencedRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that pickles what the user gave (the reference, or the redacted URL), never the
    resolved URL: Tune saves the searcher, and with it this object, into the experiment folder."""

    def __init__(self, value: str):
        self._reference = value if is_reference(value) else redact(value)
        super().__init__(resolve(value))

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = None
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state["url"] = resolve(state["_reference"])
        super().__setstate__(state)


def open_storage(value: str | None) -> ReferencedRDBStorage | None:
    return None if not value else ReferencedRDBStorage(value)
