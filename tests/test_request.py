"""The search request: built once from the command line, saved as YAML, reloaded as it is by --resume, and a
saved one gives a new search its defaults (``--from``)."""

from __future__ import annotations

import os

import pytest

from gankd_ray.cli.search import parse_args, request_of
from gankd_ray.errors import InputError
from gankd_ray.tune.request import REQUEST_FILE, SearchRequest, load_request, save_request


def test_command_line_becomes_one_absolute_request(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = request_of(
        parse_args(
            [
                "--data",
                "data/x",
                "--storage",
                "runs",
                "--teacher",
                "t/model.pt",
                "--workers-per-trial",
                "2",
                "--cpus-per-worker",
                "0.5",
                "--smoke",
                "--sampler",
                "random",
                "optim.lr=0.01",
            ]
        )
    )
    assert request.data == str(tmp_path / "data/x") and request.teacher == str(tmp_path / "t/model.pt")
    assert request.storage == str(tmp_path / "runs") and os.path.isabs(request.space)
    assert (request.resources.workers, request.resources.cpus_per_worker) == (2, 0.5)
    assert (request.max_epochs, request.grace_period, request.num_samples) == (3, 1, 6), "--smoke applied once"
    assert request.sampler == "random" and request.overrides == ["optim.lr=0.01"]
    assert request_of(parse_args(["--max-epochs", "12"])).grace_period == 3, "a quarter of the budget"


def test_resume_reloads_the_saved_request_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = request_of(
        parse_args(
            [
                "--data",
                "d",
                "--storage",
                "runs",
                "--name",
                "exp",
                "--num-samples",
                "9",
                "--optuna-storage",
                "env:DB",
                "a.b=1",
            ]
        )
    )
    save_request(started)
    saved = (tmp_path / "runs" / "exp" / REQUEST_FILE).read_text()
    assert "num_samples: 9" in saved and "env:DB" in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths were resolved where the search started, not here
    resumed = request_of(parse_args(["--storage", str(tmp_path / "runs"), "--name", "exp", "--resume"]))
    assert resumed == started
    moved = tmp_path / "moved"
    (tmp_path / "runs").rename(moved)
    assert load_request(str(moved), "exp").storage == str(moved), "the experiment is where the user names it"


def test_a_saved_request_gives_a_new_search_its_defaults(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text(SearchRequest(data="/d", num_samples=20, seed=3, overrides=["optim.lr=0.01"]).to_yaml())
    request = request_of(parse_args(["--from", str(path), "--seed", "4"]))
    assert (request.data, request.num_samples, request.seed) == ("/d", 20, 4)
    assert request.overrides == ["optim.lr=0.01"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_samples: many\n", "num_samples='many': expected an integer"),
        ("resources: {gpus: 1}\n", "unknown key 'gpus'"),
        ("- a list\n", "top level must be a mapping"),
    ],
)
def test_bad_request_files_name_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        parse_args(["--from", str(path)])
    assert str(path) in str(caught.value)


def test_resume_of_a_search_saved_by_an_older_version_says_so(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "search.json").write_text("{}")
    with pytest.raises(InputError, match="older gankd-ray"):
        load_request(str(tmp_path), "old")


def test_concurrency_is_bounded_by_the_head_nodes_share_per_trial():
    from gankd_ray import ray_compat
    from gankd_ray.tune.search import SearchJob, concurrency_limit, head_node_limit

    job = SearchJob(base=None, space=None, teacher="t", request=SearchRequest(num_samples=10_000))
    cluster = {"CPU": 2048.0, "GPU": 0.0}  # room for 2048 one-CPU trials
    if ray_compat.hooks_active():  # drivers and reapers hold 0.001 of the head each
        assert head_node_limit() == 500 and concurrency_limit(job, cluster) == 500
    else:  # no head share asked for: only the CPUs bound it
        assert concurrency_limit(job, cluster) == 2048
