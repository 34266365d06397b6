"""Held-out question answering on a records file (image, question, answer): greedy answers
scored by normalised exact match. The end-of-stage evaluation is `eval.callback.BenchmarkEval`;
this helper serves callers that want a few answers next to their records (sample logging)."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmlab.data.tokenize import TextEncoder
from vlmlab.eval.generate import GenerationConfig, Generator, Request
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IMAGE_PLACEHOLDER
from vlmlab.text.templates import Turn

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def evaluate_heldout(
    model: VisionLanguageModel,
    text_encoder: TextEncoder,
    image_transform: Callable[[Image.Image], torch.Tensor],
    heldout_file: Path,
    image_root: Path,
    max_samples: int = 200,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Accuracy of greedy answers on `heldout_file` (records with image, question, answer)."""
    records = json.loads(Path(heldout_file).read_text())[:max_samples]
    generator = Generator(model, text_encoder.tokenizer, text_encoder.template, image_transform)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    predictions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        requests = []
        for record in chunk:
            with Image.open(Path(image_root) / record["image"]) as image:
                turn = Turn("human", f"{IMAGE_PLACEHOLDER}\n{record['question']}")
                requests.append(Request([turn], image.copy()))  # the Generator prepares it
        for record, answer in zip(chunk, generator(requests, config)):
            predictions.append(
                {
                    "id": record["id"],
                    "prediction": answer,
                    "answer": record["answer"],
                    "correct": normalize_answer(answer) == normalize_answer(record["answer"]),
                }
            )
    accuracy = sum(p["correct"] for p in predictions) / max(1, len(predictions))
    return {"accuracy": accuracy, "num_samples": len(predictions), "predictions": predictions}
