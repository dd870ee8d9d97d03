"""--optuna-storage without leaking a password: references resolved in memory only, literal URLs redacted in
everything saved, and the storage object Tune pickles carrying neither the URL nor its password."""

from __future__ import annotations

import pickle

import optuna
import pytest

from gankd_ray.tune.optuna_storage import OptunaStorageError, ReferencedRDBStorage, has_password, redact, resolve
from gankd_ray.tune.request import SearchRequest


def test_redact_hides_only_the_password():
    assert redact("postgresql://gankd:s3cret@db.example:5432/study") == "postgresql://gankd:***@db.example:5432/study"
    assert redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    assert redact("env:DB_URL") == "env:DB_URL" and redact("file:/run/secrets/db") == "file:/run/secrets/db"
    assert has_password("mysql://u:p@h/d") and not has_password("sqlite:///x.db")


def test_saved_requests_keep_no_password():
    saved = SearchRequest(optuna_storage="postgresql://u:s3cret@h/d", seed=1).to_yaml()
    assert "s3cret" not in saved and "postgresql://u:***@h/d" in saved
    back = SearchRequest.from_yaml(saved, where="search.yaml")
    assert back.optuna_storage == "postgresql://u:***@h/d" and back.seed == 1
    assert "env:DB" in SearchRequest(optuna_storage="env:DB").to_yaml(), "a reference is kept as it is"


def test_references_resolve_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GANKD_DB", "sqlite:///from-env.db")
    assert resolve("env:GANKD_DB") == "sqlite:///from-env.db"
    (tmp_path / "db.txt").write_text("sqlite:///from-file.db\n")
    assert resolve(f"file:{tmp_path}/db.txt") == "sqlite:///from-file.db"
    with pytest.raises(OptunaStorageError, match="GANKD_NOPE is not set"):
        resolve("env:GANKD_NOPE")
    with pytest.raises(OptunaStorageError, match="give --optuna-storage again"):
        resolve("postgresql://u:***@h/d")


def test_the_pickled_storage_holds_the_reference_not_the_url(tmp_path, monkeypatch):
    secret_dir = tmp_path / "s3cret-location"
    secret_dir.mkdir()
    monkeypatch.setenv("GANKD_DB", f"sqlite:///{secret_dir}/study.db")
    storage = ReferencedRDBStorage("env:GANKD_DB")
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    blob = pickle.dumps(storage)
    assert b"s3cret-location" not in blob and b"env:GANKD_DB" in blob
    restored = pickle.loads(blob)  # resolves the reference again, in memory
    assert len(optuna.load_study(study_name="s", storage=restored).trials) == 2
