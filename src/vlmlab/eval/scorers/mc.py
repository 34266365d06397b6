"""Multiple choice (`type: mc`, ScienceQA / MMBench): option letters, MMBench CircularEval."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from vlmlab.eval.scorers.base import MC_PROMPT, Item, Query, Row, RowError, Scorer
from vlmlab.eval.scorers.exact import normalize_exact

LETTERS = string.ascii_uppercase
_ONLY_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])[).:]\s")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-Z])\b(?![a-z'])")


def extract_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-form answer picks (ScienceQA / MMBench style), or None.

    Tried in order: a bare letter ("A", "(A)", "A."), a leading letter ("A. red", "(B) blue"),
    "The answer is A", the option text itself, then a single option letter standing alone.
    """
    letters = LETTERS[: len(options)]
    text = prediction.strip()
    for pattern in (_ONLY_LETTER, _LEADING_LETTER, _ANSWER_IS):
        match = pattern.search(text)
        if match and match.group(1) in letters:
            return letters.index(match.group(1))
    norm = normalize_exact(text)
    by_text = [i for i, option in enumerate(options) if normalize_exact(option) == norm]
    if len(by_text) == 1:
        return by_text[0]
    contained = [
        i
        for i, o in enumerate(options)
        if normalize_exact(o) and f" {normalize_exact(o)} " in f" {norm} "
    ]
    if len(contained) == 1:
        return contained[0]
    alone = {w for w in re.split(r"[\s.,:;()!?]+", text) if len(w) == 1 and w in letters}
    if len(alone) == 1:
        return letters.index(alone.pop())
    return None


def choice_correct(prediction: str, options: Sequence[str], answer_index: int) -> float:
    return float(extract_choice(prediction, options) == answer_index)


def rotate_options(options: Sequence[str], answer_index: int, shift: int) -> tuple[list[str], int]:
    """MMBench circular shift: option i moves to position (i - shift) mod N."""
    n = len(options)
    rotated = [options[(i + shift) % n] for i in range(n)]
    return rotated, (answer_index - shift) % n


def circular_accuracy(correct_by_question: dict[str, list[bool]]) -> float:
    """MMBench CircularEval: a question counts only if every rotation of its options is right."""
    if not correct_by_question:
        return 0.0
    return sum(all(v) for v in correct_by_question.values()) / len(correct_by_question)


class MCScorer(Scorer):
    """Options lettered A, B, ...; with circular evaluation every rotation must be right."""

    name = "mc"
    prompt = MC_PROMPT
    example = {"question": "Which shape?", "options": ["circle", "square"], "answer": "B"}
    example_right, example_wrong = "square", "A"  # the option text: right in every rotation

    def validate(self, item: Item) -> None:
        options = item.row.get("options")
        if not isinstance(options, list) or len(options) < 2 or len(options) > 26:
            raise RowError("mc needs `options`: a list of 2 to 26 strings")
        item.options = [str(o) for o in options]
        letters = LETTERS[: len(options)]
        gold = item.answers[0].strip()
        if gold.upper().strip("().") in letters and len(gold.strip("().")) == 1:
            item.answer_index = letters.index(gold.upper().strip("()."))
        elif gold in item.options:
            item.answer_index = item.options.index(gold)
        else:
            raise RowError(f"mc answer {gold!r} is neither an option letter nor an option's text")

    def queries(self, item: Item, short_answer_prompt: bool, circular: bool) -> list[Query]:
        """One query per rotation of the options (circular), else the options as given."""
        queries = []
        for shift in range(len(item.options) if circular else 1):
            options, answer = rotate_options(item.options, item.answer_index, shift)
            lines = [item.question, *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))]
            if short_answer_prompt and self.prompt:
                lines.append(self.prompt)
            queries.append(Query(item, "\n".join(lines), options, answer, shift))
        return queries

    def score(self, query: Query, prediction: str) -> float:
        return choice_correct(prediction, query.options, query.answer_index)

    def item_score(self, scores: list[float]) -> float:
        return float(all(s == 1.0 for s in scores))

    def metrics(self, rows: list[Row], *, mixed: bool, circular: bool) -> dict[str, float]:
        """With circular evaluation, the plain (first rotation) accuracy as well."""
        if not circular:
            return {}
        first = [r["score"] for r in rows if r["rotation"] == 0]
        return {"accuracy_first_rotation": sum(first) / len(first)}
