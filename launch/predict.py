#!/usr/bin/env python
"""Detect objects in image files with an exported student (see gankd_ray/cli/predict.py; installed as gankd-predict)."""

import sys

from gankd_ray.cli import predict, run

if __name__ == "__main__":
    sys.exit(run(predict.main))
