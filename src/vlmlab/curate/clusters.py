"""Clusters from pairs (union-find) and one representative each: the member with the smallest
key, so the result is a function of the set of pairs, not of the order they were found in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def representatives(keys: Sequence[Any], pairs: Iterable[tuple[int, int]]) -> list[int]:
    """For each item, the index of its cluster's representative (itself when alone or chosen)."""
    uf = UnionFind(len(keys))
    for a, b in pairs:
        uf.union(a, b)
    best: dict[int, int] = {}
    for i in range(len(keys)):
        root = uf.find(i)
        if root not in best or keys[i] < keys[best[root]]:
            best[root] = i
    return [best[uf.find(i)] for i in range(len(keys))]
