#!/usr/bin/env python
"""Export one trial of a finished search (see gankd_ray/cli/export.py; installed as gankd-export)."""

import sys

from gankd_ray.cli import export, run

if __name__ == "__main__":
    sys.exit(run(export.main))
