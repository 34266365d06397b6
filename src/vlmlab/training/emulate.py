"""`trainer.emulate_ranks=N`: one process trains on exactly the data N ranks would see.

Why: the reference for "does a 2-GPU run compute what a 1-GPU run computes" must see the same
global batches. Rank r of N reads its own part of the epoch; the emulating process reads all N
parts, interleaved batch by batch (rank 0 batch k, rank 1 batch k, ...). With accumulation
N x A on one process, optimizer step k then holds exactly the micro-batches that step k of the
N-rank run (accumulation A) holds, and with the global-token loss normalisation the gradient is
the same up to floating-point reduction order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from vlmlab.data.datamodule import VLMDataModule


class InterleavedLoader:
    """Round robin over one loader per emulated rank; ends when the first one ends (every rank
    yields the same number of batches per epoch, see data/split.py)."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for iterator in iterators:
                try:
                    yield next(iterator)
                except StopIteration:
                    return


def _fixed_world(rank: int, world: int) -> Callable[[], tuple[int, int]]:
    return lambda: (rank, world)


class EmulatedRanks(VLMDataModule):
    """A VLMDataModule whose single process reads the streams of `ranks` ranks."""

    def __init__(self, inner: VLMDataModule, ranks: int) -> None:
        # adopt the configured module as is (no second __init__: same shards, encoder, seed)
        self.__dict__.update(inner.__dict__)
        self.ranks = ranks
        self._shadows: list[VLMDataModule] = []

    def batches_per_epoch(self, world_size: int) -> int:
        """All emulated ranks' batches: the schedule matches the N-rank run's step count."""
        return self.ranks * super().batches_per_epoch(self.ranks)

    def train_dataloader(self) -> Any:
        self._shadows = []
        for rank in range(self.ranks):
            shadow = copy.copy(self)
            shadow._world = _fixed_world(rank, self.ranks)  # type: ignore[method-assign]
            self._shadows.append(shadow)
        return InterleavedLoader([VLMDataModule.train_dataloader(s) for s in self._shadows])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for shadow in self._shadows:
            VLMDataModule.set_epoch(shadow, epoch)


def emulate_ranks(datamodule: VLMDataModule, ranks: int) -> VLMDataModule:
    """`datamodule` as the one-process reference of a `ranks`-rank run (itself for <= 1 rank)."""
    return EmulatedRanks(datamodule, ranks) if ranks > 1 else datamodule
