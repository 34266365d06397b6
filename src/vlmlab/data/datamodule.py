"""Streaming DataModule over WebDataset shards: exactly once per epoch, equal batches per rank.

The epoch plan (`split.py`) assigns samples, not whole shards, to (rank, worker) slots from the
shard sample counts, so every sample is read once per epoch and every rank yields the same number
of batches (otherwise DDP hangs at the end of the epoch). Shards are ordered by (seed, epoch),
samples shuffled in a buffer, and batches formed inside the workers (optionally grouped by
modality and length, `grouping.py`). A batch that lost samples to bad input is smaller; one that
lost all of them is still yielded (empty) so the batch count stays fixed. Skip counts travel with
the batches, so they survive DataLoader worker processes and reach the logger.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmlab.data.grouping import form_batches, padding_counts
from vlmlab.data.mixture import Mixture, Source
from vlmlab.data.shards import MANIFEST, read_manifest
from vlmlab.data.split import (
    Layout,
    Piece,
    WorkerPlan,
    batches_per_rank,
    buffer_shuffle,
    consumed,
    pieces_of,
    plan_worker,
)
from vlmlab.data.tokenize import UNUSABLE_IMAGE, BadSample, TextEncoder
from vlmlab.data.validate import IMAGE_EXTENSIONS, decode_image
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import AnyResImages, UnusableImageError
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.labels import target_positions

log = logging.getLogger(__name__)

SHARD_SHORT = "shard_short"  # the manifest promised more samples than the shard holds


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(IterableDataset):
    """Yields this rank's batches (lists of processed samples) for this DataLoader worker.

    Use it with `DataLoader(batch_size=None)`: batching happens here, from the epoch plan.
    """

    def __init__(
        self,
        mixture: Mixture,
        process: Callable[[dict[str, Any]], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = False,
        group_megabatch: int = 16,
    ) -> None:
        if batch_size < 1 or group_megabatch < 1:
            raise ValueError("batch_size and group_megabatch must be >= 1")
        self.mixture = mixture
        self.process = process
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.group_by_length = group_by_length
        self.group_megabatch = group_megabatch
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already trained (resume mid-epoch)
        # after an elastic resume: the epoch stream's entries not trained yet (in stream order)
        self.remaining: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_batches(self) -> int:
        """Batches every rank yields this epoch (the same on all ranks)."""
        total = self.mixture.num_samples() if self.remaining is None else len(self.remaining)
        return batches_per_rank(total, self.world_size, self.batch_size)

    def worker_plan(self, worker: int | None = None, num_workers: int | None = None) -> WorkerPlan:
        if worker is None or num_workers is None:
            worker, num_workers = _worker()
        pieces = self.mixture.pieces(self.epoch, shuffle=self.shuffle)
        if self.remaining is not None:
            pieces = pieces_of(pieces, self.remaining)
        return plan_worker(pieces, self.rank, self.world_size, worker, num_workers, self.batch_size)

    def raw_samples(self, pieces: list[Piece], short: Counter[str]) -> Iterator[dict[str, Any]]:
        """Raw tar samples at the planned positions; positions past a shard's end are counted."""
        import webdataset as wds

        for piece in pieces:
            wanted = Counter(piece.positions)
            last = piece.positions[-1]
            found = 0
            pipeline = wds.DataPipeline(wds.SimpleShardList([piece.url]), wds.tarfile_to_samples())
            for position, raw in enumerate(pipeline):
                for _ in range(wanted.get(position, 0)):
                    found += 1
                    yield raw
                if position >= last:
                    break
            if found < len(piece.positions):
                short[SHARD_SHORT] += len(piece.positions) - found
                log.warning("%s holds fewer samples than its manifest says", piece.url)

    def _shuffled(
        self, raws: Iterator[dict[str, Any]], rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from raws
            return
        yield from buffer_shuffle(raws, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        actual, num_workers = _worker()
        # The DataLoader takes batches from workers 0, 1, ... in turn. Resuming after k batches,
        # batch k must come first, so worker w plays the part worker (w + k) % W had in the
        # uninterrupted epoch (same plan, same random streams).
        worker = (actual + self.skip_batches) % num_workers
        plan = self.worker_plan(worker, num_workers)
        tag = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        short: Counter[str] = Counter()
        raws = self._shuffled(self.raw_samples(plan.pieces, short), random.Random(tag))
        skip = len(range(worker, self.skip_batches, num_workers))  # mine among those trained
        per = self.group_megabatch if self.group_by_length else 1
        sizes = plan.batch_sizes
        for first in range(0, len(sizes), per):
            planned = sizes[first : first + per]
            chunk = list(islice(raws, sum(planned)))
            if first + len(planned) <= skip:
                continue  # trained before the interruption: read (keeps the order), don't decode
            skipped: Counter[str] = Counter(short)
            short.clear()
            good = []
            for raw in chunk:
                try:
                    good.append(self.process(raw))
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    log.debug("skipping sample %s: %s", raw.get("__key__"), bad)
            rng = random.Random(f"{tag}-group-{first}")
            batches = form_batches(good, planned, rng, self.group_by_length)
            for j, batch in enumerate(batches):
                if first + j < skip:
                    continue
                report = dict(skipped) if j == 0 else {}
                yield [*batch, {"skipped": report, "empty": True}]


class SampleProcessor:
    """Raw tar sample -> tensors. Picklable, so it runs inside DataLoader workers.

    `image_processor` is the model's (`VisionLanguageModel.image_processor`): PIL -> (3, S, S)
    for `pad`, or AnyRes tiles (1 + rows * cols, 3, S, S) (`AnyResImages`, recognised by type:
    its images are decoded with their EXIF orientation, `decode_image`). The order is decode ->
    size -> token count (text) -> pixels: a sample the text side rejects (too long, an image
    AnyRes cannot tile) is skipped before any tile is cut.
    """

    def __init__(
        self, text_encoder: TextEncoder, image_processor: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.anyres = isinstance(image_processor, AnyResImages)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            record = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            raise BadSample("bad_json", str(err)) from err
        image, image_size = None, None
        if record.get("image"):
            payload = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if payload is None:
                raise BadSample("missing_image", str(record.get("image")))
            image = decode_image(payload, orient=self.anyres)
            image_size = image.size  # the decoded size decides the token count
        encoded = self.text_encoder.encode(
            record.get("conversations") or [],
            has_image=image is not None,
            image_size=image_size,
        )
        pixel_values = None
        if image is not None:
            try:
                pixel_values = self.image_processor(image)
            except UnusableImageError as err:
                raise BadSample(UNUSABLE_IMAGE, str(err)) from err
            except (OSError, ValueError) as err:
                raise BadSample("corrupt_image", str(err)) from err
        return {
            "id": record.get("id", raw.get("__key__")),
            "pixel_values": pixel_values,
            "image_size": image_size,
            **encoded,
        }


def collate(
    samples: list[dict[str, Any]], pad_token_id: int, image_token_id: int | None = None
) -> dict[str, Any]:
    """Right-pad ids/labels; join the images of the samples that have one, in order.

    `pixel_values`: (images, 3, S, S) stacked for single-tile images; AnyRes tiles (each image
    (1 + rows * cols, 3, S, S)) are concatenated along dim 0, and the model splits them again by
    `image_sizes`: the (width, height) of every image in order, as decoded (the size its token
    count was computed from).

    `num_pad_tokens` / `num_tokens` (and their ratio `padding_fraction`) measure what length
    grouping saves; training logs them as `data/padding_fraction`.

    The model's loss bookkeeping is counted here, on the CPU, so the training forward on the
    GPU never waits for the device (`VisionLanguageModel.forward` takes these keys):
    `target_index` (flat b*T + p of the positions whose next label is a target),
    `num_target_tokens` (a python int) and, given `image_token_id`, `image_index` (flat b*T + p
    of the image-token slots). `image_tokens` lists the token count of every image of the batch
    in order, as the text side expanded it (samples from `TextEncoder.encode` carry theirs), so
    the model checks each image's embeddings against its own slots without a device sync.
    """
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
    image_sizes = [s.get("image_size") for s in samples if s["pixel_values"] is not None]
    pixel_values = None
    if images:
        pixel_values = torch.cat(images) if images[0].dim() == 4 else torch.stack(images)
    image_tokens = [count for s in samples for count in s.get("image_tokens", ())]
    pad_tokens, tokens = padding_counts([len(s["input_ids"]) for s in samples])
    target_index = target_positions(labels)
    extra: dict[str, Any] = {}
    if image_token_id is not None:
        extra["image_index"] = (input_ids.view(-1) == image_token_id).nonzero().view(-1)
    return {
        "ids": [s["id"] for s in samples],
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "image_tokens": image_tokens,
        "skipped": dict(skipped),
        "num_pad_tokens": pad_tokens,
        "num_tokens": tokens,
        "padding_fraction": pad_tokens / tokens if tokens else 0.0,
        "target_index": target_index,
        "num_target_tokens": int(target_index.numel()),
        **extra,
    }


class _Collator:
    def __init__(self, pad_token_id: int, image_token_id: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, self.pad_token_id, self.image_token_id)


class VLMDataModule(L.LightningDataModule):
    """Receives the model's image processor and a TextEncoder; builds no model (from
    `models` it imports only the picklable AnyRes value types, to recognise and skip).

    The data is one shard folder (`shard_dir`) or a mixture of several (`sources`).
    """

    def __init__(
        self,
        shard_dir: Path | None,
        text_encoder: TextEncoder,
        image_processor: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        prepare: Callable[[], None] | None = None,
        sources: list[Source] | None = None,
        mixture_size: int | None = None,
        group_by_length: bool = False,
        group_megabatch: int = 16,
    ) -> None:
        super().__init__()
        if shard_dir is None and not sources:
            raise ValueError("give shard_dir or sources")
        self.shard_dir = Path(shard_dir) if shard_dir is not None else None
        self.sources = sources or [Source("data", Path(str(shard_dir)), key="stage.dataset")]
        self.mixture_size = mixture_size
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_megabatch = group_megabatch
        self._prepare = prepare
        self._train: ShardStream | None = None
        self.epoch = 0
        self.batches_done = 0  # in the current epoch, counted by StreamPosition
        self._resume_batches = 0
        self._resume_epoch = -1
        self._loader_seed = torch.Generator()  # see `_seeded_for`
        # Elastic resume: the layouts this epoch was read with before the current one, each with
        # the batches per rank it trained; `_remaining` is what they left (None: nothing yet).
        self._before: list[tuple[Layout, int]] = []
        self._remaining: list[int] | None = None
        self._saved_layout: Layout | None = None  # of the checkpoint loaded, until resolved
        self.elastic = False  # this resume changed the layout mid-epoch

    def prepare_data(self) -> None:
        if self._prepare is not None:
            self._prepare()

    @property
    def manifest(self) -> dict[str, Any]:
        if self.shard_dir is None:
            raise ValueError("a mixture has one manifest per source")
        return read_manifest(self.shard_dir)

    def mixture(self) -> Mixture:
        return Mixture(self.sources, self.seed, self.mixture_size)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def batches_per_epoch(self, world_size: int) -> int:
        """Micro-batches every rank yields per epoch, exactly (sizes the LR schedule)."""
        return batches_per_rank(self.mixture().num_samples(), world_size, self.batch_size)

    def _seeded_for(self, epoch: int) -> torch.Generator:
        """The DataLoader's own generator, seeded by (seed, epoch).

        Why: a DataLoader draws its workers' base seed from its generator each time an epoch's
        iterator is made; without one it draws from the global generator, which dropout uses.
        A run resumed at an epoch boundary makes that iterator at another moment than the
        uninterrupted run (before restoring the saved random state, not after the save), so
        its dropout stream, and its weights, would differ.
        """
        return self._loader_seed.manual_seed(self.seed * 1_000_003 + epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
            self._before, self._remaining = [], None
        self.epoch = epoch
        self._seeded_for(epoch)
        if self._train is not None:
            self._train.set_epoch(epoch)
            self._train.skip_batches = self._resume_batches if epoch == self._resume_epoch else 0
            self._train.remaining = self._remaining

    def layout(self) -> Layout:
        """How this run cuts and reads the epoch (the world size is the trainer's)."""
        trainer = self.trainer
        return Layout(
            world_size=trainer.world_size if trainer is not None else 1,
            num_workers=max(1, self.num_workers),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            group_megabatch=self.group_megabatch if self.group_by_length else 1,
        )

    def _segment_batches(self) -> int:
        """Batches per rank of the current layout's part of the epoch."""
        if self._remaining is None:
            return self.batches_per_epoch(self._world()[1])
        return batches_per_rank(len(self._remaining), self._world()[1], self.batch_size)

    def resolve_resume(self) -> bool:
        """Apply a loaded mid-epoch position to this run's layout; True if the layout changed.

        Why: resumed at another world size or worker count, the saved batch count no longer
        says which samples were trained. The stream of the epoch is the same for every layout,
        and which of its entries k batches read under the saved layout follows from the plan
        and the shuffle seeds alone (`split.consumed`), so the rest of the epoch is planned
        afresh over the entries not trained yet: every sample once, no batch replayed.
        """
        saved, self._saved_layout = self._saved_layout, None
        if saved is None:
            return False
        now = self.layout()
        changed = saved != now and self.batches_done > 0
        if changed:
            self._before = [*self._before, (saved, self.batches_done)]
            self.batches_done = self._resume_batches = 0
        if self._before:
            self._remaining = self._untrained(now)
        self.elastic = changed
        return changed

    def _untrained(self, now: Layout) -> list[int]:
        stream = list(range(self.mixture().num_samples()))
        for layout, batches in self._before:
            taken, unknown = consumed(stream, layout, batches, f"{self.seed}-{self.epoch}")
            if unknown:
                raise ConfigError(
                    "data.group_by_length",
                    f"the checkpoint stopped inside a length-grouped megabatch "
                    f"(data.group_megabatch={layout.group_megabatch}) at {unknown[0]}: which of "
                    "its samples were trained depends on their lengths, so the rest of the epoch "
                    f"cannot be planned for another layout (saved {layout.as_dict()}, "
                    f"now {now.as_dict()}).",
                    f"resume with trainer.devices={layout.world_size} "
                    f"data.num_workers={layout.num_workers} (the checkpoint's), or from a "
                    "checkpoint at a megabatch boundary.",
                )
            stream = [i for i in stream if i not in taken]
        return stream

    def resumed_batch_count(self, accumulation: int) -> int:
        """Lightning's batch counter for this epoch at the current layout after an elastic
        resume: the optimizer steps done x `accumulation`, so steps keep the global batch."""
        now = self.layout()
        done = sum(lay.world_size * lay.batch_size * k for lay, k in self._before)
        per_batch = now.world_size * now.batch_size
        if done % (per_batch * accumulation):
            raise ConfigError(
                "trainer.devices",
                f"the checkpoint was written after {done} samples of epoch {self.epoch}, not a "
                f"whole number of global batches of {per_batch * accumulation} at "
                f"{now.world_size} ranks x data.batch_size={now.batch_size} x accumulation "
                f"{accumulation}: the optimizer step in progress cannot be completed exactly.",
                "resume at the checkpoint's trainer.devices and data.num_workers, or from a "
                "checkpoint written at an optimizer step (checkpoint.every_n_steps).",
            )
        return done // per_batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: where the stream stands, so resume neither replays nor skips.

        After an epoch's last batch (its step checkpoint, its epoch-end checkpoint) the stream
        stands at the start of the next epoch. Saved as (epoch, all batches done), a resume would
        build its first loader for the finished epoch: Lightning creates that iterator before
        `on_train_epoch_start` (and, resuming at an epoch boundary, never again), so the next
        epoch would yield nothing and be skipped whole.
        """
        layout = self.layout().as_dict()
        if self.batches_done >= self._segment_batches():
            return {"epoch": self.epoch + 1, "batches_done": 0, "layout": layout, "before": []}
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "layout": layout,  # what the batch count means (elastic resume, `resolve_resume`)
            "before": [[lay.as_dict(), k] for lay, k in self._before],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = self._resume_epoch = int(state.get("epoch", 0))
        self.batches_done = self._resume_batches = int(state.get("batches_done", 0))
        saved = state.get("layout")
        self._saved_layout = Layout(**saved) if saved else None
        self._before = [(Layout(**lay), int(k)) for lay, k in state.get("before", [])]
        self._remaining = None

    def train_dataloader(self) -> DataLoader:
        mixture = self.mixture()
        rank, world = self._world()
        workers = max(1, self.num_workers)
        slots, shards = world * workers, mixture.num_shards()
        if shards < slots:
            raise ConfigError(
                "data.num_workers",
                f"{where_of(self.sources)} has {shards} shards but {world} ranks (trainer.devices x "
                f"trainer.num_nodes) x {workers} workers (data.num_workers) need at least {slots}.",
                f"lower data.num_workers or trainer.devices, or write at least {slots} shards "
                "(smaller data.samples_per_shard).",
            )
        if mixture.num_samples() == 0:
            raise ConfigError("stage.dataset", f"{where_of(self.sources)} holds no samples.")
        if isinstance(self.image_processor, AnyResImages):
            refuse_presized(self.sources)
        self._train = ShardStream(
            mixture,
            SampleProcessor(self.text_encoder, self.image_processor),
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world,
            group_by_length=self.group_by_length,
            group_megabatch=self.group_megabatch,
        )
        self.resolve_resume()  # normally done already, by StreamPosition.on_load_checkpoint
        self._train.set_epoch(self.epoch)
        self._train.remaining = self._remaining
        if self.epoch == self._resume_epoch:
            self._train.skip_batches = self._resume_batches
        return DataLoader(
            self._train,
            batch_size=None,  # the stream forms the batches from the epoch plan
            num_workers=self.num_workers,
            collate_fn=_Collator(
                self.text_encoder.tokenizer.pad_token_id, self.text_encoder.image_token_id
            ),
            pin_memory=torch.cuda.is_available(),  # page-locked batches: async host-to-GPU copies
            # Not persistent: a persistent worker keeps the ShardStream copy it was started with
            # (torch resumes it with a seed only), so set_epoch / skip_batches on the main copy
            # would never reach it and epoch 2 would replay epoch 1's order. Workers start anew
            # each epoch (LLaVA stages run one epoch, so this costs one start per stage).
            persistent_workers=False,
            generator=self._seeded_for(self.epoch),  # not the global (dropout) generator
        )


def where_of(sources: list[Source]) -> str:
    return ", ".join(str(s.shard_dir) for s in sources)


def refuse_presized(sources: list[Source]) -> None:
    """AnyRes tiles the image as stored: shards written with `vlmlab shards --presize` hold it
    already squared to one tile, so every image would give the same small grid, silently."""
    for source in sources:
        manifest = source.shard_dir / MANIFEST
        args = read_manifest(source.shard_dir) if manifest.is_file() else {}
        presize = args.get("converter", {}).get("args", {}).get("presize")
        if presize:
            raise ConfigError(
                "encoder.image",
                f"anyres tiles each image at its own size, but {source.shard_dir} was written "
                f"with `vlmlab shards --presize {presize.get('encoder')}` (every image squared "
                "to one tile).",
                "convert that data again without --presize, or train with encoder.image=pad.",
            )


class StreamPosition(L.Callback):
    """Tells the stream the epoch (its own shuffle order) and counts batches for exact resume."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Elastic resume, before any training: refuse what cannot be exact, and set Lightning's
        batch counter (restored after this hook) so optimizer steps keep the global batch."""
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, VLMDataModule) or not datamodule.resolve_resume():
            return
        batches = datamodule.resumed_batch_count(trainer.accumulate_grad_batches)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress:
            current = progress["current"]
            shift = batches - int(current["ready"])
            for field in ("ready", "started", "processed", "completed"):
                current[field] = int(current[field]) + shift

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
