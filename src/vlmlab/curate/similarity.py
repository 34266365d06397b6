"""Every pair of unit vectors with cosine >= a threshold, in blocks, so memory is block^2 floats
whatever N: the upper triangle of E @ E.T is computed block by block (torch matmul; faiss's
exact range search when importable and asked). Exact, not approximate: the pair set, hence the
clusters, do not depend on an index's randomness. Cost is N^2 / 2 dot products: 665K images at
D = 1024 is 2.3e14 multiply-adds, minutes on a GPU, hours on a CPU (benchmarks/curate.py)."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def _faiss() -> object | None:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


def similar_pairs(
    vectors: torch.Tensor, threshold: float, block: int = 4096, use_faiss: bool = True
) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """(pairs (i, j, cosine) with i < j and cosine >= threshold, nearest-neighbour cosine per row).

    The nearest-neighbour cosines feed the report's histogram (-1 for a lone vector).
    """
    n = len(vectors)
    nearest = np.full(n, -1.0, dtype=np.float32)
    pairs: list[tuple[int, int, float]] = []
    faiss = _faiss() if use_faiss else None
    if faiss is not None and n:
        return _faiss_pairs(faiss, vectors, threshold, nearest)
    for i0 in range(0, n, block):
        rows = vectors[i0 : i0 + block]
        for j0 in range(i0, n, block):
            sims = rows @ vectors[j0 : j0 + block].T  # (b, b')
            if j0 == i0:  # the diagonal block: keep j > i only
                sims = sims.masked_fill(
                    torch.ones_like(sims, dtype=torch.bool).tril(), float("-inf")
                )
            row_max = sims.max(dim=1).values.numpy()
            col_max = sims.max(dim=0).values.numpy()
            np.maximum(nearest[i0 : i0 + len(rows)], row_max, out=nearest[i0 : i0 + len(rows)])
            cols = slice(j0, j0 + sims.shape[1])
            np.maximum(nearest[cols], col_max, out=nearest[cols])
            hit = (sims >= threshold).nonzero()
            values = sims[hit[:, 0], hit[:, 1]].tolist()
            for (a, b), value in zip(hit.tolist(), values):
                pairs.append((i0 + a, j0 + b, value))
    nearest[np.isinf(nearest)] = -1.0
    pairs.sort()
    return pairs, nearest


def _faiss_pairs(
    faiss: object, vectors: torch.Tensor, threshold: float, nearest: np.ndarray
) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    data = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])  # type: ignore[attr-defined]
    index.add(data)
    sims, ids = index.search(data, 2)  # self is (almost always) first
    nearest[:] = np.where(ids[:, 0] == np.arange(len(data)), sims[:, 1], sims[:, 0])
    lims, dist, found = index.range_search(data, threshold)
    pairs = [
        (i, int(j), float(d))
        for i in range(len(data))
        for j, d in zip(found[lims[i] : lims[i + 1]], dist[lims[i] : lims[i + 1]])
        if j > i
    ]
    pairs.sort()
    return pairs, nearest
