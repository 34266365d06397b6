"""Scorers on hand-made cases whose values follow from each benchmark's definition."""

from __future__ import annotations

import pytest

from vlmlab.eval import scorers

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


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    answers = ["2"] * 5 + ["two"] * 3 + ["3"] * 2  # "two" -> "2": 8 humans say 2
    assert scorers.vqa_accuracy("Two.", answers) == 1.0
    assert scorers.vqa_accuracy("The dog", ["dog"] * 10) == 1.0
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
