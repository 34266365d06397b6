"""`build_datamodule`: the stage's data from typed settings, ready to size the schedule.

Why a builder: the recipe says "data" in one line; which keys of the `data` group feed the
DataModule, the data-parallel emulation and the data identity is decided here, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from vlmlab.data.datamodule import VLMDataModule
from vlmlab.data.prepare import ResolvedDataset
from vlmlab.data.remote import FetchPolicy
from vlmlab.data.shards import manifest_bytes
from vlmlab.data.tokenize import TextEncoder
from vlmlab.schema import DataConfig


def build_datamodule(
    data: DataConfig,
    dataset: ResolvedDataset,
    text_encoder: TextEncoder,
    image_processor: Callable[[Image.Image], torch.Tensor],
    seed: int,
) -> VLMDataModule:
    """The stage's DataModule with its data prepared (generated when the source generates it).

    `image_processor`: the model's PIL -> tensor callable (`VisionLanguageModel.image_processor`:
    one tile for `pad`, AnyRes tiles for `anyres`)."""
    datamodule = VLMDataModule(
        dataset["shard_dir"],
        text_encoder,
        image_processor,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=seed,
        prepare=dataset["prepare"],
        sources=dataset["sources"],
        mixture_size=data.mixture_size,
        group_by_length=data.group_by_length,
        group_megabatch=data.group_megabatch,
        packing=data.packing,
        fetch=FetchPolicy(
            retries=data.fetch.retries,
            timeout=data.fetch.timeout,
            backoff=data.fetch.backoff,
            missing=data.missing_shards,
        ),
        elastic=data.elastic,
    )
    datamodule.prepare_data()  # before the schedule is sized from the manifest
    return datamodule


def manifest_checksum(shard_dir: Path | str) -> str:
    """sha256 of a shard set's manifest.json (it lists every shard's sha256): the data identity.

    `shard_dir`: a local folder or a remote location (`remote.py`)."""
    manifest = manifest_bytes(shard_dir)
    return "unknown" if manifest is None else hashlib.sha256(manifest).hexdigest()


def data_checksum(dataset: ResolvedDataset, datamodule: VLMDataModule) -> str:
    """The identity of what the stage reads: a shard set's manifest, or a mixture's manifests
    and weights."""
    if dataset["shard_dir"] is not None:
        return manifest_checksum(dataset["shard_dir"])
    return datamodule.mixture().checksum()
