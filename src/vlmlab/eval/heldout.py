"""Held-out question answering: greedy answers scored by normalised exact match."""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from vlmlab.data.templates import IMAGE_PLACEHOLDER, Turn
from vlmlab.data.tokenize import TextEncoder
from vlmlab.eval.generate import greedy_generate
from vlmlab.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

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
    tokenizer = text_encoder.tokenizer
    stop_ids = {tokenizer.eos_token_id}
    if text_encoder.template.stop != tokenizer.eos_token:
        stop_ids |= set(
            tokenizer(text_encoder.template.stop, add_special_tokens=False)["input_ids"][-1:]
        )
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [
                text_encoder.encode_prompt([Turn("human", f"{IMAGE_PLACEHOLDER}\n{r['question']}")])
                for r in chunk
            ]
            images = []
            for record in chunk:
                with Image.open(Path(image_root) / record["image"]) as image:
                    images.append(image_transform(image))
            outputs = greedy_generate(
                model,
                prompts,
                torch.stack(images),
                max_new_tokens,
                stop_ids,
                tokenizer.pad_token_id,
            )
            for record, ids in zip(chunk, outputs):
                answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                predictions.append(
                    {
                        "id": record["id"],
                        "prediction": answer,
                        "answer": record["answer"],
                        "correct": normalize_answer(answer) == normalize_answer(record["answer"]),
                    }
                )
    finally:
        model.train(was_training)
    accuracy = sum(p["correct"] for p in predictions) / max(1, len(predictions))
    return {"accuracy": accuracy, "num_samples": len(predictions), "predictions": predictions}


class HeldoutEval(L.Callback):
    """At the end of training, answer the held-out questions and log `eval/accuracy`."""

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_transform: Callable,
        heldout_file: Path,
        image_root: Path,
        **kwargs: Any,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_transform = image_transform
        self.heldout_file = heldout_file
        self.image_root = image_root
        self.kwargs = kwargs
        self.result: dict[str, Any] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model: VisionLanguageModel = pl_module.model  # type: ignore[assignment]
        self.result = evaluate_heldout(
            model,
            self.text_encoder,
            self.image_transform,
            self.heldout_file,
            self.image_root,
            **self.kwargs,
        )
        log.info(
            "held-out accuracy %.3f on %d questions",
            self.result["accuracy"],
            self.result["num_samples"],
        )
        for logger in trainer.loggers:
            logger.log_metrics({"eval/accuracy": self.result["accuracy"]}, step=trainer.global_step)
