"""Length bounds: one-word captions and runaway replies both hurt; the bounds are per reply
(words) and per conversation (turns)."""

from __future__ import annotations

from vlmlab.curate.filters.base import FILTERS, Filter, Verdict
from vlmlab.curate.sample import Sample


@FILTERS.register
class LengthFilter(Filter):
    name = "length"

    def __init__(
        self, *, min_reply_words: int = 1, max_reply_words: int = 1000, max_turns: int = 200
    ) -> None:
        self.min_words, self.max_words, self.max_turns = min_reply_words, max_reply_words, max_turns

    def check(self, sample: Sample) -> Verdict | None:
        if len(sample.turns) > self.max_turns:
            return self.verdict(turns=len(sample.turns), max_turns=self.max_turns)
        for turn, reply in enumerate(sample.replies):
            words = len(reply.split())
            if words < self.min_words:
                return self.verdict(reply=turn, words=words, min_reply_words=self.min_words)
            if words > self.max_words:
                return self.verdict(reply=turn, words=words, max_reply_words=self.max_words)
        return None
