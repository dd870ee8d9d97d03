"""The command seam (``gankd_ray.errors`` + ``gankd_ray.cli``): error kinds to exit statuses, one stderr line,
flag attribution, and the entry points (``[project.scripts]``, ``launch/*.py``). Fast: no Ray is started."""

from __future__ import annotations

import ast
import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gankd_ray import errors
from gankd_ray.cli import entry, run
from gankd_ray.config import ConfigError, RunConfig
from gankd_ray.data import DatasetError
from gankd_ray.train.checkpoint import CheckpointError
from gankd_ray.train.run import InputError, StorageFullError, TrainJob, resolve_job, storage_full_error
from gankd_ray.tune.optuna_storage import OptunaStorageError
from gankd_ray.tune.space import SpaceError
from gankd_ray.wheels import WheelDownloadError

ROOT = Path(__file__).resolve().parents[1]
OWN_COMMANDS = ("search", "train", "prepare_data", "prepare_weights", "export", "evaluate", "predict")


def raising(err: BaseException):
    def main(argv):
        raise err

    return main


# every kind of error a command raises -> the exit status it ends with
ERROR_KINDS = [
    (errors.InputError("bad value"), errors.EXIT_BAD_INPUT),
    (ConfigError("optim.lr=0: must be > 0"), errors.EXIT_BAD_INPUT),
    (SpaceError("space.yaml: params.lr: inverted range"), errors.EXIT_BAD_INPUT),
    (DatasetError("data/x/dataset.json: file not found"), errors.EXIT_BAD_INPUT),
    (CheckpointError("t.pt: checkpoint not found"), errors.EXIT_BAD_INPUT),
    (OptunaStorageError("--optuna-storage env:X: environment variable X is not set"), errors.EXIT_BAD_INPUT),
    (WheelDownloadError("pip download pkg==1 failed: no network"), errors.EXIT_BAD_INPUT),
    (errors.StorageFailure("--storage s3://b/runs: storage failed during the run"), errors.EXIT_STORAGE),
    (StorageFullError("--storage runs: no space left while writing runs/x"), errors.EXIT_STORAGE),
]


@pytest.mark.parametrize("err, status", ERROR_KINDS, ids=[type(err).__name__ for err, _ in ERROR_KINDS])
def test_the_runner_maps_each_error_kind_to_its_exit_status_with_one_line(err, status, capsys) -> None:
    assert run(raising(err), []) == status
    captured = capsys.readouterr()
    assert captured.err == f"error: {err}\n" and captured.out == ""


def test_the_runner_prints_only_the_first_line_and_passes_results_through(capsys) -> None:
    assert run(raising(ConfigError("run.yaml: invalid YAML: line 3\n  detail\n  more")), []) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: run.yaml: invalid YAML: line 3\n"
    assert run(lambda argv: None, []) == errors.EXIT_OK
    assert run(lambda argv: errors.EXIT_DIVERGED, []) == errors.EXIT_DIVERGED  # an outcome, not an exception
    seen = []
    run(seen.append, ["--x", "1"])
    assert seen == [["--x", "1"]]


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(KeyError):
        run(raising(KeyError("not a user error")), [])


def test_the_library_classes_keep_their_old_bases() -> None:
    """``except ValueError`` / ``except OSError`` written against the old classes still catch them."""
    for cls in (ConfigError, SpaceError, DatasetError, CheckpointError, OptunaStorageError, InputError):
        assert issubclass(cls, errors.InputError) and issubclass(cls, ValueError)
    assert issubclass(WheelDownloadError, errors.UserError) and issubclass(WheelDownloadError, RuntimeError)
    assert issubclass(StorageFullError, errors.StorageFailure) and issubclass(StorageFullError, OSError)
    assert InputError is errors.InputError and ConfigError is errors.ConfigError


def test_under_adds_the_flag_once_and_keeps_the_kind() -> None:
    err = DatasetError("data/x: file not found")
    attributed = err.under("--data")
    assert str(attributed) == "--data: data/x: file not found" and attributed.message == "data/x: file not found"
    assert type(attributed) is DatasetError and attributed.exit_code == errors.EXIT_BAD_INPUT
    assert str(err) == "data/x: file not found", "under() changed the original"
    assert str(attributed.under("--teacher")) == "--data: data/x: file not found", "the first flag is kept"
    full = StorageFullError("runs: no space left").under("--storage")
    assert str(full) == "--storage: runs: no space left" and full.exit_code == errors.EXIT_STORAGE


def test_checks_name_the_value_and_the_command_adds_the_flag(tmp_path: Path) -> None:
    """A real pre-Ray check: the dataset error names the location, the flag comes from the caller."""
    config = RunConfig()
    config.role, config.data.path = "student", str(tmp_path / "no_dataset")
    with pytest.raises(DatasetError) as raised:
        resolve_job(TrainJob(config=config, storage=str(tmp_path / "runs"), name="x"))
    assert raised.value.flag == "--data" and not raised.value.message.startswith("--data")
    assert str(raised.value).startswith("--data: ") and str(tmp_path / "no_dataset") in str(raised.value)


def test_a_full_disk_during_a_run_becomes_exit_4(capsys) -> None:
    raised = OSError(errno.ENOSPC, "No space left on device")
    full = storage_full_error(raised, "/runs", "/runs/x")
    assert isinstance(full, StorageFullError)
    assert run(raising(full), []) == errors.EXIT_STORAGE
    assert capsys.readouterr().err.startswith("error: --storage /runs: no space left while writing /runs/x")
    assert storage_full_error(ValueError("something else"), "/runs", "/runs/x") is None


# --------------------------------------------------------------------------------------------
# entry points


def project_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_project_declares_the_commands() -> None:
    scripts = project_scripts()
    for name in OWN_COMMANDS:
        assert scripts[f"gankd-{name.replace('_', '-')}"] == f"gankd_ray.cli.{name}:console_script"


@pytest.mark.parametrize("script", sorted(project_scripts()))
def test_every_console_script_imports_and_answers_help(script: str, monkeypatch, capsys) -> None:
    module_name, _, attribute = project_scripts()[script].partition(":")
    console_script = getattr(importlib.import_module(module_name), attribute)
    assert callable(console_script)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        console_script()
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_entry_exits_with_the_status_of_run(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gankd-x"])
    with pytest.raises(SystemExit) as exited:
        entry(raising(StorageFullError("runs: full")))()
    assert exited.value.code == errors.EXIT_STORAGE


def thin_script_shape(name: str) -> list[str]:
    """What a thin launch script holds besides its docstring, statement by statement."""
    return [
        "import sys",
        f"from gankd_ray.cli import {', '.join(sorted(['run', name]))}",
        f"if __name__ == '__main__':\n    sys.exit(run({name}.main))",
    ]


@pytest.mark.parametrize("script", sorted((ROOT / "launch").glob("*.py")), ids=lambda path: path.stem)
def test_every_launch_script_is_thin(script: Path) -> None:
    assert (ROOT / "gankd_ray" / "cli" / f"{script.stem}.py").is_file(), "every launch script is a command's"
    source = script.read_text()
    assert "sys.path" not in source and "noqa" not in source
    body = ast.parse(source).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), "no docstring"
    assert [ast.unparse(statement) for statement in body[1:]] == thin_script_shape(script.stem)


@pytest.mark.parametrize("name", OWN_COMMANDS)
def test_launch_scripts_answer_help_from_any_directory(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"usage: {name}.py")
