"""Synthetic benchmarks over the held-out scenes (data=scenes, data=scenes_hires).

Each writer turns the held-out records (objects with their cells, sizes and boxes) into
`vlmlab eval` JSONL rows scored by the existing scorers: exact (colour, shape, position), vqa
(count, 10 identical human answers), pope (relations and object probing: yes/no), mc. Answers
are balanced where a constant answer would otherwise score well: yes and no equally often,
the mc answer letter cycles A-D, counts are balanced 1-6 by the generator.

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
per image up to 3 objects that are there (yes) and as many that are not (no); the absent ones
are sampled `random`ly, or the most frequent objects of the training split (`popular`), or
those that co-occur most with the image's objects in the training split (`adversarial`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vlmlab.data.scenes import (
    COLOUR_QUESTIONS,
    COLOURS,
    COUNT_QUESTIONS,
    EXIST_QUESTIONS,
    POSITION_QUESTIONS,
    POSITIONS,
    RELATION_QUESTIONS,
    SHAPE_QUESTIONS,
    SHAPES,
    SIZED_COLOUR_QUESTION,
    where,
)

Row = dict[str, Any]
World = dict[str, Any]  # world.json: kind, spec, frequency, cooccurrence (training split)
SceneWriter = Callable[[list[Row], World, np.random.Generator], list[Row]]
POPE_OBJECTS = 3  # per image, as the POPE paper


def _name(obj: Row) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _colour(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    """The held-out question itself: an object's colour, the object named by its cell."""
    return [
        {
            "id": r["id"],
            "image": r["image"],
            "question": r["question"],
            "answer": r["answer"],
            "type": "exact",
        }
        for r in records
    ]


def _shape(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    rows = []
    for r in records:
        obj = r["objects"][int(rng.integers(len(r["objects"])))]
        question = SHAPE_QUESTIONS[0].format(where=where(obj["position"]))
        rows.append(
            {
                "id": r["id"],
                "image": r["image"],
                "question": question,
                "answer": obj["shape"],
                "type": "exact",
            }
        )
    return rows


def _count(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    return [
        {
            "id": r["id"],
            "image": r["image"],
            "question": COUNT_QUESTIONS[0],
            "answers": [str(len(r["objects"]))] * 10,
            "type": "vqa",
        }
        for r in records
    ]


def _position(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    rows = []
    for r in records:
        obj = r["objects"][int(rng.integers(len(r["objects"])))]
        question = POSITION_QUESTIONS[0].format(name=_name(obj))
        answers = [obj["position"], where(obj["position"])]
        rows.append(
            {
                "id": r["id"],
                "image": r["image"],
                "question": question,
                "answers": answers,
                "type": "exact",
            }
        )
    return rows


def _relations(obj_a: Row, obj_b: Row) -> list[str]:
    holds = []
    if obj_a["column"] < obj_b["column"]:
        holds.append("left")
    if obj_a["column"] > obj_b["column"]:
        holds.append("right")
    if obj_a["row"] < obj_b["row"]:
        holds.append("above")
    if obj_a["row"] > obj_b["row"]:
        holds.append("below")
    return holds


def _relation(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    """Per image with two or more objects: "is a <rel> b?" (yes) and "is b <rel> a?" (no)."""
    rows = []
    for r in records:
        objects = r["objects"]
        pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if i != j]
        if not pairs:
            continue
        i, j = pairs[int(rng.integers(len(pairs)))]
        a, b = objects[i], objects[j]
        relation = str(rng.choice(_relations(a, b)))  # distinct cells: something always holds
        template = RELATION_QUESTIONS[relation]
        for suffix, (x, y), answer in (("yes", (a, b), "yes"), ("no", (b, a), "no")):
            question = template.format(a=_name(x), b=_name(y))
            rows.append(
                {
                    "id": f"{r['id']}-{suffix}",
                    "image": r["image"],
                    "question": question,
                    "answer": answer,
                    "type": "pope",
                }
            )
    return rows


def _mc(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
    """Four options; the question cycles position / colour / shape, the answer letter A-D."""
    rows = []
    for index, r in enumerate(records):
        obj = r["objects"][int(rng.integers(len(r["objects"])))]
        kind = index % 3
        if kind == 0:
            question, truth, pool = (
                POSITION_QUESTIONS[0].format(name=_name(obj)),
                obj["position"],
                list(POSITIONS),
            )
        elif kind == 1:
            question, truth, pool = (
                COLOUR_QUESTIONS[0].format(where=where(obj["position"])),
                obj["colour"],
                list(COLOURS),
            )
        else:
            question, truth, pool = (
                SHAPE_QUESTIONS[0].format(where=where(obj["position"])),
                obj["shape"],
                list(SHAPES),
            )
        options = [str(o) for o in rng.permutation([p for p in pool if p != truth])[:3]]
        answer = index % 4
        options.insert(answer, truth)
        rows.append(
            {
                "id": r["id"],
                "image": r["image"],
                "question": question,
                "options": options,
                "answer": "ABCD"[answer],
                "type": "mc",
            }
        )
    return rows


def _all_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _pope(strategy: str) -> SceneWriter:
    def write(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
        frequency: dict[str, int] = world.get("frequency", {})
        cooccurrence: dict[str, dict[str, int]] = world.get("cooccurrence", {})
        by_frequency = sorted(_all_names(), key=lambda n: (-frequency.get(n, 0), n))
        rows = []
        for r in records:
            present = [_name(o) for o in r["objects"]]
            k = min(POPE_OBJECTS, len(present))
            asked = [present[i] for i in sorted(rng.choice(len(present), size=k, replace=False))]
            absent = [n for n in _all_names() if n not in present]
            if strategy == "random":
                negatives = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
            elif strategy == "popular":
                negatives = [n for n in by_frequency if n not in present][:k]
            else:  # adversarial: co-occurring most with the objects in this image
                score = {n: sum(cooccurrence.get(p, {}).get(n, 0) for p in present) for n in absent}
                negatives = sorted(absent, key=lambda n: (-score[n], -frequency.get(n, 0), n))[:k]
            for i, (yes, no) in enumerate(zip(asked, negatives)):
                for answer, name in (("yes", yes), ("no", no)):
                    rows.append(
                        {
                            "id": f"{r['id']}-{answer}{i}",
                            "image": r["image"],
                            "question": EXIST_QUESTIONS[0].format(name=name),
                            "answer": answer,
                            "type": "pope",
                        }
                    )
        return rows

    return write


def _sized_colour(size: str) -> SceneWriter:
    """The resolution task: the colour of the (small | large) object in a cell, by position."""

    def write(records: list[Row], world: World, rng: np.random.Generator) -> list[Row]:
        rows = []
        for r in records:
            sized = [o for o in r["objects"] if o["size"] == size]
            if not sized:
                continue
            obj = sized[int(rng.integers(len(sized)))]
            if r["objects"][r["target"]]["size"] == size:  # the held-out question's own object
                obj = r["objects"][r["target"]]
            question = SIZED_COLOUR_QUESTION.format(size=size, where=where(obj["position"]))
            rows.append(
                {
                    "id": r["id"],
                    "image": r["image"],
                    "question": question,
                    "answer": obj["colour"],
                    "type": "exact",
                }
            )
        return rows

    return write


SCENES: dict[str, SceneWriter] = {
    "scenes_colour": _colour,
    "scenes_shape": _shape,
    "scenes_count": _count,
    "scenes_position": _position,
    "scenes_relation": _relation,
    "scenes_mc": _mc,
    "scenes_pope_random": _pope("random"),
    "scenes_pope_popular": _pope("popular"),
    "scenes_pope_adversarial": _pope("adversarial"),
}
SCENES_HIRES: dict[str, SceneWriter] = {
    "scenes_hires_small": _sized_colour("small"),  # lost at pad-to-encoder-size
    "scenes_hires_large": _sized_colour("large"),  # the control: visible at any resolution
    "scenes_hires_count": _count,
}
BY_KIND: dict[str, dict[str, SceneWriter]] = {"scenes": SCENES, "scenes_hires": SCENES_HIRES}
