"""Generic replies: answers that would fit any image (a phrase list, then n-gram similarity to a
set of generic answers). Only short replies are judged: a long reply that opens with a stock
phrase still carries content."""

from __future__ import annotations

from vlmlab.curate.filters.base import FILTERS, Filter, Verdict
from vlmlab.curate.lexicon import read_lines
from vlmlab.curate.ngrams import NgramIndex
from vlmlab.curate.sample import Sample, normalize_text


@FILTERS.register
class GenericFilter(Filter):
    name = "generic"

    def __init__(
        self,
        *,
        phrases: str = "lexicon/generic_phrases.txt",
        answers: str = "lexicon/generic_answers.txt",
        similarity: float = 0.6,
        max_words: int = 30,
    ) -> None:
        self.phrases = [normalize_text(p) for p in read_lines(phrases, "filters.generic.phrases")]
        answer_list = read_lines(answers, "filters.generic.answers")
        self.answers = NgramIndex([normalize_text(a) for a in answer_list])
        self.raw_answers = answer_list
        self.similarity, self.max_words = similarity, max_words

    def check(self, sample: Sample) -> Verdict | None:
        for turn, reply in enumerate(sample.replies):
            text = normalize_text(reply)
            if not text or len(text.split()) > self.max_words:
                continue
            padded = f" {text} "
            for phrase in self.phrases:
                if f" {phrase} " in padded:
                    return self.verdict(reply=turn, phrase=phrase)
            cos, where = self.answers.best(text)
            if cos >= self.similarity:
                return self.verdict(
                    reply=turn, similar_to=self.raw_answers[where], similarity=round(cos, 4)
                )
        return None
