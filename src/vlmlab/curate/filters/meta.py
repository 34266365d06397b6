"""AI meta-commentary and refusals ("As an AI ...", "I cannot see the image"): a model talking
about itself teaches the trained model to do the same."""

from __future__ import annotations

from vlmlab.curate.filters.base import FILTERS, Filter, Verdict
from vlmlab.curate.lexicon import read_lines
from vlmlab.curate.sample import Sample, normalize_text


@FILTERS.register
class MetaFilter(Filter):
    name = "meta"

    def __init__(self, *, phrases: str = "lexicon/meta_phrases.txt") -> None:
        self.phrases = [normalize_text(p) for p in read_lines(phrases, "filters.meta.phrases")]

    def check(self, sample: Sample) -> Verdict | None:
        for turn, reply in enumerate(sample.replies):
            padded = f" {normalize_text(reply)} "
            for phrase in self.phrases:
                if f" {phrase} " in padded:
                    return self.verdict(reply=turn, phrase=phrase)
        return None
