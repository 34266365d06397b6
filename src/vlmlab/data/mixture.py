"""Mixtures of shard sets: weights or fixed counts per source, replayable from the seed.

A plain dataset is a mixture of one source taken whole. Per epoch each source contributes a
fixed number of samples: all of them (no weight, no count), `count` (a (seed, epoch, name)
random subset without replacement; whole passes plus a subset when count > size), or its
`weight`'s share of `data.mixture_size` (default: the weighted sources' total size), rounded by
largest remainder so the counts add up exactly. The realised proportions over an epoch are
therefore exact, and the whole sequence is a function of (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.data.remote import ShardSet, as_location
from vlmlab.data.shards import list_shards, manifest_bytes
from vlmlab.data.split import Piece
from vlmlab.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One shard set of a mixture; `key` names its config entry in error messages.

    `shard_dir`: a local folder, or a URL / brace pattern / pipe: command (data/remote.py)."""

    name: str
    shard_dir: Path | str
    weight: float | None = None
    count: int | None = None
    key: str = "data"


def parse_sources(
    entries: Iterable[Mapping[str, Any]], key: str, resolve_set: Callable[[str], Path | str]
) -> list[Source]:
    """Config entries `{name, set | path, weight | count}` -> Sources, with errors naming the key."""
    sources: list[Source] = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(where, f"got {entry!r}.", "give {name, set|path, weight|count}.")
        unknown = set(entry) - {"name", "set", "path", "weight", "count"}
        if unknown:
            raise ConfigError(
                where, f"unknown keys {sorted(unknown)}.", "use name, set|path, weight|count."
            )
        if ("set" in entry) == ("path" in entry):
            raise ConfigError(where, "needs exactly one of `set` (a data.sets name) or `path`.")
        weight, count = entry.get("weight"), entry.get("count")
        if weight is not None and count is not None:
            raise ConfigError(where, "has both weight and count.", "keep one of them.")
        if weight is not None and not (isinstance(weight, int | float) and weight > 0):
            raise ConfigError(f"{where}.weight", f"got {weight!r}.", "use a number > 0.")
        if count is not None and not (isinstance(count, int) and count >= 0):
            raise ConfigError(f"{where}.count", f"got {count!r}.", "use an integer >= 0.")
        shard_dir = (
            resolve_set(str(entry["set"])) if "set" in entry else as_location(str(entry["path"]))
        )
        name = str(entry.get("name") or entry.get("set") or Path(str(entry["path"])).name)
        sources.append(
            Source(name, shard_dir, None if weight is None else float(weight), count, where)
        )
    names = [s.name for s in sources]
    if not sources or len(set(names)) != len(names):
        raise ConfigError(key, f"needs at least one source with distinct names, got {names}.")
    return sources


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` that add up to `total` exactly."""
    norm = sum(weights)
    raw = [total * w / norm for w in weights]
    shares = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (shares[i] - raw[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class Mixture:
    """The epoch's samples from one or more shard sets, as shard pieces in a (seed, epoch) order."""

    def __init__(self, sources: list[Source], seed: int, total: int | None = None) -> None:
        self.sources = sources
        self.seed = seed
        self.total = total
        self._index: dict[str, list[tuple[str, int]]] | None = None
        self._offsets: dict[str, tuple[int, ...]] = {}  # shard -> sample byte offsets

    @property
    def index(self) -> dict[str, list[tuple[str, int]]]:
        """(shard, samples) per source; read lazily because shards may be prepared after build."""
        if self._index is None:
            index = {}
            for source in self.sources:
                try:
                    shards = list_shards(source.shard_dir)
                except OSError as err:  # not found, or a remote location unreachable
                    raise ConfigError(
                        source.key, str(err), "write or convert the shards first."
                    ) from err
                index[source.name] = [(s.url, s.num_samples) for s in shards]
                self._offsets.update((s.url, s.offsets) for s in shards if s.offsets)
            self._index = index
        return self._index

    def offsets(self, url: str) -> tuple[int, ...] | None:
        """Byte offsets of a shard's samples (and their end), where its manifest records them."""
        _ = self.index
        return self._offsets.get(url)

    def sizes(self) -> dict[str, int]:
        return {name: sum(n for _, n in shards) for name, shards in self.index.items()}

    def counts(self) -> dict[str, int]:
        """Samples each source contributes per epoch."""
        sizes = self.sizes()
        counts = {s.name: s.count if s.count is not None else sizes[s.name] for s in self.sources}
        weighted = [s for s in self.sources if s.weight is not None]
        if weighted:
            total = self.total if self.total is not None else sum(sizes[s.name] for s in weighted)
            for source, share in zip(
                weighted, largest_remainder(int(total), [float(s.weight or 0) for s in weighted])
            ):
                counts[source.name] = share
        for source in self.sources:
            if counts[source.name] > 0 and sizes[source.name] == 0:
                raise ConfigError(source.key, f"{source.shard_dir} holds no samples.")
        return counts

    def checksum(self) -> str:
        """sha256 over each source's manifest (or shard list) and its share: the data identity."""
        parts = []
        for source in self.sources:
            manifest = manifest_bytes(source.shard_dir)
            whole = ShardSet.parse(as_location(source.shard_dir)).names is None
            content = (  # a brace pattern picks shards: its list, not the manifest, says which
                hashlib.sha256(manifest).hexdigest()
                if manifest is not None and whole
                else json.dumps(self.index[source.name])
            )
            parts.append([source.name, content, source.weight, source.count])
        blob = json.dumps({"sources": parts, "total": self.total}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def num_samples(self) -> int:
        return sum(self.counts().values())

    def num_shards(self) -> int:
        return sum(len(shards) for shards in self.index.values())

    def pieces(self, epoch: int, shuffle: bool = True) -> list[Piece]:
        """Every sample of the epoch once, grouped by shard; shards in a (seed, epoch) order."""
        counts = self.counts()
        pieces: list[Piece] = []
        for source in self.sources:
            shards = self.index[source.name]
            size = sum(n for _, n in shards)
            count = counts[source.name]
            if count == size:  # the whole source once: whole shards
                pieces += [Piece(url, tuple(range(n))) for url, n in shards if n]
                continue
            rng = random.Random(f"{self.seed}-{epoch}-{source.name}")
            chosen = list(range(size)) * (count // size) + rng.sample(range(size), count % size)
            per_shard: dict[int, list[int]] = defaultdict(list)
            starts, offset = [], 0
            for _, n in shards:
                starts.append(offset)
                offset += n
            for position in chosen:
                shard = _find(starts, position)
                per_shard[shard].append(position - starts[shard])
            pieces += [
                Piece(shards[i][0], tuple(sorted(per_shard[i])))
                for i in range(len(shards))
                if per_shard.get(i)
            ]
        if shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(pieces)
        return pieces


def _find(starts: list[int], position: int) -> int:
    """Index of the shard holding `position` (starts ascending)."""
    import bisect

    return bisect.bisect_right(starts, position) - 1
