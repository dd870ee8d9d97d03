#!/usr/bin/env python
"""Prepare a detection dataset for training: ``python launch/prepare_data.py {synthetic,voc,coco,neon-trees} ... --out DIR``.

See ``gankd_ray/data/prepare.py`` (``--help`` of each subcommand lists its options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gankd_ray.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
