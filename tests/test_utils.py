"""Small shared helpers."""

from __future__ import annotations

from pathlib import Path

from gankd_ray.utils import REPO_ROOT, repo_relative


def test_benchmark_results_name_paths_relative_to_the_repository():
    data = {
        "data": str(REPO_ROOT / "runs" / "x"),
        "runs": [{"teacher": f"{REPO_ROOT}/weights/t.pt"}],
        "elsewhere": "/data/coco",
        "sibling": f"{REPO_ROOT}-other/x",
        "n": 3,
    }
    assert repo_relative(data) == {
        "data": "runs/x",
        "runs": [{"teacher": "weights/t.pt"}],
        "elsewhere": "/data/coco",
        "sibling": f"{REPO_ROOT}-other/x",
        "n": 3,
    }
    assert repo_relative("/a/b/c", Path("/a/b")) == "c"
