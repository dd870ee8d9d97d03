"""Dataset sources: each turns some input (a generator, VOC folders, a COCO file...) into records.

A source is a name, a function adding its CLI options to an argparse subparser, and a loader
``load(args, rejections) -> SourceData``. ``launch/prepare_data.py`` makes one subcommand per
registered source, so a new source (neon-trees) is one module plus one ``register_source`` call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from gankd_ray.data.records import Rejections, SourceData
from gankd_ray.utils import Registry


@dataclass(frozen=True)
class DatasetSource:
    """A registered source.

    Attributes:
        name: the CLI subcommand and ``dataset.json["source"]``.
        help: one line for ``--help``.
        add_arguments: adds the source's own options (the common ``--out`` etc. are added for it).
        load: builds the records from parsed arguments; reports invalid items to ``rejections``.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    load: Callable[[argparse.Namespace, Rejections], SourceData]


_SOURCES: Registry[DatasetSource] = Registry("dataset source")


def register_source(source: DatasetSource) -> DatasetSource:
    return _SOURCES.add(source.name, source)


def available_sources() -> list[str]:
    return _SOURCES.names()


def get_source(name: str) -> DatasetSource:
    try:
        return _SOURCES.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


# Registration order is the order of the CLI's subcommands.
from gankd_ray.data.sources import synthetic, voc, coco, neon_trees  # noqa: E402, F401, I001
