"""VQAv2 soft accuracy (`type: vqa`), as the official evaluation defines it.

This follows the official evaluation script (GT-Vision-Lab/VQA `vqaEval.py`), quirks included:
the period-strip regex keeps its original typo `(?!<=\\d)` and `sub` gets `re.UNICODE` (32) as
its count. The prediction is always normalised, as LLaVA's submission converter (the EvalAI
answer processor) does before the official script sees it; the human answers are normalised too,
which equals the official script whenever they disagree and changes nothing for the already-clean
annotations otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmlab.eval.scorers.base import SHORT_ANSWER_PROMPT, Item, Query, RowError, Scorer

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official script's pattern
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


def vqa_process_punctuation(text: str) -> str:
    """Official `processPunctuation`: drop or space out punctuation, strip non-decimal periods."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in `count`


def vqa_process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, articles out, contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
    """A VQAv2 answer as the official script compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy: mean over the leave-one-out subsets of min(#humans agreeing / 3, 1).

    With the usual 10 answers that is the average over the 10 choose 9 subsets.
    """
    if len(answers) < 2:
        raise ValueError("VQA accuracy needs several human answers (VQAv2 has 10)")
    pred = vqa_normalize(prediction).lower()
    gts = [vqa_normalize(a).lower() for a in answers]
    total = 0.0
    for left_out in range(len(gts)):
        matching = sum(1 for i, gt in enumerate(gts) if i != left_out and gt == pred)
        total += min(1.0, matching / 3)
    return total / len(gts)


class VQAScorer(Scorer):
    """VQAv2: the soft accuracy against 10 human answers."""

    name = "vqa"
    prompt = SHORT_ANSWER_PROMPT
    example = {"question": "How many dogs?", "answers": ["2"] * 8 + ["two", "3"]}
    example_right, example_wrong = "Two.", "3"

    def validate(self, item: Item) -> None:
        if len(item.answers) < 2:
            raise RowError(
                "vqa needs the list of human answers (VQAv2 has 10); use type exact for one"
            )

    def score(self, query: Query, prediction: str) -> float:
        return vqa_accuracy(prediction, query.item.answers)
