"""Scorers on hand-made cases whose values follow from each benchmark's definition, and every
registered scorer (enumerated from the registry, built-in or user) through the runner's code."""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path

import pytest

from vlmlab.eval import runner, scorers

SCORERS = scorers.registered()  # the registry: this package's modules, $VLMLAB_SCORERS, ...

# ----------------------------------------------------------------------------- the registry


def test_the_builtin_types_are_registered() -> None:
    assert {"vqa", "exact", "pope", "mc"} <= set(SCORERS)
    assert scorers.DEFAULT_TYPE in SCORERS


def test_every_module_of_the_package_registers_a_scorer() -> None:
    """Discovery is by import: a file in vlmlab/eval/scorers/ needs no list entry anywhere."""
    modules = {m.name for m in pkgutil.iter_modules(scorers.__path__) if m.name != "base"}
    registry = scorers.discover()
    owners = {cls.__module__.rsplit(".", 1)[-1] for cls in registry.values()}
    assert modules <= owners, f"modules without a registered Scorer: {modules - owners}"


def _bench(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", SCORERS)
def test_every_scorer_scores_its_example_through_the_runner(name: str, tmp_path: Path) -> None:
    """The scorer's example row parses; its right answer scores 1, its wrong one less, and the
    summary's accuracy is their mean, with and without circular evaluation."""
    cls = scorers.discover()[name]
    assert cls.example, f"{cls.__qualname__} needs an `example` row"
    rows = [{**cls.example, "id": tag, "type": name} for tag in ("right", "wrong")]
    rows.append({k: v for k, v in rows[0].items() if k not in ("answer", "answers")} | {"id": "x"})
    items, rejected = runner.read_benchmark(_bench(tmp_path / f"{name}.jsonl", rows))
    assert [i.id for i in items] == ["right", "wrong"]
    assert [r["line"] for r in rejected] == [3] and "no answer" in rejected[0]["reason"]
    for circular in (False, True):
        predictions = []
        for item in items:
            answer = cls.example_right if item.id == "right" else cls.example_wrong
            queries = runner._queries(item, short_answer_prompt=True, circular=circular)
            assert queries and all(q.item is item for q in queries)
            predictions += [runner.prediction_row(q, answer) for q in queries]
        by_id = {i.id: [r["score"] for r in predictions if r["id"] == i.id] for i in items}
        assert all(0.0 <= s <= 1.0 for scores in by_id.values() for s in scores)
        right = scorers.get_scorer(name).item_score(by_id["right"])
        wrong = scorers.get_scorer(name).item_score(by_id["wrong"])
        assert right == 1.0 and wrong < 1.0, (name, circular, by_id)
        metrics = runner.summarize(predictions, items, circular)
        assert metrics["accuracy"] == pytest.approx((right + wrong) / 2)


def test_an_unknown_type_is_rejected_listing_every_registered_type(tmp_path: Path) -> None:
    bench = _bench(
        tmp_path / "b.jsonl", [{"id": "a", "question": "Q", "answer": "x", "type": "essay"}]
    )
    items, rejected = runner.read_benchmark(bench)
    assert items == []
    reason = rejected[0]["reason"]
    assert "'essay'" in reason
    assert all(name in reason for name in SCORERS)


def test_a_type_taken_by_another_class_is_refused() -> None:
    from vlmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="two scorers named 'exact'"):

        class Again(scorers.Scorer):
            name = "exact"

    assert scorers.discover()["exact"] is scorers.ExactScorer


def test_mixed_benchmark_metrics_keep_their_names(tmp_path: Path) -> None:
    """POPE's table is prefixed beside other types; circular mc adds the first-rotation score."""
    rows: list[dict[str, object]] = [
        {"id": "p", "question": "Dog?", "answer": "yes", "type": "pope"},
        {"id": "m", "question": "Pick", "options": ["x", "y"], "answer": "A", "type": "mc"},
    ]
    items, _ = runner.read_benchmark(_bench(tmp_path / "b.jsonl", rows))
    queries = [q for i in items for q in runner._queries(i, False, circular=True)]
    predicted = [runner.prediction_row(q, "yes" if q.item.type == "pope" else "A") for q in queries]
    metrics = runner.summarize(predicted, items, circular=True)
    assert metrics["accuracy"] == 0.5  # pope right; mc right in rotation 0 only
    assert metrics["accuracy_first_rotation"] == 1.0
    assert metrics["pope_accuracy"] == 1.0 and metrics["pope_yes_ratio"] == 1.0
    only_pope = runner.summarize(predicted[:1], items[:1], circular=True)
    assert set(only_pope) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}


# ----------------------------------------------------------------------------- VQAv2


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("a dog", "dog"),  # articles removed
        ("The red ball", "red ball"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions map
        ("yes.", "yes"),  # a sentence-final period goes
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # comma between digits: punctuation removed without a space
        ("red,blue", "red blue"),  # otherwise a comma becomes a space
        ("red, blue", "red blue"),  # "p " present: removed
        ("black/white", "black white"),
        ("hot-dog", "hot dog"),
        ("  Yes\n", "yes"),
        ("the cat's toy", "cat's toy"),  # apostrophes are not in the punctuation list
    ],
)
def test_vqa_normalisation_follows_the_official_script(raw: str, normalised: str) -> None:
    assert scorers.vqa_normalize(raw) == normalised


def test_vqa_period_strip_keeps_the_official_typo() -> None:
    # `(?!<=\d)` is a negative lookahead for the literal "<=", not a lookbehind for a digit:
    # a period after a digit but before a non-digit is stripped too.
    assert scorers.vqa_process_punctuation("5. apples") == "5 apples"
    assert scorers.vqa_process_punctuation("2.5") == "2.5"


def test_vqa_soft_accuracy_ten_choose_nine() -> None:
    ten = ["2"] * 2 + ["3"] * 8
    # 2 humans agree: leaving out one of them (2 of 10 subsets) -> 1/3, the other 8 -> 2/3
    assert scorers.vqa_accuracy("2", ten) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert scorers.vqa_accuracy("2", ten) == pytest.approx(0.6)
    # 8 agree: every subset keeps >= 7 -> 1
    assert scorers.vqa_accuracy("3", ten) == 1.0
    # 3 agree: leaving one of them out (3 subsets) -> 2/3, otherwise (7) -> 1
    three = ["cat"] * 3 + ["dog"] * 7
    assert scorers.vqa_accuracy("cat", three) == pytest.approx((3 * (2 / 3) + 7) / 10)
    # 4 agree: always >= 3 among the 9 -> 1
    assert scorers.vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    # 1 agrees: the subset without it -> 0, the 9 others -> 1/3
    assert scorers.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert scorers.vqa_accuracy("bird", ten) == 0.0


def test_vqa_modes_normalise_different_strings() -> None:
    """official: the prediction fully, human answers only by punctuation (and only when they
    disagree); lmms_eval: both fully. tests/test_scorer_references.py runs the originals."""
    answers = ["2"] * 5 + ["two"] * 3 + ["3"] * 2
    assert scorers.vqa_accuracy("Two.", answers, "lmms_eval") == 1.0  # "two" -> "2": 8 say 2
    assert scorers.vqa_accuracy("Two.", answers) == 1.0  # official: 5 raw "2" are enough
    assert scorers.vqa_accuracy("two", ["two"] * 10) == 0.0  # official: "2" vs raw "two"
    assert scorers.vqa_accuracy("two", ["two"] * 10, "lmms_eval") == 1.0
    assert scorers.vqa_accuracy("The dog", ["dog"] * 10) == 1.0
    assert scorers.vqa_accuracy("dog", ["dog."] * 9 + ["cat"]) == 1.0  # disagree: "dog." -> "dog"
    assert scorers.vqa_accuracy("dog", ["dog."] * 10) == 0.0  # agree: compared raw
    with pytest.raises(ValueError, match="not one of"):
        scorers.vqa_accuracy("dog", ["dog"] * 10, "vqav2")
    with pytest.raises(ValueError, match="several human answers"):
        scorers.vqa_accuracy("dog", ["dog"])


# ----------------------------------------------------------------------------- exact match


def test_exact_match_normalises_case_space_and_punctuation() -> None:
    assert scorers.exact_match("  Red. ", ["red"]) == 1.0
    assert scorers.exact_match("top-left", ["topleft"]) == 1.0
    assert scorers.exact_match("dark red", ["red"]) == 0.0
    assert scorers.exact_match("in the top left", ["top left", "in the top left"]) == 1.0
    assert scorers.exact_match("the red", ["red"]) == 0.0  # GQA keeps articles


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not there", "no"),
        ("Yes. No dogs were harmed.", "yes"),  # only the first sentence counts
        ("I see a dog", "yes"),  # anything without no/not reads as yes
        ("Nothing", "yes"),  # "Nothing" is not the word "no"
        ("no,", "no"),  # commas are dropped before splitting
    ],
)
def test_pope_answer_parsing(text: str, parsed: str) -> None:
    assert scorers.pope_parse(text) == parsed


def test_pope_metrics_on_a_hand_table() -> None:
    # labels:      yes yes yes yes no  no  no  no  no  no
    # predictions: yes yes yes no  yes no  no  no  no  no  -> TP 3, FN 1, FP 1, TN 5
    labels = ["yes"] * 4 + ["no"] * 6
    predictions = ["Yes", "yes.", "Yes, it is", "No"] + ["yes"] + ["no"] * 5
    metrics = scorers.pope_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(8 / 10)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["yes_ratio"] == pytest.approx(4 / 10)


def test_pope_metrics_without_positive_predictions_are_zero_not_nan() -> None:
    metrics = scorers.pope_metrics(["no", "no"], ["yes", "no"])
    assert metrics == {
        "accuracy": 0.5,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


# ----------------------------------------------------------------------------- multiple choice

OPTIONS = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.mark.parametrize(
    ("prediction", "index"),
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B)", 1),
        ("C: green triangle", 2),
        ("(D) yellow star", 3),
        ("The answer is C.", 2),
        ("answer: (A)", 0),
        ("Answer: D", 3),
        ("blue square", 1),
        ("Blue square.", 1),
        ("It is a green triangle.", 2),  # the option text inside a sentence
        ("I think B is right", 1),  # one standalone letter
        ("A red circle", 0),  # the option text wins over the article "A"
        ("E", None),  # not an option letter
        ("purple", None),
        ("A or B", None),  # ambiguous
    ],
)
def test_option_letter_extraction(prediction: str, index: int | None) -> None:
    assert scorers.extract_choice(prediction, OPTIONS) == index


def test_rotations_move_the_answer_with_its_option() -> None:
    for shift in range(4):
        rotated, answer = scorers.rotate_options(OPTIONS, 1, shift)
        assert rotated[answer] == "blue square"
        assert sorted(rotated) == sorted(OPTIONS)
    assert {tuple(scorers.rotate_options(OPTIONS, 0, s)[0]) for s in range(4)}.__len__() == 4


def test_circular_eval_needs_every_rotation_right() -> None:
    results = {"q1": [True, True, True, True], "q2": [True, False, True, True], "q3": [True, True]}
    assert scorers.circular_accuracy(results) == pytest.approx(2 / 3)
    assert scorers.circular_accuracy({}) == 0.0
