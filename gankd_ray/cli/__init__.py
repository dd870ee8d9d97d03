"""The commands (``gankd-search``, ``gankd-train``, ...), one module each; ``launch/`` holds thin scripts over them.

Every command's ``main(argv) -> int`` raises ``gankd_ray.errors.UserError`` for what the user can fix;
``run`` turns that into one ``error:`` line on stderr and the error's exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from gankd_ray.errors import UserError
from gankd_ray.utils import first_line

Main = Callable[[list[str] | None], int | None]


def run(main: Main, argv: list[str] | None = None) -> int:
    """Run a command's ``main``; a ``UserError`` becomes its one-line message and exit status."""
    try:
        return main(argv) or 0
    except UserError as err:
        _stop_ray()  # Ray forwards the workers' tracebacks asynchronously: stop it so the error line comes last
        print(f"error: {first_line(err)}", file=sys.stderr)
        return err.exit_code


def entry(main: Main) -> Callable[[], None]:
    """A ``[project.scripts]`` entry point for ``main``."""

    def console_script() -> None:
        sys.exit(run(main))

    return console_script


def _stop_ray() -> None:
    ray = sys.modules.get("ray")  # only when this command started it: importing Ray costs seconds
    if ray is not None and ray.is_initialized():
        ray.shutdown()
