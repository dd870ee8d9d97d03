"""Prepare a detection dataset for training: ``gankd-prepare-data {synthetic,voc,coco,neon-trees} ... --out DIR``.

The command lives in ``gankd_ray/data/prepare.py`` (``--help`` of each subcommand lists its options).
"""

from gankd_ray.cli import entry
from gankd_ray.data.prepare import main

console_script = entry(main)
