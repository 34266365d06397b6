"""Synthetic coloured shapes: real images and LLaVA JSON for captions, QA, text and a held-out split.

It is the embedded dataset of the demo and the tests: deterministic from its seed, small, and
hard enough that the held-out colour accuracy measures whether the image reaches the LLM.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}

COLOUR_QUESTIONS = (
    "What colour is the shape?",
    "Which colour does the shape have?",
    "What is the colour of the object?",
)
SHAPE_QUESTIONS = (
    "What shape is it?",
    "Which shape is shown?",
    "What kind of shape is in the image?",
)
POSITION_QUESTIONS = ("Where is the shape?", "In which part of the image is the shape?")
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption.",
)
HELDOUT_QUESTION = COLOUR_QUESTIONS[0]


@dataclass(frozen=True)
class ShapesSpec:
    """Generator knobs; a different spec writes to a different folder (see `fingerprint`)."""

    num_images: int = 2000
    num_heldout: int = 200
    image_size: int = 64
    seed: int = 0

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def draw_shape(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, str]]:
    """One image with one shape of a random colour, kind and quadrant on a noisy light background."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    position = str(rng.choice(list(POSITIONS)))
    background = rng.integers(200, 256, size=3)
    pixels = np.clip(background + rng.normal(0, 6, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    cx, cy = (v * size for v in POSITIONS[position])
    radius = size * float(rng.uniform(0.14, 0.22))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )
    return image, {"colour": colour, "shape": shape, "position": position}


def _caption(facts: dict[str, str]) -> str:
    return f"a {facts['colour']} {facts['shape']} in the {facts['position']}."


def _qa_turns(rng: np.random.Generator, facts: dict[str, str]) -> list[tuple[str, str]]:
    pool = [
        (str(rng.choice(COLOUR_QUESTIONS)), facts["colour"]),
        (str(rng.choice(SHAPE_QUESTIONS)), facts["shape"]),
        (str(rng.choice(POSITION_QUESTIONS)), f"in the {facts['position']}"),
    ]
    order = rng.permutation(len(pool))
    return [pool[i] for i in order[: int(rng.integers(1, len(pool) + 1))]]


def conversation(turns: list[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    """LLaVA `conversations` from (question, answer) turns; `<image>` leads the first one."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if with_image and i == 0 else ""
        messages += [
            {"from": "human", "value": prefix + question},
            {"from": "gpt", "value": answer},
        ]
    return messages


def write_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def add_training_records(
    sets: dict[str, list[dict[str, Any]]],
    index: int,
    image: str,
    caption_turn: tuple[str, str],
    turns: list[tuple[str, str]],
) -> None:
    """One training image's records, shared by the synthetic generators: a caption (align), its
    QA turns (instruct) and both as text only (text, a warm-up for a random-init LLM)."""
    sets["align"].append(
        {
            "id": f"align{index:06d}",
            "image": image,
            "conversations": conversation([caption_turn], True),
        }
    )
    sets["instruct"].append(
        {"id": f"instruct{index:06d}", "image": image, "conversations": conversation(turns, True)}
    )
    sets["text"].append(
        {"id": f"text{index:06d}", "conversations": conversation([*turns, caption_turn], False)}
    )


def write_sets(sets: dict[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """Each set as `<out_dir>/<name>.json`; returns the paths by set name."""
    paths = {}
    for set_name, records in sets.items():
        paths[set_name] = out_dir / f"{set_name}.json"
        paths[set_name].write_text(json.dumps(records, indent=1))
    return paths


def generate(spec: ShapesSpec, out_dir: Path) -> dict[str, Path]:
    """Write images and LLaVA JSON files (align, instruct, text, heldout) under `out_dir`."""
    rng = np.random.default_rng(spec.seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[dict[str, Any]]] = {"align": [], "instruct": [], "text": [], "heldout": []}
    total = spec.num_images + spec.num_heldout
    for index in range(total):
        image, facts = draw_shape(rng, spec.image_size)
        name = f"shape{index:06d}.png"
        write_png(image, image_dir / name)
        if index >= spec.num_images:
            sets["heldout"].append(
                {
                    "id": f"heldout{index:06d}",
                    "image": name,
                    "question": HELDOUT_QUESTION,
                    "answer": facts["colour"],
                    **facts,
                }
            )
            continue
        caption_turn = (str(rng.choice(CAPTION_PROMPTS)), _caption(facts))
        add_training_records(sets, index, name, caption_turn, _qa_turns(rng, facts))
    paths = write_sets(sets, out_dir)
    log.info(
        "shapes: wrote %d images and %s under %s",
        total,
        {k: len(v) for k, v in sets.items()},
        out_dir,
    )
    return paths


def corpus_text() -> list[str]:
    """Every word the generator can emit, for building the tiny tokenizer."""
    words = list(COLOURS) + list(SHAPES) + list(POSITIONS)
    lines = [*COLOUR_QUESTIONS, *SHAPE_QUESTIONS, *POSITION_QUESTIONS, *CAPTION_PROMPTS]
    for colour in COLOURS:
        for shape in SHAPES:
            for position in POSITIONS:
                lines.append(_caption({"colour": colour, "shape": shape, "position": position}))
    return [*lines, " ".join(words)]
