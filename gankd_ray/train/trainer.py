"""The TorchTrainer every run uses: Ray's, minus the Ray Data machinery when a run has no Ray Datasets.

Ray Train V2 starts a DatasetManager actor for every run, datasets or not. gankd-ray reads its parquet
shards itself, so that actor only costs a fresh Python process (importing ray.data) on each trial's start-up
path; on a 2-core machine with the other core busy, dropping it (and Ray Train's metrics callbacks, see
gankd_ray.cluster) cut the time from trial start to training function by a sixth (bench/trial_startup.py).
It relies on a private hook of Ray 2.60 (pinned in pyproject); tests/test_train_ray.py checks that no
DatasetManager actor is started, so an upgrade that moves the hook shows up as a test failure, not as a
silent slowdown.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


class GankdTorchTrainer(TorchTrainer):
    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]
