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
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmlab.data.features import read_cached
from vlmlab.data.grouping import form_batches, padding_counts
from vlmlab.data.mixture import Mixture, Source
from vlmlab.data.packing import collate_packed, pack_batches
from vlmlab.data.remote import FetchPolicy, FetchStats, RangeReader, ShardUnavailable, as_location
from vlmlab.data.shards import manifest_bytes, read_manifest
from vlmlab.data.split import (
    Layout,
    Piece,
    WorkerPlan,
    batches_per_rank,
    buffer_shuffle,
    consumed,
    layout_sequence,
    pieces_of,
    plan_worker,
    replay_batches,
    sequence_length,
)
from vlmlab.data.tokenize import UNUSABLE_IMAGE, BadSample, TextEncoder
from vlmlab.data.validate import IMAGE_EXTENSIONS, decode_image
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import AnyResImages, UnusableImageError
from vlmlab.models.image_transform import normalize_planes, to_planes
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.labels import target_positions

log = logging.getLogger(__name__)

SHARD_SHORT = "shard_short"  # the manifest promised more samples than the shard holds
MISSING_SHARD = "missing_shard"  # unreadable shard skipped (data.missing_shards=skip)


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
        pack_length: int | None = None,
        fetch: FetchPolicy | None = None,
    ) -> None:
        """`pack_length`: pack each look-ahead of `group_megabatch` batches into rows of at most
        this many tokens (`data.packing`, `packing.py`); None: right-padded batches. `fetch`: how
        remote shards are retried and what a missing one does (`remote.py`)."""
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
        self.pack_length = pack_length
        self.fetch = fetch or FetchPolicy()
        self.stats = FetchStats()  # bytes this worker's readers fetched (reported per batch)
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already trained (resume mid-epoch)
        # after an elastic resume: the epoch stream's entries not trained yet (in stream order)
        self.remaining: list[int] | None = None
        # data.elastic=exact at a layout other than the run's own: the layout whose batches
        # this rank replays (`split.layout_sequence`), so the weights equal the run's own
        self.replay: Layout | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_batches(self) -> int:
        """Batches every rank yields this epoch (the same on all ranks)."""
        if self.replay is not None:
            items = sequence_length(self.mixture.num_samples(), self.replay)
            return -(-items // self.world_size)
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
        """Raw tar samples at the planned positions; positions past a shard's end are counted.

        Where the manifest records sample offsets, a piece is one byte range: exactly its samples'
        bytes (a remote shard is never fetched whole for a few samples); otherwise the shard is
        read from its start up to the piece's last sample. A shard that cannot be read is an
        error naming it, or (`data.missing_shards=skip`) its unread samples are counted
        (`missing_shard`) and the epoch goes on with smaller batches.
        """
        for _, raw in self._located(pieces, short):
            yield raw

    def _located(
        self, pieces: list[Piece], short: Counter[str]
    ) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
        """`raw_samples` with each sample's (url, position)."""
        for piece in pieces:
            wanted = Counter(piece.positions)
            first, last = piece.positions[0], piece.positions[-1]
            offsets = self.mixture.offsets(piece.url)
            start, end, base = 0, None, 0
            if offsets is not None and last + 1 < len(offsets):
                start, end, base = offsets[first], offsets[last + 1], first
            found = 0
            reader = RangeReader(piece.url, start, end, self.fetch, self.stats)
            try:
                for position, raw in enumerate(_tar_samples(reader, piece.url), base):
                    for _ in range(wanted.get(position, 0)):
                        found += 1
                        yield (piece.url, position), raw
                    if position >= last:
                        break
            except Exception:
                if reader.failure is None:  # not the storage: a bad tar, a bug
                    raise
                if self.fetch.missing == "error":
                    raise ShardUnavailable(
                        f"{reader.failure} Fix: check the location (data.sets / data.mixtures), "
                        "or set data.missing_shards=skip to train without it (counted as "
                        f"data/skipped/{MISSING_SHARD})."
                    ) from None
                short[MISSING_SHARD] += len(piece.positions) - found
                log.warning("skipping %d samples: %s", len(piece.positions) - found, reader.failure)
                continue
            finally:
                reader.close()
            if found < len(piece.positions):
                short[SHARD_SHORT] += len(piece.positions) - found
                log.warning("%s holds fewer samples than its manifest says", piece.url)

    def _fetched(self, sent: dict[str, int]) -> dict[str, int]:
        """Storage counters since the last batch this worker yielded (`sent` is updated)."""
        now = self.stats.as_dict()
        delta = {k: v - sent.get(k, 0) for k, v in now.items()}
        sent.update(now)
        return delta

    def _shuffled(
        self, raws: Iterator[dict[str, Any]], rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from raws
            return
        yield from buffer_shuffle(raws, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        actual, num_workers = _worker()
        if self.replay is not None:
            yield from self._replayed(actual, num_workers)
            return
        # The DataLoader takes batches from workers 0, 1, ... in turn. Resuming after k batches,
        # batch k must come first, so worker w plays the part worker (w + k) % W had in the
        # uninterrupted epoch (same plan, same random streams).
        worker = (actual + self.skip_batches) % num_workers
        plan = self.worker_plan(worker, num_workers)
        tag = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        short: Counter[str] = Counter()
        self.stats = FetchStats()
        sent: dict[str, int] = {}
        raws = self._shuffled(self.raw_samples(plan.pieces, short), random.Random(tag))
        skip = len(range(worker, self.skip_batches, num_workers))  # mine among those trained
        look_ahead = self.group_by_length or self.pack_length is not None
        per = self.group_megabatch if look_ahead else 1
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
            if self.pack_length is not None:  # rows per batch travel in the marker
                packed = pack_batches(good, len(planned), self.pack_length, rng)
                batches = [samples for samples, _ in packed]
                layouts: list[dict[str, Any]] = [{"rows": rows} for _, rows in packed]
            else:
                batches = form_batches(good, planned, rng, self.group_by_length)
                layouts = [{} for _ in batches]
            for j, batch in enumerate(batches):
                if first + j < skip:
                    continue
                report = dict(skipped) if j == 0 else {}
                marker = {"skipped": report, "empty": True, "fetched": self._fetched(sent)}
                yield [*batch, {**marker, **layouts[j]}]

    def _replayed(self, worker: int, num_workers: int) -> Iterator[list[dict[str, Any]]]:
        """This rank's batches when it replays the run's own layout (`self.replay`) at another
        world size or worker count: micro-batch k of the rank is item k x world + rank of the
        replayed layout's sequence (`split.replay_batches`), and worker w yields k = w, w + W,
        ... (the DataLoader's round robin), from `skip_batches` on after a resume.

        Each batch's samples are read where they are (one byte range per run of neighbours when
        the manifest records offsets): the replayed order is not this layout's contiguous one.
        """
        assert self.replay is not None
        pieces = self.mixture.pieces(self.epoch, shuffle=self.shuffle)
        flat = [(p.url, pos) for p in pieces for pos in p.positions]
        tag = f"{self.seed}-{self.epoch}"
        sequence = layout_sequence(len(flat), self.replay, tag, shuffle=self.shuffle)
        mine = replay_batches(sequence, self.rank, self.world_size)
        self.stats = FetchStats()
        sent: dict[str, int] = {}
        for k in range(self.skip_batches + worker, len(mine), num_workers):
            short: Counter[str] = Counter()
            held: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for key, raw in self._located(_runs(flat, sorted(mine[k])), short):
                held.setdefault(key, []).append(raw)
            skipped: Counter[str] = Counter(short)
            good = []
            for entry in mine[k]:  # the replayed batch's own order
                raws = held.get(flat[entry])
                if not raws:
                    continue  # a short or missing shard: counted by _located
                raw = raws.pop()
                try:
                    good.append(self.process(raw))
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    log.debug("skipping sample %s: %s", raw.get("__key__"), bad)
            marker = {"skipped": dict(skipped), "empty": True, "fetched": self._fetched(sent)}
            yield [*good, marker]


def _runs(flat: list[tuple[str, int]], entries: list[int]) -> list[Piece]:
    """Pieces of the stream entries `entries` (ascending), one per run of neighbouring positions
    in one shard, so that each is one byte range holding nothing else."""
    out: list[Piece] = []
    for entry in entries:
        url, position = flat[entry]
        last = out[-1] if out else None
        if last is not None and last.url == url and position - last.positions[-1] in (0, 1):
            out[-1] = Piece(url, (*last.positions, position))
        else:
            out.append(Piece(url, (position,)))
    return out


def _tar_samples(stream: RangeReader, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset's samples of a tar stream (members grouped by key), as its pipeline yields them."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return iter(group_by_keys(tar_file_expander([{"url": url, "stream": stream}])))


class SampleProcessor:
    """Raw tar sample -> tensors. Picklable, so it runs inside DataLoader workers.

    `image_processor` is the model's (`VisionLanguageModel.image_processor`): PIL -> (3, S, S)
    for `pad`, or AnyRes tiles (1 + rows * cols, 3, S, S) (`AnyResImages`, recognised by type:
    its images are decoded with their EXIF orientation, `decode_image`). The order is decode ->
    size -> token count (text) -> pixels: a sample the text side rejects (too long, an image
    AnyRes cannot tile) is skipped before any tile is cut. A sample of a feature-cache shard
    (`vlmlab.data.features`) carries the encoder's features instead of the image: they go
    where the pixels would, and a skipped image is skipped at the same step, for the same reason.

    `uint8_pixels`: give the processor's geometry as uint8 planes (`to_planes`), not normalised
    floats; the loader's collate normalises the whole batch (`_Collator`), with the same values.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_processor: Callable[[Image.Image], torch.Tensor],
        uint8_pixels: bool = False,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.anyres = isinstance(image_processor, AnyResImages)
        self.uint8_pixels = uint8_pixels

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        try:
            record = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            raise BadSample("bad_json", str(err)) from err
        image, image_size = None, None
        cached = read_cached(raw)  # a feature-cache sample (data/features.py): no pixels
        if cached is not None:
            cached.raise_at("decode")
            image_size = cached.image_size
        elif record.get("image"):
            payload = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if payload is None:
                raise BadSample("missing_image", str(record.get("image")))
            image = decode_image(payload, orient=self.anyres)
            image_size = image.size  # the decoded size decides the token count
        encoded = self.text_encoder.encode(
            record.get("conversations") or [],
            has_image=image is not None or cached is not None,
            image_size=image_size,
        )
        pixel_values = None
        if cached is not None:  # the encoder's features stand where its pixels would
            cached.raise_at("pixels")
            pixel_values = cached.features
        elif image is not None:
            try:
                if self.uint8_pixels:
                    pixel_values = to_planes(self.image_processor.geometry(image))  # type: ignore[attr-defined]
                else:
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

    A packed batch (the stream's marker carries `rows`, samples per row) is laid out by
    `packing.collate_packed`: rows of back-to-back samples, with `position_ids`, `cu_seq_lens`,
    `max_seqlen` and `num_rows` added; images stay in sample order, which is slot order.
    """
    skipped: Counter[str] = Counter()
    fetched: Counter[str] = Counter()  # storage counters of the stream (data/bytes_fetched)
    rows = None  # packed batches (`data.packing`): samples per row, from the stream's marker
    for sample in samples:
        skipped.update(sample.get("skipped", {}))
        fetched.update(sample.get("fetched", {}))
        rows = sample.get("rows", rows)
    samples = [s for s in samples if not s.get("empty")]
    if rows is not None:
        packed = collate_packed(samples, rows, pad_token_id)
        input_ids, labels = packed.pop("input_ids"), packed.pop("labels")
        attention_mask = packed.pop("attention_mask")
    else:
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
    extra: dict[str, Any] = {}
    if rows is not None:  # padding, targets and the segments of the packed rows
        pad_tokens, tokens = packed.pop("num_pad_tokens"), packed.pop("num_tokens")
        target_index = packed.pop("target_index")
        del packed["num_target_tokens"]
        extra.update(packed)
    else:
        pad_tokens, tokens = padding_counts([len(s["input_ids"]) for s in samples])
        target_index = target_positions(labels)
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
        "fetched": dict(fetched),
        "num_pad_tokens": pad_tokens,
        "num_tokens": tokens,
        "padding_fraction": pad_tokens / tokens if tokens else 0.0,
        "target_index": target_index,
        "num_target_tokens": int(target_index.numel()),
        **extra,
    }


class _Collator:
    """`collate`, then uint8 pixels (`SampleProcessor(uint8_pixels=True)`) normalised as one batch
    with `normalize` = (mean, std). Why: per image, a worker used to normalise, stack the floats
    and copy them into shared memory to reach the main process; now it stacks uint8 and writes
    the normalised batch straight into shared memory (`normalize_planes(shared=True)`)."""

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.normalize = normalize

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples, self.pad_token_id, self.image_token_id)
        pixels = batch["pixel_values"]
        if self.normalize is not None and pixels is not None and pixels.dtype == torch.uint8:
            shared = get_worker_info() is not None  # the batch leaves this process
            batch["pixel_values"] = normalize_planes(pixels.numpy(), *self.normalize, shared=shared)
        return batch


class VLMDataModule(L.LightningDataModule):
    """Receives the model's image processor and a TextEncoder; builds no model (from
    `models` it imports only the picklable AnyRes value types, to recognise and skip).

    The data is one shard folder (`shard_dir`) or a mixture of several (`sources`).
    """

    def __init__(
        self,
        shard_dir: Path | str | None,
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
        packing: bool = False,
        fetch: FetchPolicy | None = None,
        elastic: str = "exact",
    ) -> None:
        """`packing` (`data.packing`): rows of whole samples up to the text encoder's max_length,
        packed from a look-ahead of `group_megabatch` batches (`packing.py`). `elastic`
        (`data.elastic`): what a resume at another world size or worker count trains, see
        `resolve_resume`."""
        super().__init__()
        if shard_dir is None and not sources:
            raise ValueError("give shard_dir or sources")
        # a local folder, or a URL / brace pattern / pipe: command (`remote.py`)
        self.shard_dir = as_location(shard_dir) if shard_dir is not None else None
        self.sources = sources or [Source("data", as_location(str(shard_dir)), key="stage.dataset")]
        self.fetch = fetch or FetchPolicy()
        self.fetched: Counter[str] = Counter()  # this rank's storage counters, this epoch
        self.mixture_size = mixture_size
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_megabatch = group_megabatch
        self.packing = packing
        if elastic not in ELASTIC_MODES:
            raise ConfigError(
                "data.elastic",
                f"unknown value {elastic!r}.",
                f"use one of {', '.join(ELASTIC_MODES)}.",
            )
        self.elastic_mode = elastic
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
        # data.elastic=exact: the layout the run started with, whose batches every later layout
        # replays (None: this run's own layout, or data.elastic=replan)
        self._origin: Layout | None = None
        self._saved_origin: Layout | None = None
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
        if self._origin is not None:  # replaying the run's own layout (`resolve_resume`)
            return -(-self.micro_batches_per_epoch(world_size) // world_size)
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
            self._train.replay = self._origin

    def micro_batches_per_epoch(self, world_size: int) -> int:
        """Micro-batches of all ranks in an epoch, empty padding excluded (sizes the schedule:
        replaying the run's own layout, its count, not this world size's rounding)."""
        if self._origin is not None:
            return sequence_length(self.mixture().num_samples(), self._origin)
        return world_size * self.batches_per_epoch(world_size)

    def expect_origin(self, origin: Layout, world_size: int) -> None:
        """Before the checkpoint is loaded (the schedule is sized first): the run's own layout,
        from its run state; `resolve_resume` sets it again from the checkpoint."""
        now = self.layout_at(world_size)
        if self.elastic_mode == "exact" and origin != now:
            refuse_replay(origin, now)
            self._origin = origin

    def layout(self) -> Layout:
        """How this run cuts and reads the epoch (the world size is the trainer's)."""
        trainer = self.trainer
        return self.layout_at(trainer.world_size if trainer is not None else 1)

    def layout_at(self, world_size: int) -> Layout:
        """The layout of this data config at `world_size` ranks."""
        return Layout(
            world_size=world_size,
            num_workers=max(1, self.num_workers),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            group_megabatch=(self.group_megabatch if self.group_by_length or self.packing else 1),
        )

    def _segment_batches(self) -> int:
        """Batches per rank of the current layout's part of the epoch."""
        if self._remaining is None or self._origin is not None:
            return self.batches_per_epoch(self._world()[1])
        return batches_per_rank(len(self._remaining), self._world()[1], self.batch_size)

    def resolve_resume(self) -> bool:
        """Apply a loaded mid-epoch position to this run's layout; True if the layout changed.

        Why: resumed at another world size or worker count, the saved batch count no longer
        says which samples were trained. The stream of the epoch is the same for every layout.

        `data.elastic=exact` (default): the run keeps the batches of the layout it started with.
        Its micro-batches form one sequence (`split.layout_sequence`) that k batches per rank
        consume as a prefix at any world size, so the new layout deals the rest of it round
        robin (`split.replay_batches`): the same micro-batches in the same optimizer steps as
        an uninterrupted run, so the same weights (up to the order of float reductions), for
        this epoch and every later one. Needs the same data.batch_size and ungrouped batches.

        `data.elastic=replan`: which entries k batches read under the saved layout follows from
        the plan and the shuffle seeds alone (`split.consumed`), so the rest of the epoch is
        planned afresh over the entries not trained yet: every sample once, no batch replayed,
        in another order (grouped and packed batches too, from a megabatch boundary).
        """
        saved, self._saved_layout = self._saved_layout, None
        if saved is None:
            return False
        now = self.layout()
        if self.elastic_mode == "exact" and not self._before:
            return self._resolve_exact(saved, now)
        changed = saved != now and self.batches_done > 0
        if changed:
            self._before = [*self._before, (saved, self.batches_done)]
            self.batches_done = self._resume_batches = 0
        if self._before:
            self._remaining = self._untrained(now)
        self.elastic = changed
        return changed

    def _resolve_exact(self, saved: Layout, now: Layout) -> bool:
        origin = self._saved_origin or saved
        self._saved_origin = None
        done = self.batches_done * saved.world_size  # items of the epoch's sequence trained
        self._origin = None if now == origin else origin
        changed = saved != now
        self.elastic = changed and self.batches_done > 0
        if self._origin is not None:
            refuse_replay(origin, now)
        if done % now.world_size:
            raise ConfigError(
                "trainer.devices",
                f"the checkpoint was written after {done} micro-batches of epoch {self.epoch} "
                f"over {saved.world_size} ranks, which {now.world_size} ranks cannot share "
                "equally.",
                "resume at the checkpoint's trainer.devices, or from a checkpoint written at an "
                "optimizer step (checkpoint.every_n_steps).",
            )
        self.batches_done = done // now.world_size
        if self.epoch == self._resume_epoch:
            self._resume_batches = self.batches_done
        if self._train is not None:
            self._train.replay = self._origin
        if changed:
            log.info(
                "resumed at %s after %s: replaying the batches of %s (data.elastic=exact)",
                now.as_dict(),
                saved.as_dict(),
                (self._origin or now).as_dict(),
            )
        return self.elastic  # Lightning's batch counter moves to this layout's (mid-epoch only)

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
        if not self._before:  # data.elastic=exact: batches_done is at this layout already
            if self.batches_done % accumulation:
                raise ConfigError(
                    "trainer.devices",
                    f"the checkpoint was written inside an optimizer step: {self.batches_done} "
                    f"micro-batches per rank at {now.world_size} ranks is not a whole number of "
                    f"steps of {accumulation}.",
                    "resume at the checkpoint's trainer.devices, or from a checkpoint written at "
                    "an optimizer step (checkpoint.every_n_steps).",
                )
            return self.batches_done
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
        # the layout whose batches the run trains (data.elastic=exact, `resolve_resume`)
        origin = (self._origin or self.layout()).as_dict()
        if self.batches_done >= self._segment_batches():
            return {
                "epoch": self.epoch + 1,
                "batches_done": 0,
                "layout": layout,
                "before": [],
                "origin": origin,
            }
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "layout": layout,  # what the batch count means (elastic resume, `resolve_resume`)
            "before": [[lay.as_dict(), k] for lay, k in self._before],
            "origin": origin,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = self._resume_epoch = int(state.get("epoch", 0))
        self.batches_done = self._resume_batches = int(state.get("batches_done", 0))
        saved = state.get("layout")
        self._saved_layout = Layout(**saved) if saved else None
        origin = state.get("origin")
        self._saved_origin = Layout(**origin) if origin else None
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
        norm = uint8_normalization(self.image_processor)
        self._train = ShardStream(
            mixture,
            SampleProcessor(self.text_encoder, self.image_processor, uint8_pixels=bool(norm)),
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world,
            group_by_length=self.group_by_length,
            group_megabatch=self.group_megabatch,
            pack_length=self.text_encoder.max_length if self.packing else None,
            fetch=self.fetch,
        )
        self.resolve_resume()  # normally done already, by StreamPosition.on_load_checkpoint
        self._train.set_epoch(self.epoch)
        self._train.remaining = self._remaining
        self._train.replay = self._origin
        if self.epoch == self._resume_epoch:
            self._train.skip_batches = self._resume_batches
        return DataLoader(
            self._train,
            batch_size=None,  # the stream forms the batches from the epoch plan
            num_workers=self.num_workers,
            collate_fn=_Collator(
                self.text_encoder.tokenizer.pad_token_id, self.text_encoder.image_token_id, norm
            ),
            pin_memory=torch.cuda.is_available(),  # page-locked batches: async host-to-GPU copies
            # Not persistent: a persistent worker keeps the ShardStream copy it was started with
            # (torch resumes it with a seed only), so set_epoch / skip_batches on the main copy
            # would never reach it and epoch 2 would replay epoch 1's order. Workers start anew
            # each epoch (LLaVA stages run one epoch, so this costs one start per stage).
            persistent_workers=False,
            generator=self._seeded_for(self.epoch),  # not the global (dropout) generator
        )


ELASTIC_MODES = ("exact", "replan")


def refuse_replay(origin: Layout, now: Layout) -> None:
    """Why `now` cannot replay `origin`'s batches (data.elastic=exact), naming the keys."""
    keep = (
        f"resume at trainer.devices={origin.world_size} data.num_workers={origin.num_workers} "
        f"data.batch_size={origin.batch_size} data.shuffle_buffer={origin.shuffle_buffer} (the "
        "run's own layout), or set data.elastic=replan (every untrained sample once, in "
        "another order: the weights then differ from an uninterrupted run's)."
    )
    if origin.group_megabatch != 1:
        raise ConfigError(
            "data.elastic",
            "this run groups batches by length or packs them (data.group_by_length / "
            "data.packing): its batches depend on the decoded lengths of whole megabatches, so "
            f"another layout ({now.as_dict()}) cannot replay them exactly.",
            keep,
        )
    if now.batch_size != origin.batch_size:
        raise ConfigError(
            "data.batch_size",
            f"the run trains micro-batches of {origin.batch_size}; {now.batch_size} cannot "
            "replay them.",
            keep,
        )


def uint8_normalization(processor: Any) -> tuple[Sequence[float], Sequence[float]] | None:
    """(mean, std) when the processor is geometry, then the table normalisation of
    `image_transform` (ImageTransform, AnyResImages): its pixels can travel as uint8."""
    if callable(getattr(processor, "geometry", None)) and hasattr(processor, "mean"):
        return tuple(processor.mean), tuple(processor.std)
    return None


def where_of(sources: list[Source]) -> str:
    return ", ".join(str(s.shard_dir) for s in sources)


def refuse_presized(sources: list[Source]) -> None:
    """AnyRes tiles the image as stored: shards written with `vlmlab shards --presize` hold it
    already squared to one tile, so every image would give the same small grid, silently."""
    for source in sources:
        manifest = manifest_bytes(source.shard_dir)
        args = json.loads(manifest) if manifest is not None else {}
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
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, VLMDataModule):
            datamodule.batches_done += 1
            if isinstance(batch, dict):
                datamodule.fetched.update(batch.get("fetched") or {})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What this rank fetched from storage in the epoch: a log line per rank, and
        `data/bytes_fetched` (+ `data/fetch_requests`, `data/fetch_resumed`) summed over ranks.

        Why: remote shards cost bandwidth; each rank should fetch its own samples' bytes only,
        and a flaky store shows up as resumed reads instead of a crash."""
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, VLMDataModule):
            return
        fetched, datamodule.fetched = datamodule.fetched, Counter()
        log.info(
            "rank %d fetched %d bytes of shards in epoch %d (%d reads, %d resumed after a failure)",
            trainer.global_rank,
            fetched["bytes"],
            trainer.current_epoch,
            fetched["requests"],
            fetched["resumed"],
        )
        names = {"bytes": "bytes_fetched", "requests": "fetch_requests", "resumed": "fetch_resumed"}
        for key, name in names.items():
            pl_module.log(f"data/{name}", float(fetched[key]), reduce_fx="sum", sync_dist=True)


EpochSetter = StreamPosition  # earlier name
