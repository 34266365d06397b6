"""Epoch plan: which samples each (rank, worker) reads, and how many batches every rank yields.

DDP needs every rank to run the same number of steps, and exactly-once needs every sample in
exactly one slot. Both follow from the shard sample counts alone, so every process computes the
same plan without talking to the others: the epoch's sample stream (shards in a (seed, epoch)
order) is cut into contiguous rank ranges whose sizes differ by at most one, every rank yields
`batches_per_rank` batches, and a rank's batches go to its DataLoader workers round robin, each
worker reading one contiguous part of the rank's range (so it opens few shards).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Samples to take from one shard, by position in the shard (sorted; repeats allowed)."""

    url: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's share of a rank's epoch."""

    pieces: list[Piece]
    batch_sizes: list[int]  # planned samples per batch, in the order the worker yields them
    batch_indices: list[int]  # their positions in the rank's epoch (worker w: w, w+W, ...)


def bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` (sizes differ <= 1)."""
    return total * index // parts, total * (index + 1) // parts


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields: set by the fullest rank, so no rank runs out early."""
    most = -(-total // world_size)
    return max(1, -(-most // batch_size))


def batch_sizes(num_samples: int, num_batches: int, batch_size: int) -> list[int]:
    """Full batches first, the rest in the last one; a short rank lends its last batch a sample.

    A rank holds at least (num_batches - 1) x batch_size samples, so only the last batch can
    come out empty; it takes one sample from the one before when that one can spare it.
    """
    sizes = [min(batch_size, max(0, num_samples - b * batch_size)) for b in range(num_batches)]
    if sum(sizes) != num_samples:
        raise ValueError(f"{num_samples} samples do not fit {num_batches} x {batch_size}")
    if num_batches > 1 and sizes[-1] == 0 and sizes[-2] > 1:
        sizes[-2] -= 1
        sizes[-1] = 1
    return sizes


def slice_pieces(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces covering samples [start, stop) of the pieces' concatenated stream."""
    out: list[Piece] = []
    offset = 0
    for piece in pieces:
        n = len(piece.positions)
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append(Piece(piece.url, piece.positions[lo - offset : hi - offset]))
        offset += n
        if offset >= stop:
            break
    return out


def worker_range(
    total: int, rank: int, world_size: int, worker: int, num_workers: int, batch_size: int
) -> tuple[int, list[int], list[int]]:
    """(first sample, planned batch sizes, batch indices) of worker `worker` of rank `rank` in a
    stream of `total` samples: the worker reads samples [first, first + sum(sizes))."""
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    start, stop = bounds(total, world_size, rank)
    sizes = batch_sizes(stop - start, batches_per_rank(total, world_size, batch_size), batch_size)
    offset = start
    for w in range(num_workers):
        mine = list(range(w, len(sizes), num_workers))
        if w == worker:
            return offset, [sizes[b] for b in mine], mine
        offset += sum(sizes[b] for b in mine)
    raise AssertionError("unreachable")


def plan_worker(
    pieces: list[Piece],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
) -> WorkerPlan:
    """What worker `worker` of rank `rank` reads and yields this epoch."""
    total = sum(len(p.positions) for p in pieces)
    first, sizes, indices = worker_range(total, rank, world_size, worker, num_workers, batch_size)
    return WorkerPlan(slice_pieces(pieces, first, first + sum(sizes)), sizes, indices)


def buffer_shuffle(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer: the order depends only on the number of items and the rng, so the same
    call on sample indices tells which samples a stream of raw samples yielded first."""
    held: list[T] = []
    for item in items:
        held.append(item)
        if len(held) >= buffer:
            yield held.pop(rng.randrange(len(held)))
    rng.shuffle(held)
    yield from held


@dataclass(frozen=True)
class Layout:
    """How an epoch's stream was cut and read: what decides which samples k batches consumed."""

    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as 1)
    batch_size: int
    shuffle_buffer: int
    group_megabatch: int  # 1 when batches are not grouped by length

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def consumed(
    stream: list[int], layout: Layout, batches: int, tag: str, shuffle: bool = True
) -> tuple[set[int], list[str]]:
    """The stream entries that `batches` batches per rank read under `layout`, without reading
    any data; and, where grouping by length makes that unknowable (a megabatch half trained:
    which of its samples went first depends on their decoded lengths), the slots it happened in.

    `tag` + f"-{rank}-{worker}" seeds each worker's shuffle buffer, as ShardStream does.
    """
    taken: set[int] = set()
    unknown: list[str] = []
    workers = max(1, layout.num_workers)
    for rank in range(layout.world_size):
        for worker in range(workers):
            first, sizes, _ = worker_range(
                len(stream), rank, layout.world_size, worker, workers, layout.batch_size
            )
            mine = stream[first : first + sum(sizes)]
            done = len(range(worker, batches, workers))
            if done % layout.group_megabatch and done < len(sizes):
                unknown.append(f"rank {rank} worker {worker}")
            order = (
                buffer_shuffle(mine, layout.shuffle_buffer, random.Random(f"{tag}-{rank}-{worker}"))
                if shuffle
                else iter(mine)
            )
            for _, index in zip(range(sum(sizes[:done])), order):
                taken.add(index)
    return taken, unknown


def layout_sequence(total: int, layout: Layout, tag: str, shuffle: bool = True) -> list[list[int]]:
    """The micro-batches an uninterrupted run under `layout` trains in an epoch of `total` stream
    entries, as one sequence: rank 0's batch 0, rank 1's batch 0, ..., rank 0's batch 1, ...

    Why this order: rank r's batch k is item k x N + r, so k batches per rank are always the
    first k x N items, and an optimizer step (N x accumulation items) is a contiguous run of
    them. Another world size M that deals the same sequence round robin (rank m takes items
    m, m + M, ...) trains the same micro-batches in the same steps (`replay_batches`).
    Ungrouped layouts only: a length-grouped batch depends on the decoded lengths.
    """
    if layout.group_megabatch != 1:
        raise ValueError("a length-grouped or packed layout's batches depend on the data")
    workers = max(1, layout.num_workers)
    per_rank: list[list[list[int]]] = []
    for rank in range(layout.world_size):
        batches: list[list[int]] = [
            [] for _ in range(batches_per_rank(total, layout.world_size, layout.batch_size))
        ]
        for worker in range(workers):
            first, sizes, indices = worker_range(
                total, rank, layout.world_size, worker, workers, layout.batch_size
            )
            mine = range(first, first + sum(sizes))
            order = (
                buffer_shuffle(mine, layout.shuffle_buffer, random.Random(f"{tag}-{rank}-{worker}"))
                if shuffle
                else iter(mine)
            )
            for size, index in zip(sizes, indices):
                batches[index] = list(islice(order, size))
        per_rank.append(batches)
    return [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(layout.world_size)]


def sequence_length(total: int, layout: Layout) -> int:
    """len(layout_sequence(total, layout, ...)), without building it."""
    return layout.world_size * batches_per_rank(total, layout.world_size, layout.batch_size)


def replay_batches(sequence: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank `rank`'s micro-batches when `world_size` ranks replay `sequence` (`layout_sequence`):
    items rank, rank + world_size, ...; the last ones padded with empty batches so that every
    rank yields the same number (an empty micro-batch takes part in the step, trains nothing)."""
    count = -(-len(sequence) // world_size)
    return [
        sequence[j] if j < len(sequence) else []
        for j in range(rank, count * world_size, world_size)
    ]


def pieces_of(pieces: list[Piece], keep: list[int]) -> list[Piece]:
    """The pieces holding the stream entries `keep` (indices into the pieces' concatenated
    stream, ascending), in stream order."""
    flat = [(p.url, pos) for p in pieces for pos in p.positions]
    out: list[Piece] = []
    run: list[int] = []
    url = None
    for index in keep:
        u, pos = flat[index]
        if u != url and run:
            out.append(Piece(str(url), tuple(run)))
            run = []
        url = u
        run.append(pos)
    if run:
        out.append(Piece(str(url), tuple(run)))
    return out
