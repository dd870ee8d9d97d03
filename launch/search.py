#!/usr/bin/env python
"""Search GAN-KD hyperparameters with Ray Tune + Optuna (TPE) + ASHA, then export the best student
(``gankd-search``; ``--help`` for the options)."""

import sys

from gankd_ray.cli import run, search

if __name__ == "__main__":
    sys.exit(run(search.main))
