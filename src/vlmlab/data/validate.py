"""Validation of LLaVA JSON entries before they are written to shards.

The checks are the training pipeline's own (TextEncoder with the real tokenizer and template,
the loader's `decode_image`) plus what only the converter can see (the entry's JSON, duplicate
ids, the image file), so a sample that passes here is one the data loader will not have to skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlmlab.data.tokenize import UNUSABLE_IMAGE, BadSample, TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import AnyResTokens, UnusableImageError, prepare_image
from vlmlab.visual import ImageSize, ImageTokenCounter

UNLIMITED = 1 << 30
# The image members the data loader reads (the DataModule imports them from here, so the
# converter does not import Lightning).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm")
# More than 8 bits per sample: PIL's convert("RGB") clips every value above 255 to white
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(payload: bytes, orient: bool) -> Image.Image:
    """The loader's decode step (shared with the converter, so both count tokens from one size).

    `orient` (AnyRes): `models.anyres.prepare_image`: the EXIF orientation is applied, so a phone
    photo is tiled (and its grid chosen) as it is seen. Without it (`pad`), the pixels stay the
    file's as LLaVA-1.5 and transformers' CLIP/SigLIP processors read them (neither applies EXIF
    orientation), so LLaVA-1.5 checkpoints see what they were trained on. Both paths map
    16-bit images to their top 8 bits (PIL alone turns them white) and refuse mode F.
    BadSample `corrupt_image` for a file PIL cannot decode, `unusable_image` for the rest.
    """
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            if orient or image.mode in HIGH_DEPTH_MODES or image.mode == "F":
                return prepare_image(image, orient=orient)
            return image
    except UnusableImageError as err:
        raise BadSample(UNUSABLE_IMAGE, str(err)) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decode errors
        raise BadSample("corrupt_image", str(err)) from err


@dataclass(frozen=True)
class Entry:
    """One input entry in file order: the parsed object, or the reason it could not be parsed."""

    index: int
    value: Any
    error: str = ""


@dataclass(frozen=True)
class Accepted:
    index: int
    key: str  # the WebDataset key (tar member stem)
    record_json: bytes
    image_path: str | None
    image_ext: str | None
    image_sha256: str | None
    image_size: int
    num_tokens: int


@dataclass(frozen=True)
class Rejected:
    index: int
    id: Any
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "reason": self.reason, "detail": self.detail}


def load_entries(path: Path) -> list[Entry]:
    """Entries of a JSON list or a JSONL file (`.jsonl`); a bad JSONL line is an Entry with an
    error (rejected as `bad_json`), a file that is not a JSON list is a ConfigError."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for index, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                entries.append(Entry(index, json.loads(line)))
            except ValueError as err:
                entries.append(Entry(index, None, f"line {index + 1}: {err}"))
        return entries
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(
            "json", f"{path} is not valid JSON ({err}).", "pass a JSON list or a .jsonl file."
        ) from err
    if not isinstance(data, list):
        raise ConfigError("json", f"{path} holds a {type(data).__name__}, not a list of entries.")
    return [Entry(i, value) for i, value in enumerate(data)]


def entry_key(sample_id: Any) -> str:
    """WebDataset key of a sample: a dot would end the key early, so dots become underscores."""
    return str(sample_id).replace(".", "_")


@dataclass
class Validator:
    """Checks one entry; picklable state only, so it also runs in worker processes."""

    image_root: Path
    text_encoder: TextEncoder
    max_length: int | None = None

    @classmethod
    def create(
        cls,
        image_root: Path,
        tokenizer: str = "pkg://tiny_tokenizer",
        template: str = "vicuna_v1",
        image_tokens: ImageTokenCounter | int = 576,
        max_length: int | None = None,
    ) -> Validator:
        """`image_tokens`: what each image expands to, the vision side's counter (an int: every
        image that many, 576 for CLIP-L/14 at 336 px)."""
        from vlmlab.models.llm import build_tokenizer
        from vlmlab.text import IMAGE_TOKEN
        from vlmlab.text.templates import get_template

        if not tokenizer.startswith("pkg://") and not Path(tokenizer).is_dir():
            raise ConfigError(
                "--tokenizer", f"{tokenizer} is not a folder.", "pass a local tokenizer folder."
            )
        tok = build_tokenizer({"name_or_path": tokenizer})
        try:
            chat_template = get_template(template, tok.eos_token)
        except ConfigError as err:
            raise ConfigError("--template", str(err)) from None
        encoder = TextEncoder(
            tok, chat_template, image_tokens, tok.convert_tokens_to_ids(IMAGE_TOKEN), UNLIMITED
        )
        return cls(Path(image_root), encoder, max_length)

    def __call__(self, entry: Entry) -> Accepted | Rejected:
        index, value = entry.index, entry.value
        if entry.error:
            return Rejected(index, None, "bad_json", entry.error)
        if not isinstance(value, dict):
            return Rejected(index, None, "bad_entry", f"a {type(value).__name__}, not an object")
        sample_id = value.get("id")
        if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool) or sample_id == "":
            return Rejected(index, sample_id, "bad_entry", "`id` must be a non-empty string or int")
        conversations = value.get("conversations")
        if not isinstance(conversations, list) or not all(
            isinstance(m, dict) for m in conversations
        ):
            return Rejected(
                index, sample_id, "bad_entry", "`conversations` must be a list of objects"
            )
        image = value.get("image")
        try:
            ext, sha, size, dims = (
                self._check_image(image) if image is not None else (None, None, 0, None)
            )
            encoded = self.text_encoder.encode(
                conversations, has_image=image is not None, image_size=dims
            )
        except BadSample as bad:
            detail = str(bad).removeprefix(bad.reason).removeprefix(": ")
            return Rejected(index, sample_id, bad.reason, detail)
        num_tokens = len(encoded["input_ids"])
        if self.max_length is not None and num_tokens > self.max_length:
            return Rejected(
                index, sample_id, "too_long", f"{num_tokens} > {self.max_length} tokens"
            )
        return Accepted(
            index=index,
            key=entry_key(sample_id),
            record_json=json.dumps(value, sort_keys=True).encode(),
            image_path=image if image is not None else None,
            image_ext=ext,
            image_sha256=sha,
            image_size=size,
            num_tokens=num_tokens,
        )

    def _check_image(self, image: Any) -> tuple[str, str, int, ImageSize]:
        """(ext, sha256, bytes, (width, height)) of a readable image; BadSample otherwise.

        The dimensions are what the loader will decode: they decide the image's token count.
        For a count that depends on them (AnyRes), and for modes the loader converts or refuses
        (16-bit, float), the image is decoded as the loader decodes it (`decode_image`: EXIF
        orientation swaps width and height); an 8-bit image under a fixed count needs the
        header only (a full decode of every image would double the conversion's time)."""
        if not isinstance(image, str) or not image:
            raise BadSample("bad_entry", "`image` must be a non-empty path")
        ext = Path(image).suffix.lstrip(".").lower()
        if ext not in IMAGE_EXTENSIONS:
            raise BadSample("unsupported_image_format", f"{image}: use one of {IMAGE_EXTENSIONS}")
        path = self.image_root / image
        try:
            payload = path.read_bytes()
        except OSError:
            raise BadSample("missing_image", str(path)) from None
        try:
            with Image.open(io.BytesIO(payload)) as opened:
                dims, mode = opened.size, opened.mode
                opened.verify()
        except Exception as err:  # PIL raises many types for broken files
            raise BadSample("corrupt_image", f"{image}: {err}") from None
        if self.anyres or mode in HIGH_DEPTH_MODES or mode == "F":
            dims = decode_image(payload, orient=self.anyres).size
        return ext, hashlib.sha256(payload).hexdigest(), len(payload), dims

    @property
    def anyres(self) -> bool:
        """Whether images are AnyRes-tiled: their count depends on the decoded (oriented) size."""
        return isinstance(self.text_encoder.image_tokens, AnyResTokens)


_VALIDATOR: Validator | None = None


def _validate_in_worker(entry: Entry) -> Accepted | Rejected:
    assert _VALIDATOR is not None
    return _VALIDATOR(entry)


def validate_all(
    entries: list[Entry],
    validator: Validator,
    workers: int = 1,
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None,
) -> list[Accepted | Rejected]:
    """Results in input order (for any number of workers); a repeated key is a `duplicate_id`."""
    global _VALIDATOR
    wrap = progress or (lambda items, total, desc: items)
    if workers <= 1:
        results = list(wrap((validator(e) for e in entries), len(entries), "validate"))
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust threads across fork
        _VALIDATOR = validator
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            mapped = pool.imap(_validate_in_worker, entries, chunksize=64)
            results = list(wrap(mapped, len(entries), "validate"))
    seen: dict[str, int] = {}
    for i, result in enumerate(results):
        if isinstance(result, Accepted):
            if result.key in seen:
                detail = f"key {result.key!r} already used by entry {seen[result.key]}"
                sample_id = json.loads(result.record_json).get("id")
                results[i] = Rejected(result.index, sample_id, "duplicate_id", detail)
            else:
                seen[result.key] = result.index
    return results
