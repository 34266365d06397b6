"""Character n-gram TF-IDF vectors and cosine: a similarity that needs no model and no network.

Character n-grams (3-5, within word boundaries padded by a space) survive small rewordings and
inflections ("shows"/"showing") that a word match misses. IDF comes from the reference set
(smoothed, as scikit-learn's `smooth_idf`); an n-gram the set never saw gets the largest IDF.
"""

from __future__ import annotations

import math
from collections import Counter


def char_ngrams(text: str, low: int = 3, high: int = 5) -> Counter[str]:
    padded = f" {' '.join(text.split())} "
    grams: Counter[str] = Counter()
    for n in range(low, high + 1):
        for i in range(len(padded) - n + 1):
            grams[padded[i : i + n]] += 1
    return grams


class NgramIndex:
    """Cosine of a text against each of a fixed set of (normalised) texts."""

    def __init__(self, texts: list[str]) -> None:
        counts = [char_ngrams(t) for t in texts]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        n = len(texts)
        self.idf = {g: math.log((1 + n) / (1 + d)) + 1.0 for g, d in df.items()}
        self.unseen = math.log(1 + n) + 1.0
        self.texts = texts
        self.vectors = [self._weigh(c) for c in counts]

    def _weigh(self, counts: Counter[str]) -> dict[str, float]:
        vec = {g: (1.0 + math.log(c)) * self.idf.get(g, self.unseen) for g, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {g: v / norm for g, v in vec.items()}

    def best(self, text: str) -> tuple[float, int]:
        """(highest cosine, index of that text); (0.0, -1) for an empty set."""
        vec = self._weigh(char_ngrams(text))
        best, where = 0.0, -1
        for i, ref in enumerate(self.vectors):
            small, large = (vec, ref) if len(vec) < len(ref) else (ref, vec)
            cos = sum(v * large.get(g, 0.0) for g, v in small.items())
            if cos > best:
                best, where = cos, i
        return best, where
