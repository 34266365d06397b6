"""Multiple choice (`type: mc`, ScienceQA / MMBench): MMBench's option extraction, CircularEval."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from vlmlab.eval.scorers.base import MC_PROMPT, Item, Query, Row, RowError, Scorer
from vlmlab.eval.scorers.exact import normalize_exact

LETTERS = string.ascii_uppercase
# `extract` setting (eval.scoring.mc.extract): where MMBench's extractor finds no option,
# `rules` applies ours (below); `mmbench_exact` scores it wrong, as VLMEvalKit does under its
# `exact_matching` policy (no LLM judge), so the number equals VLMEvalKit's judge-free one.
MC_EXTRACTS = ("rules", "mmbench_exact")

# MMBench's extractor, transcribed from VLMEvalKit `vlmeval/utils/matching_util.py`
# (open-compass/VLMEvalKit commit e8e78f05, Apache-2.0): `can_infer` = `can_infer_option`,
# then `can_infer_text`. The test compares it with the vendored original
# (tests/references/vlmevalkit/matching_util.py).
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMBENCH_BLANKED = ".()[],:;!*#{}"  # markup blanked before looking for a lone letter
_MMBENCH_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")

# Our rules where MMBench would ask its LLM judge.
_ONLY_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])[).:]\s")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-Z])\b(?![a-z'])")


def mmbench_infer(prediction: str, options: Sequence[str]) -> str | None:
    """VLMEvalKit's `can_infer(prediction, {A: option, ...})`: a letter, "Z" or None.

    A letter: the option MMBench reads. "Z": a refusal or a lone "Z" (MMBench scores it wrong).
    None (VLMEvalKit's False): MMBench would ask its LLM judge, or under its `exact_matching`
    policy score the answer wrong. Run as if the environment variable VERBOSE is unset (set, it
    rejects a lone "A" in answers over three words as a possible article).
    """
    letters = LETTERS[: len(options)]
    answer = str(prediction)
    if "Failed to obtain answer via API" in answer:
        return _mmbench_text(answer, options)
    if any(refusal in answer for refusal in _MMBENCH_REFUSALS):
        return "Z"
    blanked = answer
    for char in _MMBENCH_BLANKED:
        blanked = blanked.replace(char, " ")
    splits = blanked.split()
    count = sum(letter in splits for letter in letters)
    if count == 1:
        for letter in letters:
            if letter in splits and splits.index(letter) > len(splits) - 5:
                return letter
    elif count == 0 and "Z" in splits:
        return "Z"
    match = _MMBENCH_VERBOSE.search(answer)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return _mmbench_text(answer, options)


def _mmbench_text(answer: str, options: Sequence[str]) -> str | None:
    """`can_infer_text`: the one option whose text is in a not-too-long answer (substring)."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(o)) for o in options):
        return None
    found = [LETTERS[i] for i, o in enumerate(options) if str(o).lower() in answer]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: Sequence[str], rules: bool = True) -> int | None:
    """Index of the option a free-form answer picks, or None (wrong).

    First MMBench's own extractor (`mmbench_infer`): its letter wins, and its "Z" (refusal) is
    None. Where it finds nothing (MMBench then asks an LLM judge; without one it scores the
    answer wrong), deterministic rules in order: a lone letter in any case ("b", "(c)"), a
    leading letter ("A. red" in a long answer), "The answer is A", the option text itself or
    the one option whose text stands in the answer as words, then a single capital option
    letter standing alone (`rules=False`: none of these, VLMEvalKit's `exact_matching`). So
    `**B**`, `[C]`, `(A)`, `B.` read as MMBench reads them.
    """
    letters = LETTERS[: len(options)]
    inferred = mmbench_infer(prediction, options)
    if inferred is not None:
        return letters.index(inferred) if inferred in letters else None
    if not rules:
        return None
    text = prediction.strip()
    match = _ONLY_LETTER.match(text)
    if match and match.group(1).upper() in letters:
        return letters.index(match.group(1).upper())
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
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
    alone = {w for w in re.split(r"[\s.,:;()!?*\[\]{}#]+", text) if len(w) == 1 and w in letters}
    if len(alone) == 1:
        return letters.index(alone.pop())
    return None


def choice_correct(
    prediction: str, options: Sequence[str], answer_index: int, rules: bool = True
) -> float:
    return float(extract_choice(prediction, options, rules) == answer_index)


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
    choices = {"extract": MC_EXTRACTS}
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
        rules = self.settings["extract"] == "rules"
        return choice_correct(prediction, query.options, query.answer_index, rules)

    def item_score(self, scores: list[float]) -> float:
        return float(all(s == 1.0 for s in scores))

    def metrics(self, rows: list[Row], *, mixed: bool, circular: bool) -> dict[str, float]:
        """With circular evaluation, the plain (first rotation) accuracy as well."""
        if not circular:
            return {}
        first = [r["score"] for r in rows if r["rotation"] == 0]
        return {"accuracy_first_rotation": sum(first) / len(first)}
