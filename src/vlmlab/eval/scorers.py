"""Benchmark scorers as pure functions: one metric definition each, as the benchmarks define them.

VQAv2 follows the official evaluation script (GT-Vision-Lab/VQA `vqaEval.py`), quirks included:
the period-strip regex keeps its original typo `(?!<=\\d)` and `sub` gets `re.UNICODE` (32) as
its count. The prediction is always normalised, as LLaVA's submission converter (the EvalAI
answer processor) does before the official script sees it; the human answers are normalised too,
which equals the official script whenever they disagree and changes nothing for the already-clean
annotations otherwise.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

# --------------------------------------------------------------------------- VQAv2

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


# --------------------------------------------------------------------------- exact match (GQA)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """GQA-style: lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(a) for a in answers))


# --------------------------------------------------------------------------- POPE


def pope_parse(prediction: str) -> str:
    """The POPE script's reading: first sentence, commas dropped, "no"/"not"/"No" word -> no."""
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Iterable[str], labels: Iterable[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and yes-ratio, as POPE reports them."""
    preds = [pope_parse(p) == "yes" for p in predictions]
    gold = [str(label).strip().lower() == "yes" for label in labels]
    if len(preds) != len(gold):
        raise ValueError("predictions and labels differ in length")
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(preds) / n if n else 0.0,
    }


# --------------------------------------------------------------------------- multiple choice

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
