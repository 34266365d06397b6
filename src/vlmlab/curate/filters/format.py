"""Format violations a trainer would mis-learn or `vlmlab shards` would reject later: role
order, empty or truncated replies, broken markup, leftover control tokens, a missing or
repeated `<image>`."""

from __future__ import annotations

import re

from vlmlab.curate.filters.base import FILTERS, Filter, Verdict
from vlmlab.curate.sample import Sample
from vlmlab.text import IMAGE_TOKEN

ROLES = ("human", "gpt")
# a reply cut mid-sentence ends on one of these words or characters
_DANGLING = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "to",
        "with",
        "in",
        "on",
        "at",
        "for",
        "from",
        "by",
        "that",
        "which",
    ]
)
_CUT_CHARS = ",;:(-"
_CONTROL = re.compile(r"</s>|<s>|<\|[a-z_]+\|>|\[/?INST\]|<unk>|<pad>", re.IGNORECASE)
_PAIRS = {"(": ")", "[": "]", "{": "}"}


def markup_problem(text: str) -> str:
    """'' when the text's markup is balanced, else what is broken."""
    if text.count("```") % 2:
        return "unclosed ``` code fence"
    depth = {o: 0 for o in _PAIRS}
    closers = {c: o for o, c in _PAIRS.items()}
    for char in text:
        if char in depth:
            depth[char] += 1
        elif char in closers:
            depth[closers[char]] -= 1
            if depth[closers[char]] < 0:
                return f"unmatched {char!r}"
    open_ = [o for o, d in depth.items() if d > 0]
    if open_:
        return f"unclosed {open_[0]!r}"
    match = _CONTROL.search(text)
    return f"control token {match.group()!r} in the text" if match else ""


def truncated(text: str, min_words: int) -> bool:
    """A reply that stops mid-sentence: ends on a comma/colon/opening bracket, or (when at least
    `min_words` long) on a dangling function word."""
    stripped = text.rstrip()
    if not stripped:
        return False
    if stripped[-1] in _CUT_CHARS:
        return True
    words = stripped.split()
    return len(words) >= min_words and words[-1].lower() in _DANGLING


@FILTERS.register
class FormatFilter(Filter):
    name = "format"

    def __init__(self, *, truncated_min_words: int = 4, check_image_token: bool = True) -> None:
        self.truncated_min_words = truncated_min_words
        self.check_image_token = check_image_token

    def check(self, sample: Sample) -> Verdict | None:
        problem = self._problem(sample)
        return self.verdict(problem=problem) if problem else None

    def _problem(self, sample: Sample) -> str:
        if sample.structure_error:
            return sample.structure_error
        turns = sample.turns
        if not turns:
            return "empty conversation"
        for i, turn in enumerate(turns):
            expected = ROLES[i % 2]
            if turn.role != expected:
                return f"turn {i} is from {turn.role!r}, expected {expected!r} (human, gpt, ...)"
            if not turn.text.strip() or (turn.text.strip() == IMAGE_TOKEN and turn.role == "gpt"):
                return f"turn {i} ({turn.role}) is empty"
        if turns[-1].role != "gpt":
            return "the conversation ends on a human turn (no reply)"
        for i, turn in enumerate(turns):
            if turn.role == "gpt" and truncated(turn.text, self.truncated_min_words):
                return f"reply {i} looks truncated: ...{turn.text.rstrip()[-30:]!r}"
            broken = markup_problem(turn.text.replace(IMAGE_TOKEN, ""))
            if broken:
                return f"turn {i}: {broken}"
        if self.check_image_token:
            counts = [t.text.count(IMAGE_TOKEN) for t in turns]
            total = sum(counts)
            if sample.image and total != 1:
                return f"{total} {IMAGE_TOKEN} tokens for one image (expected exactly 1)"
            if not sample.image and total:
                return f"{IMAGE_TOKEN} in a text-only entry"
            if total and counts.index(1) % 2:
                return f"{IMAGE_TOKEN} in a reply, not in a human turn"
        return ""
