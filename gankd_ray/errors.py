"""The errors a user can fix, and the exit status each one ends a command with.

Library code raises a ``UserError`` subclass whose message names the value at fault (a file, a key, a URI);
the command that received the value adds the flag it came from (``err.under("--data")``), and
``gankd_ray.cli.run`` prints the one line and exits with the error's ``exit_code``. Everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import copy

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # refused before any work: a file, flag or value is wrong
EXIT_DIVERGED = 3  # the run ended with a non-finite loss (a training outcome, not an exception)
EXIT_STORAGE = 4  # storage filled up or stopped answering during the run; rerunning resumes


class UserError(Exception):
    """An error the user can fix; its message is one line that names the culprit."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, flag: str | None = None):
        super().__init__(message)
        self.message = message
        self.flag = flag

    def __str__(self) -> str:
        return f"{self.flag}: {self.message}" if self.flag else self.message

    def under(self, flag: str) -> UserError:
        """The same error attributed to the command-line option ``flag`` (an existing flag is kept)."""
        if self.flag:
            return self
        attributed = copy.copy(self)
        attributed.flag = flag
        return attributed


class InputError(UserError, ValueError):
    """Bad input found before any work starts."""


class ConfigError(InputError):
    """A config value, key or file is invalid."""


class StorageFailure(UserError, OSError):
    """The run's storage filled up, hit its quota or stopped answering while the run wrote to it."""

    exit_code = EXIT_STORAGE
