"""Streaming DataModule over WebDataset shards.

Shards are assigned to (rank, worker) slots explicitly from the trainer's rank and world size,
shuffled by (seed, epoch). Bad samples are skipped and counted by reason; the counts travel
with the batches, so they survive DataLoader worker processes and reach the logger.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmlab.data.shards import read_manifest
from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.vlm import IGNORE_INDEX

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class ShardStream(IterableDataset):
    """Streams processed samples from the shards assigned to this rank and worker."""

    def __init__(
        self,
        shard_paths: list[str],
        process: Callable[[dict[str, Any]], dict[str, Any]],
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shard_paths = shard_paths
        self.process = process
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already trained (resume mid-epoch)
        self.batch_size = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples_to_skip(self) -> int:
        """Samples this worker already delivered in the first `skip_batches` batches.

        The DataLoader takes batches from its workers in strict round robin, so worker w
        produced batches w, w+W, ... of the epoch.
        """
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = len(range(worker, self.skip_batches, num_workers))
        return mine * self.batch_size

    def my_shards(self) -> list[str]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        order = list(self.shard_paths)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return order[slot::slots]

    def raw_samples(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        shards = self.my_shards()
        if not shards:
            return
        yield from wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}")
        buffer: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        to_skip = self._samples_to_skip()
        for sample in self._shuffled(rng, buffer, skipped):
            if to_skip > 0 and not sample.get("empty"):
                to_skip -= 1
                continue
            yield sample

    def _shuffled(
        self, rng: random.Random, buffer: list[dict[str, Any]], skipped: Counter[str]
    ) -> Iterator[dict[str, Any]]:
        for raw in self.raw_samples():
            try:
                sample = self.process(raw)
            except BadSample as bad:
                skipped[bad.reason] += 1
                log.debug("skipping sample %s: %s", raw.get("__key__"), bad)
                continue
            sample["skipped"], skipped = dict(skipped), Counter()
            if not self.shuffle:
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        if skipped:  # skips after the last good sample still get reported
            yield {"skipped": dict(skipped), "empty": True}


class SampleProcessor:
    """Raw tar sample -> tensors. Picklable, so it runs inside DataLoader workers."""

    def __init__(
        self, text_encoder: TextEncoder, image_transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.text_encoder = text_encoder
        self.image_transform = image_transform

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            record = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            raise BadSample("bad_json", str(err)) from err
        pixel_values = None
        if record.get("image"):
            payload = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if payload is None:
                raise BadSample("missing_image", str(record.get("image")))
            try:
                with Image.open(io.BytesIO(payload)) as image:
                    image.load()
                    pixel_values = self.image_transform(image)
            except (OSError, ValueError) as err:
                raise BadSample("corrupt_image", str(err)) from err
        encoded = self.text_encoder.encode(
            record.get("conversations") or [], has_image=pixel_values is not None
        )
        return {"id": record.get("id", raw.get("__key__")), "pixel_values": pixel_values, **encoded}


def collate(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad ids/labels; stack images of the samples that have one, in order."""
    skipped: Counter[str] = Counter()
    for sample in samples:
        skipped.update(sample.get("skipped", {}))
    samples = [s for s in samples if not s.get("empty")]
    length = max((len(s["input_ids"]) for s in samples), default=0)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for i, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[i, :n] = sample["input_ids"]
        labels[i, :n] = sample["labels"]
        attention_mask[i, :n] = 1
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack(images) if images else None,
        "skipped": dict(skipped),
    }


class _Collator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_token_id)


class VLMDataModule(L.LightningDataModule):
    """Receives the encoder's image transform and a TextEncoder; never imports model code."""

    def __init__(
        self,
        shard_dir: Path,
        text_encoder: TextEncoder,
        image_transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.text_encoder = text_encoder
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self._prepare = prepare
        self._train: ShardStream | None = None
        self.epoch = 0
        self.batches_done = 0  # in the current epoch, counted by StreamPosition
        self._resume_batches = 0
        self._resume_epoch = -1

    def prepare_data(self) -> None:
        if self._prepare is not None:
            self._prepare()

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.shard_dir)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batches_per_epoch(self, world_size: int) -> int:
        """Upper bound of micro-batches one rank sees per epoch (sizes the LR schedule).

        Whole shards go to (rank, worker) slots, so the bound follows the fullest slot; the +1
        covers the skip report a worker may yield after its last sample.
        """
        sizes = sorted((s["num_samples"] for s in self.manifest["shards"]), reverse=True)
        workers = max(1, self.num_workers)
        per_slot = math.ceil(len(sizes) / (world_size * workers))
        most = sum(sizes[:per_slot])  # most samples one (rank, worker) slot can get
        return max(1, workers * math.ceil((most + 1) / self.batch_size))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
        self.epoch = epoch
        if self._train is not None:
            self._train.set_epoch(epoch)
            self._train.skip_batches = self._resume_batches if epoch == self._resume_epoch else 0

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: where the stream stands, so resume neither replays nor skips."""
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = self._resume_epoch = int(state.get("epoch", 0))
        self.batches_done = self._resume_batches = int(state.get("batches_done", 0))

    def train_dataloader(self) -> DataLoader:
        manifest = self.manifest
        rank, world = self._world()
        shards = [str(self.shard_dir / s["name"]) for s in manifest["shards"]]
        slots = world * max(1, self.num_workers)
        if len(shards) < slots:
            raise ConfigError(
                "data.num_workers",
                f"{self.shard_dir} has {len(shards)} shards but {world} ranks x "
                f"{max(1, self.num_workers)} workers need at least {slots}.",
                "lower data.num_workers or write smaller shards (data.samples_per_shard).",
            )
        self._train = ShardStream(
            shards,
            SampleProcessor(self.text_encoder, self.image_transform),
            seed=self.seed,
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world,
        )
        self._train.batch_size = self.batch_size
        self._train.set_epoch(self.epoch)
        if self.epoch == self._resume_epoch:
            self._train.skip_batches = self._resume_batches
        return DataLoader(
            self._train,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_Collator(self.text_encoder.tokenizer.pad_token_id),
            persistent_workers=False,
        )


class StreamPosition(L.Callback):
    """Tells the stream the epoch (its own shuffle order) and counts batches for exact resume."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, VLMDataModule):
            datamodule.set_epoch(trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, VLMDataModule):
            datamodule.batches_done += 1


EpochSetter = StreamPosition  # earlier name
