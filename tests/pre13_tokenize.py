"""vlmlab.data.tokenize as of commit 0711b3a, before issue 13 (verbatim below this note): the
reference of tests/test_special_text.py that proves a sample without special-token text, its
`<image>` where the template keeps it, tokenises exactly as before. Not for use elsewhere.

Conversation -> (input_ids, labels) with each `<image>` expanded to that image's tokens.

How many tokens an image gives is the vision side's answer (`vlmlab.visual.ImageTokenCounter`,
from `VisionLanguageModel.image_token_counter()`), asked per image with its decoded size; the
sample records the counts (`image_tokens`) so collate, grouping and the model's scatter agree.

A sample that cannot be trained on raises `BadSample(reason)`; the pipeline skips and counts
it. In particular a sample whose labels would all be -100 is rejected, never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np
import torch

from vlmlab.text import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vlmlab.text.templates import Template, Turn
from vlmlab.visual import FixedImageTokens, ImageSize, ImageTokenCounter, ImageTokens


class BadSample(Exception):
    """A sample to skip. `reason` is a short stable key used in counters and metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class TextEncoder:
    """Everything the data pipeline needs from the model side, passed in (never imported).

    `image_tokens` is the vision side's counter; an int n stands for `FixedImageTokens(n)`
    (every image gives n tokens), the usual way to say it for a fixed-size encoder.
    """

    tokenizer: Any
    template: Template
    image_tokens: ImageTokenCounter | int
    image_token_id: int
    max_length: int

    def __post_init__(self) -> None:
        if isinstance(self.image_tokens, int):
            object.__setattr__(self, "image_tokens", FixedImageTokens(self.image_tokens))

    def tokens_for(self, image_size: ImageSize | None = None) -> ImageTokens:
        """Tokens of one image of this (width, height), as the model will embed it."""
        counter = self.image_tokens
        assert not isinstance(counter, int)  # normalised in __post_init__
        return counter(image_size)

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, template: str, max_length: int) -> TextEncoder:
        """The encoder a composed model trains with: its tokenizer, image token and counter."""
        from vlmlab.text.templates import get_template

        return cls(
            tokenizer,
            get_template(template, tokenizer.eos_token),
            model.image_token_counter(),
            model.image_token_id,
            int(max_length),
        )

    def parse_turns(self, conversations: list[dict[str, str]]) -> list[Turn]:
        if not conversations:
            raise BadSample("empty_conversation")
        turns = []
        for i, message in enumerate(conversations):
            role = message.get("from")
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                raise BadSample("wrong_role_order", f"turn {i} is {role!r}, expected {expected!r}")
            text = message.get("value")
            if not isinstance(text, str) or not text.strip():
                raise BadSample("empty_turn", f"turn {i} has no text")
            turns.append(Turn(role=role, text=text))
        if turns[-1].role != "gpt":
            raise BadSample("wrong_role_order", "last turn must be gpt")
        return turns

    def encode(
        self,
        conversations: list[dict[str, str]],
        has_image: bool,
        image_size: ImageSize | None = None,
    ) -> dict[str, Any]:
        """input_ids and labels (tensors) and `image_tokens`, the token count of each image in
        order. `image_size` is the image's decoded (width, height), for a count that depends on
        it (a fixed-size encoder ignores it)."""
        turns = self.parse_turns(conversations)
        num_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        if num_placeholders != int(has_image):
            raise BadSample(
                "image_token_count", f"{num_placeholders} <image> tags for {int(has_image)} images"
            )
        if has_image and IMAGE_PLACEHOLDER not in turns[0].text:
            raise BadSample("image_token_position", "<image> must be in the first human turn")
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
        ids, offsets = self._tokenize(text)
        if (
            self.template.adds_bos
            and self.tokenizer.bos_token_id is not None
            and ids[:1] != [self.tokenizer.bos_token_id]
        ):
            raise BadSample(
                "no_bos", "tokenizer did not add BOS: set llm.tokenizer.add_bos_token=true"
            )
        labels = _labels(text, ids, offsets, spans)
        counts = [self.tokens_for(image_size).count] if has_image else []
        out_ids, out_labels = self._expand(ids, labels, counts)
        if len(out_ids) > self.max_length:
            out_ids, out_labels = out_ids[: self.max_length], out_labels[: self.max_length]
            if out_ids.count(self.image_token_id) != sum(counts):
                raise BadSample("too_long", f"truncation at {self.max_length} cuts the image")
        if out_labels.count(IGNORE_INDEX) == len(out_labels):
            raise BadSample("no_targets", "every label is -100 after masking/truncation")
        return {
            "input_ids": _long_tensor(out_ids),
            "labels": _long_tensor(out_labels),
            "image_tokens": counts,
        }

    def _expand(
        self, ids: list[int], labels: list[int], counts: list[int]
    ) -> tuple[list[int], list[int]]:
        """Each image token -> that image's count of copies, never targets (HF Llava convention)."""
        slots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(slots) != len(counts):
            raise BadSample(
                "image_token_count", f"{len(slots)} image tokens for {len(counts)} images"
            )
        out_ids, out_labels = list(ids), list(labels)
        for i, count in reversed(list(zip(slots, counts))):
            out_ids[i : i + 1] = [self.image_token_id] * count
            out_labels[i : i + 1] = [IGNORE_INDEX] * count
        return out_ids, out_labels

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of the rendered text.

        LLaVA templates (`template.image_pieces`) follow LLaVA's `tokenizer_image_token`: each piece
        between `<image>` tags is tokenised on its own (BOS only on the first), so a SentencePiece
        tokenizer puts its dummy-prefix `▁` after the image as the official training code did;
        tokenising the whole string would drop that `▁` and shift every later position against
        what LLaVA checkpoints were trained on. Other templates tokenise the whole string, as the
        HF processors of those models do.
        """
        if not self.template.image_pieces:
            enc = self.tokenizer(
                text, return_offsets_mapping=True, add_special_tokens=self.template.adds_bos
            )
            return list(enc["input_ids"]), list(enc["offset_mapping"])
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        start = 0
        for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(self.image_token_id)
                offsets.append((start, start + len(IMAGE_PLACEHOLDER)))
                start += len(IMAGE_PLACEHOLDER)
            if piece or (i == 0 and self.template.adds_bos):
                enc = self.tokenizer(
                    piece,
                    return_offsets_mapping=True,
                    add_special_tokens=self.template.adds_bos and i == 0,
                )
                ids += enc["input_ids"]
                offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
            start += len(piece)
        return ids, offsets

    def encode_prompt(self, turns: list[Turn], image_size: ImageSize | None = None) -> torch.Tensor:
        """Prompt ids for generation (each image token expanded to its image's count), tokenised
        as in training. `image_size`: the (width, height) of the prompt's image, if it has one."""
        text = self.template.prompt(turns)
        ids, _ = self._tokenize(text)
        num_images = ids.count(self.image_token_id)
        counts = [self.tokens_for(image_size).count for _ in range(num_images)]
        out, _ = self._expand(ids, [IGNORE_INDEX] * len(ids), counts)
        return torch.tensor(out)


def _long_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(list) is ~5x slower than going through numpy; this runs once per sample."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _labels(
    text: str, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """A token is a target when its characters overlap a target span.

    A token whose non-space characters lie partly in a reply and partly in the prompt means this
    tokenizer cannot separate the two: the sample is rejected (`tokenization_mismatch`) rather
    than trained with shifted labels or, as LLaVA's own check does, silently with all -100.
    (Whitespace a special token strips, e.g. phi3's `<|end|>` eating the next newline, is fine.)
    """
    is_target = [False] * len(text)
    for s_start, s_end in spans:
        is_target[s_start:s_end] = [True] * (s_end - s_start)
    # prefix sums: targets, non-space characters, non-space targets before each position
    targets = [0, *accumulate(is_target)]
    solid = [0, *accumulate(not c.isspace() for c in text)]
    solid_targets = [0, *accumulate(t and not c.isspace() for t, c in zip(is_target, text))]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        inside = solid_targets[end] - solid_targets[start]
        if 0 < inside < solid[end] - solid[start]:
            raise BadSample(
                "tokenization_mismatch",
                f"token {i} ({text[start:end]!r}) covers prompt and reply text",
            )
        if targets[end] > targets[start]:
            labels[i] = ids[i]
    return labels
