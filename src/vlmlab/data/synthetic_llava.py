"""A synthetic dataset in the raw LLaVA layout (JSON list + image folder), for converter tests
and the data throughput benchmark: the input `vlmlab shards` takes, not the shards it makes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

QUESTIONS = [
    "What is in the image?",
    "Describe the picture in detail.",
    "What colour dominates the scene?",
    "How many objects can you count?",
]
ANSWERS = [
    "A noisy pattern of coloured blocks.",
    "The image shows random shapes on a gradient background, with no clear subject.",
    "Mostly blue, with some red and green patches.",
    "About seven.",
]


def make_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """A gradient with coloured blocks and noise: compresses like a photo, not like a flat fill."""
    gen = np.random.default_rng(rng.randrange(1 << 30))
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    colour = gen.uniform(80, 255, size=3).astype(np.float32)
    pixels = (x * colour + y * colour[::-1]) / 2
    for _ in range(6):
        x0, y0 = int(gen.integers(0, width)), int(gen.integers(0, height))
        w, h = int(gen.integers(4, width // 2 + 5)), int(gen.integers(4, height // 2 + 5))
        pixels[y0 : y0 + h, x0 : x0 + w] = gen.uniform(0, 255, size=3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    small = gen.integers(0, 256, size=(max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    noise = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return Image.blend(image, noise, 0.2)


def conversation(rng: random.Random, has_image: bool, turns: int) -> list[dict[str, str]]:
    out = []
    for turn in range(turns):
        question = rng.choice(QUESTIONS)
        if has_image and turn == 0:
            question = f"<image>\n{question}"
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": rng.choice(ANSWERS)}]
    return out


def write_llava_dataset(
    root: Path,
    num_samples: int,
    size: tuple[int, int] = (32, 32),
    image_format: str = "png",
    text_only_every: int = 5,
    seed: int = 0,
) -> tuple[Path, Path]:
    """(json path, image root): every `text_only_every`-th sample has no image; deterministic."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    ext = "jpg" if image_format.lower() in ("jpg", "jpeg") else image_format.lower()
    for i in range(num_samples):
        has_image = text_only_every <= 0 or i % text_only_every != text_only_every - 1
        record: dict[str, Any] = {"id": f"sample-{i:06d}"}
        if has_image:
            name = f"{i % 100:02d}/{i:06d}.{ext}"
            (images / name).parent.mkdir(exist_ok=True)
            image = make_image(rng, *size)
            image.save(images / name, format="JPEG" if ext == "jpg" else ext.upper(), quality=90)
            record["image"] = name
        record["conversations"] = conversation(rng, has_image, 1 + i % 3)
        records.append(record)
    json_path = root / "llava.json"
    json_path.write_text(json.dumps(records))
    return json_path, images
