"""lmms-eval task functions over a vlmlab benchmark JSONL (`vlmlab eval --make-synthetic`).

The rows are vlmlab's own format (`id`, `image` relative to the file, `question`, `answers`,
`type: vqa`); the score is lmms-eval 0.7.3's own VQAv2 accuracy (`vqav2_process_results`), which
`vlmlab eval --vqa-mode lmms_eval` claims to equal. `VLMLAB_BENCH_DIR` (set by check_lmms_eval.py)
is the folder the image paths are relative to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_eval.tasks.vqav2.utils import vqav2_process_results
from PIL import Image


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    path = Path(os.environ["VLMLAB_BENCH_DIR"]) / doc["image"]
    return [Image.open(path).convert("RGB")]


def doc_to_text(
    doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None
) -> str:
    return str(doc["question"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    vqa_doc = {"question_id": doc["id"], "answers": [{"answer": a} for a in doc["answers"]]}
    return {"accuracy": vqav2_process_results(vqa_doc, results)["exact_match"]}
