"""Data sources: resolve a stage's dataset to a shard folder or a mixture.

The kind of source is `data._target_` (a `DataSource` class): `ShardSource` reads converted
shard folders, `ShapesSource` generates the synthetic shapes data on demand. A new kind is one
class (in any module) plus one `conf/data/<name>.yaml` naming it; nothing here changes. Sources
take the typed data group (`vlmlab.schema.DataConfig`), never the raw config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypedDict

from vlmlab.data.mixture import Source, parse_sources
from vlmlab.data.remote import as_location
from vlmlab.data.shapes import ShapesSpec, generate
from vlmlab.data.shards import MANIFEST, write_shards
from vlmlab.errors import ConfigError
from vlmlab.schema import DataConfig

log = logging.getLogger(__name__)

SHAPE_SETS = ("align", "instruct", "text")


class ResolvedDataset(TypedDict):
    """What a stage trains on and evaluates against, as a source resolved it."""

    shard_dir: Path | str | None  # None when `sources` (a mixture) is set; str: a URL (remote.py)
    sources: list[Source] | None
    heldout: Path | None  # held-out records (image, question, answer), if the source has any
    image_root: Path | None  # where `heldout`'s images live
    prepare: Callable[[], Any] | None  # makes the data exist (generation); run once, rank 0
    synthetic_root: Path | None  # the generated data the synthetic benchmarks are built from


class DataSource(Protocol):
    """A data-source kind: built from the `data` group, resolves `stage.dataset`."""

    def resolve(self, dataset: str) -> ResolvedDataset: ...

    def set_dir(self, name: str, key: str) -> Path | str:
        """Shard folder of `data.sets.<name>` (`key` names the config key in errors); a string
        for a URL, brace pattern or pipe: command (`remote.as_location`)."""
        ...


def data_source(data_cfg: DataConfig) -> DataSource:
    """The `DataSource` class `data._target_` names, built from the data group."""
    from hydra.utils import get_object

    target = data_cfg._target_
    if not target:
        raise ConfigError(
            "data._target_",
            "missing.",
            "name a DataSource class (vlmlab.data.prepare.ShardSource).",
        )
    try:
        cls = get_object(str(target))
    except Exception as err:  # any import failure is a config problem here
        raise ConfigError("data._target_", f"cannot import {target!r} ({err}).") from err
    source: DataSource = cls(data_cfg)
    return source


class ShardSource:
    """`data.sets.<name>` are shard folders written by `vlmlab shards`; `data.heldout` a JSON."""

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg

    def set_dir(self, name: str, key: str) -> Path | str:
        shard_dir = as_location(_set_name(self.cfg, name, key))
        if not isinstance(shard_dir, Path):  # remote: checked when its manifest is read
            return shard_dir
        if not (shard_dir / MANIFEST).is_file() and not any(shard_dir.glob("*.tar")):
            raise ConfigError(
                f"data.sets.{name}",
                f"{shard_dir} has no {MANIFEST} and no *.tar shards.",
                "convert the data to shards first (vlmlab shards).",
            )
        return shard_dir

    def resolve(self, dataset: str) -> ResolvedDataset:
        sources = mixture_sources(self.cfg, dataset, self)
        heldout = self.cfg.heldout
        return {
            "shard_dir": None if sources is not None else self.set_dir(dataset, "stage.dataset"),
            "sources": sources,
            "heldout": Path(heldout) if isinstance(heldout, str) and heldout else None,
            "image_root": None,
            "prepare": None,
            "synthetic_root": None,
        }


class ShapesSource:
    """The synthetic coloured shapes (`data.generator`), generated on first use."""

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg

    def set_dir(self, name: str, key: str) -> Path:
        return shapes_dir(self.cfg) / "shards" / _set_name(self.cfg, name, key)

    def resolve(self, dataset: str) -> ResolvedDataset:
        sources = mixture_sources(self.cfg, dataset, self)
        root = shapes_dir(self.cfg)
        return {
            "shard_dir": None if sources is not None else self.set_dir(dataset, "stage.dataset"),
            "sources": sources,
            "heldout": root / "heldout.json",
            "image_root": root / "images",
            "prepare": lambda: ensure_shapes(self.cfg),
            "synthetic_root": root,
        }


def shapes_spec(data_cfg: DataConfig) -> ShapesSpec:
    """`data.generator` as the generator's spec."""
    if data_cfg.generator is None:
        raise ConfigError(
            "data.generator",
            "is missing.",
            "give the synthetic set's sizes (see conf/data/shapes.yaml).",
        )
    return ShapesSpec(**asdict(data_cfg.generator))


def shapes_dir(data_cfg: DataConfig) -> Path:
    return Path(data_cfg.root).resolve() / f"shapes-{shapes_spec(data_cfg).fingerprint()}"


def ensure_shapes(data_cfg: DataConfig) -> Path:
    """Generate images, LLaVA JSON and shards once per generator spec; safe to call concurrently."""
    spec = shapes_spec(data_cfg)
    return build_synthetic(
        shapes_dir(data_cfg),
        lambda tmp: generate(spec, tmp),
        SHAPE_SETS,
        int(data_cfg.samples_per_shard),
    )


def build_synthetic(
    target: Path,
    generate_into: Callable[[Path], dict[str, Path]],
    set_names: Iterable[str],
    samples_per_shard: int,
) -> Path:
    """A synthetic data set (images, LLaVA JSON, shards of `set_names`) at `target`, built once.

    Safe to call concurrently: each process builds in its own temporary folder and the first
    rename wins; `DONE` marks a complete folder."""
    if (target / "DONE").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    paths = generate_into(tmp)
    for set_name in set_names:
        records = json.loads(paths[set_name].read_text())
        write_shards(records, tmp / "images", tmp / "shards" / set_name, samples_per_shard)
    (tmp / "DONE").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _set_name(data_cfg: DataConfig, name: str, key: str) -> str:
    """`data.sets.<name>`, or a ConfigError naming the sets there are."""
    sets = data_cfg.sets or {}
    if name not in sets:
        raise ConfigError(
            key, f"{name!r} is not a set of data={data_cfg.name}.", f"use one of {sorted(sets)}."
        )
    return str(sets[name])


def mixture_sources(data_cfg: DataConfig, dataset: str, source: DataSource) -> list[Source] | None:
    """`data.mixtures.<dataset>` as Sources, or None when the dataset is a plain set."""
    mixtures = data_cfg.mixtures or {}
    if dataset not in mixtures:
        return None
    key = f"data.mixtures.{dataset}"
    entries = mixtures[dataset]
    if not isinstance(entries, list):
        raise ConfigError(
            key, f"got {entries!r}.", "give a list of {name, set|path, weight|count}."
        )
    given = [  # the keys an entry states (unset fields are None in the typed entry)
        {k: v for k, v in asdict(e).items() if v is not None} if not isinstance(e, dict) else e
        for e in entries
    ]
    return parse_sources(given, key, lambda name: source.set_dir(name, key))


def resolve_dataset(data_cfg: DataConfig, dataset: str) -> ResolvedDataset:
    """Shard folder (or mixture sources) for `stage.dataset`, plus held-out file and image root.

    `data.mixtures.<dataset>`, when present, replaces `data.sets.<dataset>` for training.
    """
    return data_source(data_cfg).resolve(dataset)
