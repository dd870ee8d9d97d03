#!/usr/bin/env python
"""Search GAN-KD hyperparameters with Ray Tune + Optuna (TPE) + ASHA, then export the best student.

With no arguments: the embedded default (a local Ray, the synthetic dataset prepared if absent, a
teacher trained first and reused next time, a no-KD baseline, then a small default search).
On a cluster: --address auto --data s3://... --storage s3://... --teacher CKPT --space FILE.
The command is ``gankd_ray/cli/search.py`` (installed as ``gankd-search``).
"""

import sys

from gankd_ray.cli import run, search

if __name__ == "__main__":
    sys.exit(run(search.main))
