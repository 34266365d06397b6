"""Synthetic benchmarks in the `vlmlab eval` JSONL format, from generated data's held-out images.

`shapes_colour` asks exactly the held-out question the training-time evaluation has always asked
(`shapes.HELDOUT_QUESTION`), so its accuracy is the number the demo reports. The others exercise
every scorer: count (VQA soft accuracy over 10 human answers), position (exact match and
multiple choice) and POPE-style yes/no object probing with balanced negatives.
A scenes folder (data=scenes, data=scenes_hires; its world.json names the kind) gets the
benchmarks of `eval.scene_benchmarks` instead: `synthetic_names(root)` says which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.data.shapes import COLOURS, HELDOUT_QUESTION, POSITION_QUESTIONS, POSITIONS, SHAPES
from vlmlab.eval.scene_benchmarks import BY_KIND

log = logging.getLogger(__name__)

COUNT_QUESTION = "How many shapes are in the image?"
POPE_QUESTION = "Is there a {colour} {shape} in the image?"
Row = dict[str, Any]


def _colour(record: Row, image: str, rng: np.random.Generator) -> list[Row]:
    return [
        {
            "id": record["id"],
            "image": image,
            "question": HELDOUT_QUESTION,
            "answer": record["answer"],
            "type": "exact",
        }
    ]


def _count(record: Row, image: str, rng: np.random.Generator) -> list[Row]:
    """Every image has one shape; like real annotators, a few of the 10 humans disagree.
    Answers are stored normalised ("1", not "one"), as VQAv2's annotation files are: the
    official scorer compares the human answers raw."""
    wrong = int(rng.integers(0, 3))
    rng.integers(0, 10 - wrong + 1)  # kept: the same random stream as before
    answers = ["2"] * wrong + ["1"] * (10 - wrong)
    rng.shuffle(answers)
    return [
        {
            "id": record["id"],
            "image": image,
            "question": COUNT_QUESTION,
            "answers": answers,
            "type": "vqa",
        }
    ]


def _position(record: Row, image: str, rng: np.random.Generator) -> list[Row]:
    where = record["position"]
    return [
        {
            "id": record["id"],
            "image": image,
            "question": POSITION_QUESTIONS[0],
            "answers": [where, f"in the {where}"],
            "type": "exact",
        }
    ]


def _position_mc(record: Row, image: str, rng: np.random.Generator) -> list[Row]:
    options = [str(p) for p in rng.permutation(list(POSITIONS))]
    return [
        {
            "id": record["id"],
            "image": image,
            "question": POSITION_QUESTIONS[0],
            "options": options,
            "answer": "ABCD"[options.index(record["position"])],
            "type": "mc",
        }
    ]


def _pope(record: Row, image: str, rng: np.random.Generator) -> list[Row]:
    """One present and one absent object per image (absent: another colour or another shape)."""
    colour, shape = record["colour"], record["shape"]
    if rng.random() < 0.5:
        colour = str(rng.choice([c for c in COLOURS if c != colour]))
    else:
        shape = str(rng.choice([s for s in SHAPES if s != shape]))
    present = POPE_QUESTION.format(colour=record["colour"], shape=record["shape"])
    absent = POPE_QUESTION.format(colour=colour, shape=shape)
    return [
        {
            "id": f"{record['id']}-yes",
            "image": image,
            "question": present,
            "answer": "yes",
            "type": "pope",
        },
        {
            "id": f"{record['id']}-no",
            "image": image,
            "question": absent,
            "answer": "no",
            "type": "pope",
        },
    ]


SYNTHETIC: dict[str, Callable[[Row, str, np.random.Generator], list[Row]]] = {
    "shapes_colour": _colour,
    "shapes_count": _count,
    "shapes_position": _position,
    "shapes_position_mc": _position_mc,
    "shapes_pope": _pope,
}


WORLD = "world.json"  # written by data.scenes.generate: {kind, spec, frequency, cooccurrence}


def world_kind(root: Path) -> str:
    """Which generator wrote a data folder: "shapes", or world.json's kind (scenes ...)."""
    world = Path(root) / WORLD
    return str(json.loads(world.read_text())["kind"]) if world.is_file() else "shapes"


def synthetic_names(root: Path) -> list[str]:
    """The synthetic benchmarks a generated data folder gives."""
    kind = world_kind(root)
    return list(BY_KIND[kind]) if kind in BY_KIND else list(SYNTHETIC)


def is_synthetic(name: str) -> bool:
    """A synthetic benchmark name of any generator (not a file path)."""
    return name in SYNTHETIC or any(name in writers for writers in BY_KIND.values())


def write_synthetic(
    shapes_root: Path, out_dir: Path, copy_images: bool = True, seed: int = 0
) -> dict[str, Path]:
    """Write one JSONL per synthetic benchmark for the held-out split of a generated data folder.

    With `copy_images` the folder is self-contained (images/ beside the JSONL files); without,
    image paths are relative paths to the data folder's own images.
    """
    heldout_file = Path(shapes_root) / "heldout.json"
    if not heldout_file.is_file():
        raise FileNotFoundError(f"{heldout_file} not found: generate the shapes data first")
    records = json.loads(heldout_file.read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = Path(shapes_root).resolve() / "images"
    if copy_images:
        (out_dir / "images").mkdir(exist_ok=True)
        for record in records:
            shutil.copy2(images / record["image"], out_dir / "images" / record["image"])
    kind = world_kind(shapes_root)
    if kind in BY_KIND:
        world = json.loads((Path(shapes_root) / WORLD).read_text())
        placed = [
            {
                **record,
                "image": f"images/{record['image']}"
                if copy_images
                else os.path.relpath(images / record["image"], out_dir.resolve()),
            }
            for record in records
        ]
        paths = {}
        for index, (name, write) in enumerate(BY_KIND[kind].items()):
            rows = write(placed, world, np.random.default_rng([seed, index]))
            paths[name] = out_dir / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.info(
            "wrote %d %s benchmarks (%d images) to %s", len(paths), kind, len(records), out_dir
        )
        return paths
    paths = {}
    for index, (name, make) in enumerate(SYNTHETIC.items()):
        rng = np.random.default_rng([seed, index])
        rows = []
        for record in records:
            image = (
                f"images/{record['image']}"
                if copy_images
                else os.path.relpath(images / record["image"], out_dir.resolve())
            )
            rows += make(record, image, rng)
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    log.info("wrote %d synthetic benchmarks (%d images) to %s", len(paths), len(records), out_dir)
    return paths


def synthetic_for_shapes(shapes_root: Path) -> dict[str, Path]:
    """The synthetic benchmarks of a shapes data folder, written once beside its data.

    Written to a temporary sibling and renamed, so concurrent runs never read a partial file.
    """
    out_dir = Path(shapes_root) / "benchmarks"
    if not (out_dir / "DONE").is_file():
        tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic(shapes_root, tmp, copy_images=False)  # a sibling: same relative paths
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(out_dir)
        except OSError:  # another process finished first: its files are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: out_dir / f"{name}.jsonl" for name in synthetic_names(shapes_root)}
