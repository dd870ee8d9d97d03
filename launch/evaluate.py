#!/usr/bin/env python
"""COCO mAP / AP50 of an exported student (see gankd_ray/cli/evaluate.py; installed as gankd-evaluate)."""

import sys

from gankd_ray.cli import evaluate, run

if __name__ == "__main__":
    sys.exit(run(evaluate.main))
