"""POPE object probing (`type: pope`): yes/no answers, read as the POPE script reads them.

Equal, answer for answer and metric for metric, to POPE's `evaluate.py` (AoiDragon/POPE) and
LLaVA's `llava/eval/eval_pope.py` (tests/test_scorer_references.py runs both). Known, intended
differences: with no "yes" predicted (or no "yes" label) those scripts divide by zero, here
precision / recall / F1 are 0.0; LLaVA reports each COCO category (one label file each) on its
own, here the benchmark file is one table (split files to get categories); their labels are
"no" or anything else (= yes), here a label must be yes or no (any case) or the row is rejected.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlmlab.eval.scorers.base import Item, Query, Row, RowError, Scorer


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


class PopeScorer(Scorer):
    """Per answer: right or wrong; per benchmark: precision, recall, F1 and yes-ratio too."""

    name = "pope"
    example = {"question": "Is there a dog in the image?", "answer": "no"}
    example_right, example_wrong = "No, there is not.", "Yes"

    def validate(self, item: Item) -> None:
        if item.answers[0].strip().lower() not in ("yes", "no"):
            raise RowError(f"pope answer must be yes or no, got {item.answers[0]!r}")

    def score(self, query: Query, prediction: str) -> float:
        return float(pope_parse(prediction) == query.item.answers[0].strip().lower())

    def metrics(self, rows: list[Row], *, mixed: bool, circular: bool) -> dict[str, float]:
        """POPE's table; prefixed `pope_` beside other types, else `accuracy` is the overall one."""
        values = pope_metrics([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
        prefix = "pope_" if mixed else ""
        return {prefix + k: v for k, v in values.items() if prefix or k != "accuracy"}
