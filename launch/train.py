#!/usr/bin/env python
"""Train one detector on Ray Train: a teacher, a no-KD student baseline, or a GAN-KD student.

Example:
    python launch/train.py --role teacher --data data/synthetic --epochs 6 --workers 2 \
        --storage runs --name teacher detector.backbone=mobilenet_v2

The command is ``gankd_ray/cli/train.py`` (installed as ``gankd-train``).
"""

import sys

from gankd_ray.cli import run, train

if __name__ == "__main__":
    sys.exit(run(train.main))
