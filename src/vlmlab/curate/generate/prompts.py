"""LLaVA's three prompt types built from a source's captions and boxes, and their answers parsed.

The text of each type lives in conf/generate/prompts/: `{type}_system.txt` (what to write),
`{type}_examples.jsonl` (few-shot pairs: captions, normalised boxes, the wanted response) and
`detail_instructions.txt` (the human turns of detailed descriptions). As in LLaVA, a
conversation is built from the captions only; detail and complex reasoning see the boxes too,
as `category: [x1, y1, x2, y2]` relative to the image size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.config import conf_dir
from vlmlab.curate.generate.inputs import Source
from vlmlab.errors import ConfigError
from vlmlab.text import IMAGE_TOKEN

_QA = re.compile(
    r"Question:\s*(?P<q>.*?)\s*(?:===\s*)?Answer:\s*(?P<a>.*?)\s*(?=(?:===\s*)?Question:|\Z)",
    re.DOTALL,
)


class Unparseable(ValueError):
    """The model's answer does not have the shape its prompt type asked for."""


@dataclass(frozen=True)
class PromptSet:
    """The system message, few-shot pairs and (detail) instructions of one prompt type."""

    kind: str
    system: str
    examples: list[dict[str, Any]]
    instructions: list[str]


def _resolve(directory: str) -> Path:
    path = Path(directory).expanduser()
    return path if path.is_absolute() else conf_dir() / "generate" / path


def load_prompts(directory: str, kinds: list[str], few_shot: int) -> dict[str, PromptSet]:
    """Every requested type's files; a missing one is a ConfigError naming `prompts.dir`."""
    root = _resolve(directory)
    out = {}
    for kind in kinds:
        files = [root / f"{kind}_system.txt", root / f"{kind}_examples.jsonl"]
        if kind == "detail":
            files.append(root / "detail_instructions.txt")
        for f in files:
            if not f.is_file():
                raise ConfigError(
                    "prompts.dir", f"{f} does not exist.", "restore it or point elsewhere."
                )
        examples = [
            json.loads(line)
            for line in files[1].read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        instructions = []
        if kind == "detail":
            for raw in files[2].read_text(encoding="utf-8").splitlines():
                text = raw.split("#", 1)[0].strip()
                if text:
                    instructions.append(text)
        out[kind] = PromptSet(
            kind, files[0].read_text(encoding="utf-8").strip(), examples[:few_shot], instructions
        )
    return out


def _context(captions: list[str], boxes: list[tuple[str, list[float]]], with_boxes: bool) -> str:
    lines = list(captions)
    if with_boxes and boxes:
        lines.append("")
        lines += [f"{name}: [{', '.join(f'{v:.3f}' for v in xyxy)}]" for name, xyxy in boxes]
    return "\n".join(lines)


def normalised_boxes(source: Source) -> list[tuple[str, list[float]]]:
    """COCO pixel xywh -> [x1, y1, x2, y2] in [0, 1] of the image's width and height."""
    w, h = max(source.width, 1), max(source.height, 1)
    return [
        (b.category, [b.x / w, b.y / h, (b.x + b.w) / w, (b.y + b.h) / h]) for b in source.boxes
    ]


def messages(prompts: PromptSet, source: Source) -> list[dict[str, str]]:
    """The chat request: system, few-shot user/assistant pairs, then this source's context."""
    with_boxes = prompts.kind != "conversation"
    out = [{"role": "system", "content": prompts.system}]
    for ex in prompts.examples:
        boxes = [(str(b[0]), [float(v) for v in b[1:]]) for b in ex.get("boxes", [])]
        out.append({"role": "user", "content": _context(ex["captions"], boxes, with_boxes)})
        out.append({"role": "assistant", "content": ex["response"]})
    context = _context(source.captions, normalised_boxes(source), with_boxes)
    out.append({"role": "user", "content": context})
    return out


def _pick(options: list[str], key: str) -> str:
    """The same choice for the same entry on every run (resume and cache depend on it)."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return options[digest % len(options)]


def conversations(prompts: PromptSet, source: Source, reply: str) -> list[dict[str, str]]:
    """The model's reply as LLaVA turns, `<image>` opening the first human turn."""
    text = reply.strip()
    if prompts.kind == "detail":
        if not text:
            raise Unparseable("empty description")
        pairs = [(_pick(prompts.instructions, source.id), text)]
    else:
        pairs = [(m["q"].strip(), m["a"].rstrip("= \n").strip()) for m in _QA.finditer(text)]
        pairs = [(q, a) for q, a in pairs if q and a]
        if not pairs:
            raise Unparseable("no `Question: ... Answer: ...` pair in the reply")
        if prompts.kind == "complex":
            pairs = pairs[:1]
    turns = []
    for i, (question, answer) in enumerate(pairs):
        human = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return turns
