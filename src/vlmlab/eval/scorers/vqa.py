r"""VQAv2 soft accuracy (`type: vqa`) in three named modes, each equal to its reference.

Why modes: the published references disagree on which strings they normalise, so one
prediction can score 0.0 under one and 1.0 under another (`dog` against ten raw `the dog`).
A number is comparable only with numbers computed the same way, so the mode is a setting
(`eval.scoring.vqa.mode`, `vlmlab eval --vqa-mode`) written into every summary.

- `official` (default): GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py`,
  Python 3 version (branch `feature/update_style`, commit 0dc4ab7). The prediction is always
  normalised (punctuation, then number words / articles / contractions); the human answers are
  compared raw, with only the punctuation step applied, and only when the ten disagree.
  VQAv2's own annotations are already normalised, so on them this is the EvalAI server's number.
- `lmms_eval`: lmms-eval 0.7.3 `tasks/vqav2/utils.py` with `_task_utils/vqa_eval_metric.py`:
  prediction and answers fully normalised, always; commas between digits found with
  `(?<=\d)(\,)+(?=\d)` instead of `(\d)(\,)(\d)`; the mean by `statistics.mean`.
- `llava_testdev`: LLaVA's test-dev path: `scripts/convert_vqav2_for_submission.py` runs the
  EvalAI answer processor (`llava/eval/m4c_evaluator.py`) on the prediction, then the server
  scores it with the `official` logic (assumed: EvalAI runs the official script).

Quirks kept from the originals: the period-strip regex `(?!<=\d)` (a lookahead for the
literal "<=", so "5. apples" loses its period) and `re.UNICODE` (32) passed as `sub`'s count.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

from vlmlab.eval.scorers.base import SHORT_ANSWER_PROMPT, Item, Query, RowError, Scorer

VQA_MODES = ("official", "lmms_eval", "llava_testdev")  # the first is the default

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
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # official
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # lmms-eval / EvalAI processor
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


def vqa_process_punctuation(text: str, comma_strip: re.Pattern[str] = _COMMA_STRIP) -> str:
    """Official `processPunctuation`: drop or space out punctuation, strip non-decimal periods."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma_strip.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in `count`


def vqa_process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, articles out, contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """A prediction as the official script compares it (whitespace, punctuation, digits...)."""
    return vqa_process_digit_article(vqa_process_punctuation(_clean(text)))


def evalai_answer_processor(text: str) -> str:
    """LLaVA's / MMF's `EvalAIAnswerProcessor()(text)`, run on test-dev answers before upload."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean(text)
    return vqa_process_digit_article(vqa_process_punctuation(text, _COMMA_STRIP_EVALAI))


def _leave_one_out(prediction: str, answers: list[str]) -> list[float]:
    """min(1, #other humans agreeing / 3) for each human left out (VQAv2: 10 choose 9)."""
    return [
        min(1, float(sum(1 for j, a in enumerate(answers) if j != i and a == prediction)) / 3)
        for i in range(len(answers))
    ]


def _official(prediction: str, answers: Sequence[str]) -> float:
    pred = vqa_normalize(prediction)
    gts = list(answers)  # compared raw (the Python 3 script does not even strip them) ...
    if len(set(gts)) > 1:  # ... unless the humans disagree: then punctuation only
        gts = [vqa_process_punctuation(a) for a in gts]
    accs = _leave_one_out(pred, gts)
    return float(sum(accs)) / len(accs)


def _lmms_eval(prediction: str, answers: Sequence[str]) -> float:
    def norm(text: str) -> str:
        return vqa_process_digit_article(vqa_process_punctuation(_clean(text), _COMMA_STRIP_EVALAI))

    return float(statistics.mean(_leave_one_out(norm(prediction), [norm(a) for a in answers])))


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = VQA_MODES[0]) -> float:
    """VQAv2 soft accuracy: mean over the leave-one-out subsets of min(#humans agreeing / 3, 1).

    With the usual 10 answers that is the average over the 10 choose 9 subsets; `mode` says
    whose normalisation (see the module docstring).
    """
    if len(answers) < 2:
        raise ValueError("VQA accuracy needs several human answers (VQAv2 has 10)")
    if mode == "official":
        return _official(prediction, answers)
    if mode == "lmms_eval":
        return _lmms_eval(prediction, answers)
    if mode == "llava_testdev":
        return _official(evalai_answer_processor(prediction), answers)
    raise ValueError(f"VQA mode {mode!r} is not one of {', '.join(VQA_MODES)}")


class VQAScorer(Scorer):
    """VQAv2: the soft accuracy against 10 human answers, under the configured `mode`."""

    name = "vqa"
    prompt = SHORT_ANSWER_PROMPT
    choices = {"mode": VQA_MODES}
    example = {"question": "How many dogs?", "answers": ["2"] * 8 + ["two", "3"]}
    example_right, example_wrong = "Two.", "3"

    def validate(self, item: Item) -> None:
        if len(item.answers) < 2:
            raise RowError(
                "vqa needs the list of human answers (VQAv2 has 10); use type exact for one"
            )

    def score(self, query: Query, prediction: str) -> float:
        return vqa_accuracy(prediction, query.item.answers, self.settings["mode"])
