"""Conversation -> (input_ids, labels) with `<image>` expanded to M image tokens.

A sample that cannot be trained on raises `BadSample(reason)`; the pipeline skips and counts
it. In particular a sample whose labels would all be -100 is rejected, never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmlab.data.templates import IMAGE_PLACEHOLDER, Template, Turn
from vlmlab.models.vlm import IGNORE_INDEX


class BadSample(Exception):
    """A sample to skip. `reason` is a short stable key used in counters and metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class TextEncoder:
    """Everything the data pipeline needs from the model side, passed in (never imported)."""

    tokenizer: Any
    template: Template
    num_image_tokens: int
    image_token_id: int
    max_length: int

    def parse_turns(self, conversations: list[dict[str, str]]) -> list[Turn]:
        if not conversations:
            raise BadSample("empty_conversation")
        turns = []
        for i, message in enumerate(conversations):
            role = message.get("from")
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                raise BadSample("wrong_role_order", f"turn {i} is {role!r}, expected {expected!r}")
            turns.append(Turn(role=role, text=str(message.get("value", ""))))
        if turns[-1].role != "gpt":
            raise BadSample("wrong_role_order", "last turn must be gpt")
        return turns

    def encode(
        self, conversations: list[dict[str, str]], has_image: bool
    ) -> dict[str, torch.Tensor]:
        turns = self.parse_turns(conversations)
        num_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        if num_placeholders != int(has_image):
            raise BadSample(
                "image_token_count", f"{num_placeholders} <image> tags for {int(has_image)} images"
            )
        try:
            segments = self.template.render(turns)
        except ValueError as err:  # e.g. a multi-turn sample under the single-turn `plain` template
            raise BadSample("template_mismatch", str(err)) from err
        text, spans, offset = "", [], 0
        for piece, is_target in segments:
            if is_target:
                spans.append((offset, offset + len(piece)))
            text += piece
            offset += len(piece)
        enc = self.tokenizer(
            text, return_offsets_mapping=True, add_special_tokens=self.template.adds_bos
        )
        ids: list[int] = enc["input_ids"]
        offsets: list[tuple[int, int]] = enc["offset_mapping"]
        if (
            self.template.adds_bos
            and self.tokenizer.bos_token_id is not None
            and ids[:1] != [self.tokenizer.bos_token_id]
        ):
            raise BadSample(
                "no_bos", "tokenizer did not add BOS: set llm.tokenizer.add_bos_token=true"
            )
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(offsets):
            if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
                labels[i] = ids[i]
        # expand the single <image> token into M copies (HF Llava convention)
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                out_ids += [token] * self.num_image_tokens
                out_labels += [IGNORE_INDEX] * self.num_image_tokens
            else:
                out_ids.append(token)
                out_labels.append(label)
        if len(out_ids) > self.max_length:
            out_ids, out_labels = out_ids[: self.max_length], out_labels[: self.max_length]
            if has_image and out_ids.count(self.image_token_id) != self.num_image_tokens:
                raise BadSample("too_long", f"truncation at {self.max_length} cuts the image")
        if all(label == IGNORE_INDEX for label in out_labels):
            raise BadSample("no_targets", "every label is -100 after masking/truncation")
        return {"input_ids": torch.tensor(out_ids), "labels": torch.tensor(out_labels)}

    def encode_prompt(self, turns: list[Turn]) -> torch.Tensor:
        """Prompt ids for generation (image token expanded)."""
        text = self.template.prompt(turns)
        ids = self.tokenizer(text, add_special_tokens=self.template.adds_bos)["input_ids"]
        out: list[int] = []
        for token in ids:
            out += [token] * self.num_image_tokens if token == self.image_token_id else [token]
        return torch.tensor(out)
