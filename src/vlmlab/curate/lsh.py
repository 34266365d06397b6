"""Neighbours of a 64-bit hash within a Hamming distance, without comparing every pair.

Multi-index hashing: the 64 bits are cut into `bands` bands. If two hashes differ in at most
`t` bits, one band differs in at most floor(t / bands) bits (pigeonhole), so probing each band's
table at that radius finds every such hash: exact recall, no all-pairs scan. With 4 bands of 16
bits and t = 8 a query probes 4 x 137 buckets; the candidates are then checked exactly.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np


def _masks(width: int, radius: int) -> list[int]:
    masks = [0]
    for r in range(1, radius + 1):
        for bits in combinations(range(width), r):
            masks.append(sum(1 << b for b in bits))
    return masks


def popcount64(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


class HammingIndex:
    """Hashes 0..n-1 in `bands` tables; `query` lists those within a distance of a hash."""

    def __init__(self, hashes: list[int], bands: int = 4) -> None:
        if 64 % bands:
            raise ValueError("dedup.image.bands must divide 64")
        self.width, self.bands = 64 // bands, bands
        self.values = np.array(hashes, dtype=np.uint64)
        low = (1 << self.width) - 1
        self.tables: list[dict[int, list[int]]] = []
        for b in range(bands):
            table: dict[int, list[int]] = defaultdict(list)
            for i, h in enumerate(hashes):
                table[(h >> (b * self.width)) & low].append(i)
            self.tables.append(dict(table))
        self._masks: dict[int, list[int]] = {}

    def query(self, h: int, max_distance: int) -> list[tuple[int, int]]:
        """(item, distance) for every indexed hash within `max_distance` bits of `h`, by item."""
        radius = max_distance // self.bands
        masks = self._masks.setdefault(radius, _masks(self.width, radius))
        low = (1 << self.width) - 1
        candidates: set[int] = set()
        for b, table in enumerate(self.tables):
            key = (h >> (b * self.width)) & low
            for mask in masks:
                bucket = table.get(key ^ mask)
                if bucket:
                    candidates.update(bucket)
        if not candidates:
            return []
        items = np.array(sorted(candidates), dtype=np.int64)
        dist = popcount64(np.bitwise_xor(self.values[items], np.uint64(h)))
        near = dist <= max_distance
        return list(zip(items[near].tolist(), dist[near].tolist()))
