"""The three duplicate stages over the entries the filters kept. Each works on distinct keys
sorted by the entries' smallest key, and keeps the cluster member with the smallest key, so the
same set of entries gives the same decisions in any order and with any number of workers.

Image stages compare distinct images (by content hash): entries that share one image file with
different conversations are not duplicates (LLaVA asks many questions about one COCO image);
entries on an image that is a near copy of another image are, with the representative image's
entry as evidence.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlmlab.curate.clusters import representatives
from vlmlab.curate.images import hamming
from vlmlab.curate.lsh import HammingIndex
from vlmlab.curate.similarity import similar_pairs

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """What the duplicate stages keep of an entry (not the entry itself)."""

    index: int
    line: int
    id: str
    key: tuple[str, str]
    text_hash: str
    image: str | None = None  # the path the entry names
    sha256: str = ""  # of the image bytes ('' for text-only entries)
    phash: int = 0
    crop_hashes: tuple[int, ...] = ()


@dataclass
class Duplicate:
    index: int
    reason: str
    evidence: dict[str, Any]


@dataclass
class DedupResult:
    duplicates: list[Duplicate] = field(default_factory=list)
    nearest_cosine: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    nearest_hamming: list[int] = field(default_factory=list)


def exact_duplicates(items: Sequence[Candidate]) -> list[Duplicate]:
    """Same image bytes and same normalised conversation: keep the smallest key."""
    groups: dict[tuple[str, str], list[Candidate]] = defaultdict(list)
    for c in items:
        groups[c.sha256, c.text_hash].append(c)
    out = []
    for members in groups.values():
        keep = min(members, key=lambda c: c.key)
        out += [
            Duplicate(c.index, "exact_duplicate", {"duplicate_of": keep.id})
            for c in members
            if c is not keep
        ]
    return out


def _images(
    items: Sequence[Candidate],
) -> tuple[list[str], dict[str, Candidate], dict[str, list[Candidate]]]:
    """Distinct image hashes sorted by their smallest entry key; that entry; all entries."""
    by_sha: dict[str, list[Candidate]] = defaultdict(list)
    for c in items:
        if c.sha256:
            by_sha[c.sha256].append(c)
    first = {sha: min(cs, key=lambda c: c.key) for sha, cs in by_sha.items()}
    order = sorted(by_sha, key=lambda sha: (first[sha].key, sha))
    return order, first, by_sha


def _reject_members(
    order: list[str],
    reps: list[int],
    first: dict[str, Candidate],
    by_sha: dict[str, list[Candidate]],
    reason: str,
    measure: Callable[[int, int], dict[str, Any]],
) -> list[Duplicate]:
    out = []
    for i, rep in enumerate(reps):
        if rep == i:
            continue
        keep = first[order[rep]]
        evidence = {"duplicate_of": keep.id, "image_of_kept": keep.image, **measure(i, rep)}
        out += [Duplicate(c.index, reason, evidence) for c in by_sha[order[i]]]
    return out


def near_image_pairs(
    full: list[int], crops: list[tuple[int, ...]], max_distance: int, bands: int
) -> dict[tuple[int, int], int]:
    """{(i, j): bits} with i < j for images whose full hashes, or one's full hash and the other's
    centred-crop hash, are within `max_distance` bits (the smallest such distance)."""
    hashes, owner = [], []
    for i, (h, cs) in enumerate(zip(full, crops)):
        for x in (h, *cs):
            hashes.append(x)
            owner.append(i)
    index = HammingIndex(hashes, bands)
    pairs: dict[tuple[int, int], int] = {}
    for i, h in enumerate(full):
        for item, dist in index.query(h, max_distance):
            j = owner[item]
            if j != i:
                pair = (min(i, j), max(i, j))
                pairs[pair] = min(dist, pairs.get(pair, 64))
    return pairs


def near_image_duplicates(
    items: Sequence[Candidate], max_distance: int, bands: int
) -> tuple[list[Duplicate], list[int]]:
    """Images within `max_distance` bits of perceptual hash; (duplicates, pair distances)."""
    order, first, by_sha = _images(items)
    full = [first[sha].phash for sha in order]
    crops = [first[sha].crop_hashes for sha in order]
    pairs = near_image_pairs(full, crops, max_distance, bands)
    reps = representatives([first[sha].key for sha in order], sorted(pairs))

    def measure(i: int, r: int) -> dict[str, Any]:
        direct = pairs.get((min(i, r), max(i, r)))
        return {"hamming": direct if direct is not None else hamming(full[i], full[r])}

    dups = _reject_members(order, reps, first, by_sha, "near_duplicate_image", measure)
    return dups, sorted(pairs.values())


def semantic_duplicates(
    items: Sequence[Candidate],
    embed: Callable[[list[str]], torch.Tensor],
    threshold: float,
    block: int,
    use_faiss: bool,
) -> tuple[list[Duplicate], np.ndarray]:
    """Images whose embeddings' cosine reaches `threshold`; (duplicates, nearest cosine per image)."""
    order, first, by_sha = _images(items)
    if not order:
        return [], np.zeros(0, dtype=np.float32)
    vectors = embed([str(first[sha].image) for sha in order])
    pairs, nearest = similar_pairs(vectors, threshold, block, use_faiss)
    reps = representatives([first[sha].key for sha in order], ((i, j) for i, j, _ in pairs))
    dups = _reject_members(
        order,
        reps,
        first,
        by_sha,
        "semantic_duplicate",
        lambda i, r: {"similarity": round(float(vectors[i] @ vectors[r]), 4)},
    )
    return dups, nearest
