"""Language: a cheap heuristic, no model. The replies' letters must be mostly Latin script
(`min_latin`, by Unicode character name) and, once there are `min_words` words, a share of them
must be English function words (`min_stopwords`, from a list). It tells English from other
scripts and from most Latin-script languages; it cannot tell English from English-like noise."""

from __future__ import annotations

import re
import unicodedata

from vlmlab.curate.filters.base import FILTERS, Filter, Verdict
from vlmlab.curate.lexicon import read_lines
from vlmlab.curate.sample import Sample

_WORD = re.compile(r"[^\W\d_]+")


def latin_share(text: str) -> float:
    """Share of letters whose Unicode name starts with LATIN (1.0 when there are no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    latin = sum(1 for c in letters if unicodedata.name(c, "").startswith("LATIN"))
    return latin / len(letters)


@FILTERS.register
class LanguageFilter(Filter):
    name = "language"

    def __init__(
        self,
        *,
        stopwords: str = "lexicon/stopwords_en.txt",
        min_latin: float = 0.8,
        min_stopwords: float = 0.1,
        min_words: int = 8,
    ) -> None:
        lines = read_lines(stopwords, "filters.language.stopwords")
        self.stopwords = frozenset(w for line in lines for w in line.lower().split())
        self.min_latin, self.min_stopwords, self.min_words = min_latin, min_stopwords, min_words

    def check(self, sample: Sample) -> Verdict | None:
        text = " ".join(sample.replies)
        share = latin_share(text)
        if share < self.min_latin:
            return self.verdict(latin_share=round(share, 3), min_latin=self.min_latin)
        words = [w.lower() for w in _WORD.findall(text)]
        if len(words) >= self.min_words:
            ratio = sum(w in self.stopwords for w in words) / len(words)
            if ratio < self.min_stopwords:
                return self.verdict(
                    stopword_share=round(ratio, 3), min_stopwords=self.min_stopwords
                )
        return None
