"""Small shared helpers: atomic file writes, machine description, bounded values in messages."""

from __future__ import annotations

import json
import os
import platform
import reprlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` via ``write(tmp_path)`` then rename, so readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_relative(data: Any, root: Path = REPO_ROOT) -> Any:
    """``data`` (JSON-like) with every string that is a path under ``root`` made relative to it, so results
    files name no machine's folders."""
    prefix = str(root).rstrip("/") + "/"
    if isinstance(data, str):
        return data[len(prefix) :] if data.startswith(prefix) else data
    if isinstance(data, dict):
        return {key: repo_relative(value, root) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [repo_relative(value, root) for value in data]
    return data


def write_benchmark_json(path: str | Path, data: Any) -> Path:
    """A benchmark's results file: paths under the repository relative to it, written atomically."""
    return atomic_write_json(path, repo_relative(data))


def machine_description() -> dict[str, Any]:
    """What benchmarks record about where they ran."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_kb"] = int(fh.readline().split()[1])
    except OSError:
        pass
    return info


def plain_value(value: Any) -> Any:
    """A numpy/pandas scalar as a plain Python value; NaN becomes None (for JSON cards and tables)."""
    import math

    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


SHORT_REPR_CHARS = 80
# Few items and levels: the repr of a value built from YAML aliases (shared sub-lists) stays small and fast.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
for _kind in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_SHORT_REPR, _kind, 4)
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = SHORT_REPR_CHARS
_SHORT_REPR.maxlong = 40


def short_repr(value: Any, limit: int = SHORT_REPR_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters: what error messages echo of a user's value."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


T = TypeVar("T")


class Registry(Generic[T]):
    """Named plug-ins of one kind (dataset sources, backbones), registered once at import."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        """Names in registration order."""
        return list(self._items)

    def get(self, name: str) -> T:
        """The item of ``name``; ``KeyError`` (one line) names the choices."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}") from None
