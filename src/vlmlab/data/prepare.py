"""Resolve a stage's dataset to a shard folder or a mixture, generating the synthetic shapes data on demand."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmlab.data.mixture import Source, parse_sources
from vlmlab.data.shapes import ShapesSpec, generate
from vlmlab.data.shards import MANIFEST, write_shards
from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

SHAPE_SETS = ("align", "instruct", "text")


def shapes_dir(data_cfg: DictConfig) -> Path:
    spec = ShapesSpec(**data_cfg.generator)
    return Path(data_cfg.root).resolve() / f"shapes-{spec.fingerprint()}"


def ensure_shapes(data_cfg: DictConfig) -> Path:
    """Generate images, LLaVA JSON and shards once per generator spec; safe to call concurrently."""
    target = shapes_dir(data_cfg)
    if (target / "DONE").is_file():
        return target
    spec = ShapesSpec(**data_cfg.generator)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    paths = generate(spec, tmp)
    for set_name in SHAPE_SETS:
        records = json.loads(paths[set_name].read_text())
        write_shards(
            records, tmp / "images", tmp / "shards" / set_name, int(data_cfg.samples_per_shard)
        )
    (tmp / "DONE").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _set_dir(data_cfg: DictConfig, name: str, key: str) -> Path:
    """Shard folder of `data.sets.<name>`."""
    sets = data_cfg.get("sets") or {}
    if name not in sets:
        raise ConfigError(
            key, f"{name!r} is not a set of data={data_cfg.name}.", f"use one of {sorted(sets)}."
        )
    if data_cfg.name == "shapes":
        return shapes_dir(data_cfg) / "shards" / sets[name]
    shard_dir = Path(sets[name])
    if not (shard_dir / MANIFEST).is_file() and not any(shard_dir.glob("*.tar")):
        raise ConfigError(
            f"data.sets.{name}",
            f"{shard_dir} has no {MANIFEST} and no *.tar shards.",
            "convert the data to shards first (vlmlab shards).",
        )
    return shard_dir


def mixture_sources(data_cfg: DictConfig, dataset: str) -> list[Source] | None:
    """`data.mixtures.<dataset>` as Sources, or None when the dataset is a plain set."""
    mixtures = data_cfg.get("mixtures") or {}
    if dataset not in mixtures:
        return None
    key = f"data.mixtures.{dataset}"
    entries = OmegaConf.to_container(mixtures[dataset], resolve=True)
    if not isinstance(entries, list):
        raise ConfigError(
            key, f"got {entries!r}.", "give a list of {name, set|path, weight|count}."
        )
    return parse_sources(entries, key, lambda name: _set_dir(data_cfg, name, key))


def resolve_dataset(data_cfg: DictConfig, dataset: str) -> dict[str, Any]:
    """Shard folder (or mixture sources) for `stage.dataset`, plus held-out file and image root.

    `data.mixtures.<dataset>`, when present, replaces `data.sets.<dataset>` for training.
    """
    sources = mixture_sources(data_cfg, dataset)
    shard_dir = None if sources is not None else _set_dir(data_cfg, dataset, "stage.dataset")
    if data_cfg.name == "shapes":
        root = shapes_dir(data_cfg)
        return {
            "shard_dir": shard_dir,
            "sources": sources,
            "heldout": root / "heldout.json",
            "image_root": root / "images",
            "prepare": lambda: ensure_shapes(data_cfg),
        }
    heldout = data_cfg.get("heldout")
    return {
        "shard_dir": shard_dir,
        "sources": sources,
        "heldout": Path(heldout) if isinstance(heldout, str) and heldout else None,
        "image_root": None,
        "prepare": None,
    }
