#!/usr/bin/env python
"""Prepare a detection dataset for training:
``python launch/prepare_data.py {synthetic,voc,coco,neon-trees} ... --out DIR``.

See ``gankd_ray/data/prepare.py`` (``--help`` of each subcommand lists its options; installed as
``gankd-prepare-data``).
"""

import sys

from gankd_ray.cli import prepare_data, run

if __name__ == "__main__":
    sys.exit(run(prepare_data.main))
