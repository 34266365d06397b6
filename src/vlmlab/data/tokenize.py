"""Conversation -> (input_ids, labels) with each `<image>` expanded to that image's tokens.

How many tokens an image gives is the vision side's answer (`vlmlab.visual.ImageTokenCounter`,
from `VisionLanguageModel.image_token_counter()`), asked per image with its decoded size; the
sample records the counts (`image_tokens`) so collate, grouping and the model's scatter agree.

A sample that cannot be trained on raises `BadSample(reason)`; the pipeline skips and counts
it. In particular a sample whose labels would all be -100 is rejected, never trained on.

Two steps decide what text of a conversation turns into which tokens (README: template fidelity):
- `image_placement` (`data.image_placement`): `front` is LLaVA's `preprocess_multimodal`, run
  on image samples before rendering (each message holding `<image>`: every tag removed, the text
  stripped, `<image>\n` in front); `as_is` keeps the tag where the data puts it.
- `special_text` (`data.special_text`): text of the conversation (template segments marked
  `DataText`) never becomes one of the tokenizer's control tokens (`</s>`, `<s>`, `<unk>`,
  `<|im_end|>` ...). Such a sample is rejected (`special_token_text`) or its text is tokenised
  as plain text, as the tokenizer would in that place (`as_text`). A sample without such text
  takes exactly the tokenisation it took before these steps existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np
import torch

from vlmlab.errors import ConfigError
from vlmlab.models.anyres import UnusableImageError
from vlmlab.text import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vlmlab.text.templates import (
    IMAGE_PLACEMENTS,
    SPECIAL_TEXT_POLICIES,
    DataText,
    Segment,
    Template,
    Turn,
)
from vlmlab.visual import FixedImageTokens, ImageSize, ImageTokenCounter, ImageTokens

# The skip reason of an image the vision side cannot turn into tokens (smaller than one patch,
# too elongated for any grid, a 16-bit image outside its range, mode F): `UnusableImageError`.
UNUSABLE_IMAGE = "unusable_image"


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
    `image_placement` / `special_text`: None takes the template's own (module docstring).
    """

    tokenizer: Any
    template: Template
    image_tokens: ImageTokenCounter | int
    image_token_id: int
    max_length: int
    image_placement: str | None = None
    special_text: str | None = None
    # the tokenizer's special tokens but `<image>`: what data text must never become
    control_ids: frozenset[int] = field(init=False, repr=False, compare=False)
    # whether the template marks its data (`DataText`): one from outside vlmlab may not
    marks_data: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.image_tokens, int):
            object.__setattr__(self, "image_tokens", FixedImageTokens(self.image_tokens))
        for key, allowed in (
            ("image_placement", IMAGE_PLACEMENTS),
            ("special_text", SPECIAL_TEXT_POLICIES),
        ):
            value = getattr(self, key)
            if value is None:
                object.__setattr__(self, key, getattr(self.template, key))
            elif value not in allowed:
                raise ConfigError(
                    f"data.{key}",
                    f"got {value!r}.",
                    f"use one of {list(allowed)}, or null for the template's own.",
                )
        special = set(getattr(self.tokenizer, "all_special_ids", ()))
        for token_id, token in getattr(self.tokenizer, "added_tokens_decoder", {}).items():
            if getattr(token, "special", False):
                special.add(int(token_id))
        # `<image>` is counted and placed by `encode`, never one of the data's stray controls
        object.__setattr__(self, "control_ids", frozenset(special - {self.image_token_id}))
        try:
            probe = self.template.render([Turn("human", "q"), Turn("gpt", "a")])
        except ValueError:
            probe = []
        object.__setattr__(self, "marks_data", any(isinstance(p, DataText) for p, _ in probe))

    def tokens_for(self, image_size: ImageSize | None = None) -> ImageTokens:
        """Tokens of one image of this (width, height), as the model will embed it."""
        counter = self.image_tokens
        assert not isinstance(counter, int)  # normalised in __post_init__
        return counter(image_size)

    @classmethod
    def for_model(
        cls,
        model: Any,
        tokenizer: Any,
        template: str,
        max_length: int,
        image_placement: str | None = None,
        special_text: str | None = None,
    ) -> TextEncoder:
        """The encoder a composed model trains with: its tokenizer, image token and counter;
        `image_placement` / `special_text` are `data.*` (None: the template's own)."""
        from vlmlab.text.templates import get_template

        return cls(
            tokenizer,
            get_template(template, tokenizer.eos_token),
            model.image_token_counter(),
            model.image_token_id,
            int(max_length),
            image_placement,
            special_text,
        )

    def place_images(self, turns: list[Turn]) -> list[Turn]:
        """`front`: LLaVA's `preprocess_multimodal` (mm_use_im_start_end off, as in LLaVA-1.5):
        in every message holding `<image>`, all tags removed, the text stripped and one
        `<image>\n` put in front (so two tags in one message become one). `as_is`: unchanged."""
        if self.image_placement != "front":
            return turns
        placed = []
        for turn in turns:
            if IMAGE_PLACEHOLDER in turn.text:
                text = turn.text.replace(IMAGE_PLACEHOLDER, "").strip()
                turn = Turn(turn.role, (IMAGE_PLACEHOLDER + "\n" + text).strip())
            placed.append(turn)
        return placed

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
        if has_image:  # LLaVA runs preprocess_multimodal on image samples only
            turns = self.place_images(turns)
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
        text, spans, data = _join(segments)
        self._check_marked(turns)
        ids, offsets = self._tokenize_data_as_text(text, data, strict=True)
        if (
            self.template.adds_bos
            and self.tokenizer.bos_token_id is not None
            and ids[:1] != [self.tokenizer.bos_token_id]
        ):
            raise BadSample(
                "no_bos", "tokenizer did not add BOS: set llm.tokenizer.add_bos_token=true"
            )
        labels = _labels(text, ids, offsets, spans)
        try:
            counts = [self.tokens_for(image_size).count] if has_image else []
        except UnusableImageError as err:  # e.g. AnyRes: a 100:1 panorama leaves no grid row
            raise BadSample(UNUSABLE_IMAGE, str(err)) from err
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

    def _check_marked(self, turns: list[Turn]) -> None:
        """A template that marks no `DataText` (one from outside vlmlab) cannot tell data from its
        own markers: a sample whose text holds a control token's text is rejected there."""
        if self.marks_data:
            return
        specials = self._control_texts()
        for turn in turns:
            found = [s for s in specials if s in turn.text]
            if found:
                raise BadSample(
                    "special_token_text",
                    f"{found[0]!r} in the text, and template {self.template.name!r} marks no "
                    "DataText to tokenise as text",
                )

    def _control_texts(self) -> list[str]:
        ids = sorted(self.control_ids)
        return [t for t in self.tokenizer.convert_ids_to_tokens(ids) if t]

    def _tokenize_data_as_text(
        self, text: str, data: list[tuple[int, int]], strict: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """`_tokenize`, then every control token that the data's text produced is dealt with by
        `special_text`: rejected, or its region (the text between the template's own control
        tokens around it) tokenised again as plain text in the same context.

        The context: a region right after a control token may tokenise differently than the same
        text alone (SentencePiece's dummy prefix `▁`). The region is tokenised alone, then behind
        an anchor `\n` that is dropped; the first way whose normal tokens equal the in-context
        ones is used with `split_special_tokens=True`. If neither does, `strict` (training)
        rejects the sample; a prompt (`strict=False`) takes the region alone.
        """
        ids, offsets = self._tokenize(text)
        controls = self.control_ids
        injected = [
            i
            for i, (token, (start, end)) in enumerate(zip(ids, offsets))
            if token in controls and _inside(*_solid(text, start, end), data)
        ]
        if not injected:
            return ids, offsets
        if strict and self.special_text == "reject":
            names = sorted({str(self.tokenizer.convert_ids_to_tokens(ids[i])) for i in injected})
            raise BadSample("special_token_text", f"{names} in the conversation's text")
        boundaries = [
            i for i, token in enumerate(ids) if token in controls or token == self.image_token_id
        ]
        boundaries = [b for b in boundaries if b not in set(injected)]
        regions: list[tuple[int, int]] = []  # token index ranges [lo, hi)
        for i in injected:
            lo = max([b for b in boundaries if b < i], default=-1) + 1
            hi = min([b for b in boundaries if b > i], default=len(ids))
            if not regions or regions[-1] != (lo, hi):
                regions.append((lo, hi))
        for lo, hi in reversed(regions):
            region_ids, region_offsets = self._as_text(text, ids[lo:hi], offsets[lo:hi], strict)
            ids[lo:hi], offsets[lo:hi] = region_ids, region_offsets
        left = [
            i
            for i, (token, (start, end)) in enumerate(zip(ids, offsets))
            if token in controls and _inside(*_solid(text, start, end), data)
        ]
        if left:  # e.g. a tokenizer that ignores split_special_tokens
            raise BadSample("special_token_text", "the tokenizer kept a control token in the text")
        return ids, offsets

    def _as_text(
        self, text: str, ids: list[int], offsets: list[tuple[int, int]], strict: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """One region's tokens with its control-token text tokenised as text (see above)."""
        start = min(a for a, b in offsets if b > a)
        end = max(b for _, b in offsets)
        region = text[start:end]
        for anchor in ("", "\n"):
            normal = self._anchored(anchor + region, len(anchor), start, split=False)
            if normal is not None and normal[0] == ids:
                as_text = self._anchored(anchor + region, len(anchor), start, split=True)
                if as_text is not None:
                    return as_text
        if strict:
            raise BadSample(
                "special_token_text", f"cannot tokenise {region!r} as text in its context"
            )
        fallback = self._anchored(region, 0, start, split=True)
        assert fallback is not None  # no anchor: nothing to straddle
        return fallback

    def _anchored(
        self, text: str, cut: int, shift: int, split: bool
    ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Tokens of `text` from character `cut` on (offsets moved by `shift - cut`); None when a
        token straddles `cut`."""
        enc = self.tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            split_special_tokens=split,
        )
        out_ids, out_offsets = [], []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if a < cut < b:
                return None
            if a > cut or (a == cut and (b > a or cut == 0)):  # not the anchor's
                out_ids.append(int(token))
                out_offsets.append((a - cut + shift, b - cut + shift))
        return out_ids, out_offsets

    def encode_prompt(self, turns: list[Turn], image_size: ImageSize | None = None) -> torch.Tensor:
        """Prompt ids for generation (each image token expanded to its image's count), tokenised
        as in training; the turns' text (a user's) never becomes a control token. `image_size`:
        the (width, height) of the prompt's image, if it has one. ValueError for text that an
        outside template (no `DataText`) cannot keep apart from its control tokens."""
        if any(IMAGE_PLACEHOLDER in t.text for t in turns):
            turns = self.place_images(turns)
        text, _, data = _join(self.template.prompt_segments(turns))
        try:
            self._check_marked(turns)
            ids, _ = self._tokenize_data_as_text(text, data, strict=False)
        except BadSample as err:
            raise ValueError(f"cannot encode the prompt: {err}") from err
        num_images = ids.count(self.image_token_id)
        counts = [self.tokens_for(image_size).count for _ in range(num_images)]
        out, _ = self._expand(ids, [IGNORE_INDEX] * len(ids), counts)
        return torch.tensor(out)


def _join(segments: list[Segment]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The text of the segments, its target spans and its data (`DataText`) spans."""
    text, targets, data, offset = "", [], [], 0
    for piece, is_target in segments:
        span = (offset, offset + len(piece))
        if is_target:
            targets.append(span)
        if isinstance(piece, DataText) and piece:
            data.append(span)
        text += piece
        offset += len(piece)
    return text, targets, data


def _solid(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) without whitespace at its ends: a control token that strips whitespace
    (phi3's `<|assistant|>`) covers data's leading space without coming from the data."""
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


def _inside(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether characters [start, end) (not empty) overlap one of the spans."""
    return start < end and any(start < b and a < end for a, b in spans)


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
    (Whitespace a special token strips, e.g. phi3's `<|end|>` eating the next newline, is fine;
    such a token is a target when its own text is, whatever the whitespace it ate.)
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
        # a token with text is a target by its text: phi3's `<|assistant|>` strips the reply's
        # leading space into itself and is still not a target
        solid_token = solid[end] > solid[start]
        if inside if solid_token else targets[end] > targets[start]:
            labels[i] = ids[i]
    return labels
