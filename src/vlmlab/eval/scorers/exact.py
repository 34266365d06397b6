"""Exact match (`type: exact`, GQA style): normalised prediction equals any answer."""

from __future__ import annotations

import string
from collections.abc import Sequence

from vlmlab.eval.scorers.base import SHORT_ANSWER_PROMPT, Query, Scorer

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """GQA-style: lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(a) for a in answers))


class ExactScorer(Scorer):
    """GQA-style exact match; the type of a row that names none."""

    name = "exact"
    prompt = SHORT_ANSWER_PROMPT
    example = {"question": "What colour is the shape?", "answers": ["red", "dark red"]}
    example_right, example_wrong = "Red.", "blue"

    def score(self, query: Query, prediction: str) -> float:
        return exact_match(prediction, query.item.answers)
