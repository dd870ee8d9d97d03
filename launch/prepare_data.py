#!/usr/bin/env python
"""Prepare a detection dataset for training: ``python launch/prepare_data.py {synthetic,voc,coco,neon-trees} ... --out DIR``.

See ``gankd_ray/data/prepare.py`` (``--help`` of each subcommand lists its options).
"""

import sys

from gankd_ray.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
