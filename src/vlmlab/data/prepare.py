"""Resolve a stage's dataset to a shard folder, generating the synthetic shapes data on demand."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

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


def resolve_dataset(data_cfg: DictConfig, dataset: str) -> dict[str, Any]:
    """Shard folder for `stage.dataset`, plus held-out file and image root when the data has them."""
    sets = data_cfg.get("sets") or {}
    if dataset not in sets:
        raise ConfigError(
            "stage.dataset",
            f"{dataset!r} is not a set of data={data_cfg.name}.",
            f"use one of {sorted(sets)}.",
        )
    if data_cfg.name == "shapes":
        root = shapes_dir(data_cfg)
        return {
            "shard_dir": root / "shards" / sets[dataset],
            "heldout": root / "heldout.json",
            "image_root": root / "images",
            "prepare": lambda: ensure_shapes(data_cfg),
        }
    shard_dir = Path(sets[dataset])
    if not (shard_dir / MANIFEST).is_file():
        raise ConfigError(
            f"data.sets.{dataset}",
            f"{shard_dir} has no {MANIFEST}.",
            "convert the data to shards first.",
        )
    heldout = data_cfg.get("heldout")
    return {
        "shard_dir": shard_dir,
        "heldout": Path(heldout) if heldout else None,
        "image_root": None,
        "prepare": None,
    }
