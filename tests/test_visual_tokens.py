"""Visual tokens as data: one batch holding images that give different numbers of tokens.

No vision side of ours gives a count that varies per image yet (AnyRes will), so the variable
case drives the real data and model functions with a counter that answers per image size, the
way a native-resolution encoder does (one token per 16 x 16 patch): real PNGs decoded by the
loader's SampleProcessor, the real tiny tokenizer and template, real grouping and collate, the
real VLM's LLM embeddings and scatter. The fixed case is the real tiny VLM end to end.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.test_loss_path import SYNC_OPS, _OpRecorder
from vlmlab.data.datamodule import SampleProcessor, collate
from vlmlab.data.grouping import form_batches
from vlmlab.data.tokenize import TextEncoder
from vlmlab.data.validate import Accepted, Entry, Validator
from vlmlab.models.vlm import scatter_image_embeds
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.templates import Turn, get_template
from vlmlab.visual import FixedImageTokens, ImageTokenCounter, ImageTokens

PATCH = 16


@dataclass(frozen=True)
class PatchGridTokens:
    """One token per started PATCH x PATCH cell of the decoded image (a native-resolution
    encoder's count): different image sizes give different counts."""

    largest: tuple[int, int] = (128, 128)

    def __call__(self, image_size: tuple[int, int] | None = None) -> ImageTokens:
        if image_size is None:
            raise ValueError("this counter needs the image's size")
        width, height = image_size
        rows, cols = -(-height // PATCH), -(-width // PATCH)
        return ImageTokens(rows * cols, grid=(rows, cols))

    @property
    def max_count(self) -> int:
        return self(self.largest).count

    @property
    def fixed_count(self) -> int | None:
        return None


# (width, height) -> tokens: 16, 6, 15, 1
SIZES = {"a": (64, 64), "b": (32, 48), "c": (80, 48), "d": (8, 8)}
LOOKS = {"a": 0, "b": 0, "c": 1, "d": 1, "t0": 0, "t1": 1, "t2": 2}  # extra text per sample


def _conversation(i: int, image: bool) -> list[dict[str, str]]:
    question = "What colour is the shape?" + " Look closely." * i
    if image:
        question = f"<image>\n{question}"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": f"Colour {i}."}]


def _png(size: tuple[int, int], i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 * i % 256, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw(key: str, i: int, size: tuple[int, int] | None) -> dict[str, Any]:
    conversation = _conversation(LOOKS[key], size is not None)
    record: dict[str, Any] = {"id": key, "conversations": conversation}
    raw: dict[str, Any] = {"__key__": key}
    if size is not None:
        record["image"] = f"{key}.png"
        raw["png"] = _png(size, i)
    raw["json"] = json.dumps(record).encode()
    return raw


def _encoder(model: Any, tokenizer: Any, counter: ImageTokenCounter | int) -> TextEncoder:
    template = get_template("vicuna_v1", tokenizer.eos_token)
    return TextEncoder(tokenizer, template, counter, model.image_token_id, 512)


def test_counter_contract() -> None:
    fixed = FixedImageTokens(576)
    assert fixed() == fixed((640, 480)) == ImageTokens(576)
    assert (fixed.max_count, fixed.fixed_count) == (576, 576)
    assert isinstance(fixed, ImageTokenCounter) and isinstance(PatchGridTokens(), ImageTokenCounter)
    assert pickle.loads(pickle.dumps(fixed)) == fixed  # travels into DataLoader workers
    assert [PatchGridTokens()(s).count for s in SIZES.values()] == [16, 6, 15, 1]
    assert PatchGridTokens()((80, 48)).grid == (3, 5)
    for bad in (0, -3, True):
        with pytest.raises(ValueError):
            ImageTokens(bad)
    with pytest.raises(ValueError):
        FixedImageTokens(0)


def test_fixed_vision_side_reports_what_it_embeds(tiny_model) -> None:
    """The tiny VLM's counter is what its encoder + connector produce, and what the text side
    expands to, whatever the image's size."""
    model, tokenizer = tiny_model
    size = model.encoder.image_size
    embeds = model.encode_images(torch.zeros(2, 3, size, size))
    counter = model.image_token_counter()
    assert counter == FixedImageTokens(embeds.shape[1]) == FixedImageTokens(16)
    assert model.image_tokens((999, 17)) == ImageTokens(16) and model.num_image_tokens == 16
    text = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 512)
    for image_size in (None, (64, 64), (300, 20)):
        out = text.encode(_conversation(0, True), True, image_size)
        assert out["image_tokens"] == [16]
        assert int((out["input_ids"] == model.image_token_id).sum()) == 16


def test_one_batch_with_different_token_counts_per_image(tiny_model) -> None:
    model, tokenizer = tiny_model
    counter = PatchGridTokens()
    process = SampleProcessor(_encoder(model, tokenizer, counter), model.encoder.image_transform)
    fixed = _encoder(model, tokenizer, 7)
    image_id = model.image_token_id
    raws = [_raw(key, i, size) for i, (key, size) in enumerate(SIZES.items())]
    raws += [_raw(f"t{i}", i, None) for i in range(3)]  # text-only samples
    samples = [process(raw) for raw in raws]

    # text side: each <image> expands to its own image's count, labels unchanged around it
    for raw, sample in zip(raws, samples):
        key = raw["__key__"]
        expected = [counter(SIZES[key]).count] if key in SIZES else []
        assert sample["image_tokens"] == expected
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        slots = [p for p, t in enumerate(ids) if t == image_id]
        assert len(slots) == sum(expected)
        if slots:
            assert slots == list(range(slots[0], slots[0] + len(slots)))  # one contiguous run
        assert all(labels[p] == IGNORE_INDEX for p in slots)
        # the same sample under a fixed count differs only in the length of the image run
        record = json.loads(raw["json"])
        ref = fixed.encode(record["conversations"], bool(expected))
        ref_ids, ref_labels = ref["input_ids"].tolist(), ref["labels"].tolist()
        keep = [(t, lab) for t, lab in zip(ids, labels) if t != image_id]
        assert keep == [(t, lab) for t, lab in zip(ref_ids, ref_labels) if t != image_id]

    # grouping: modality and true length (each image's own count included) form the batches.
    # Lengths past the shared text: b 6, d 11 + 1, a 16, c 11 + 15; with one count for every
    # image the pairs would be {a, b} and {c, d} instead.
    batches = form_batches(samples, [3, 2, 2], random.Random(0), by_length=True)
    assert sorted(sorted(s["id"] for s in b) for b in batches) == [
        ["a", "c"],
        ["b", "d"],
        ["t0", "t1", "t2"],
    ]

    # collate: the per-image counts travel with the batch, in row order
    image_samples = [s for s in samples if s["image_tokens"]]
    batch = collate([*image_samples, samples[-1]], tokenizer.pad_token_id, image_id)
    assert batch["ids"] == ["a", "b", "c", "d", "t2"]
    assert batch["image_tokens"] == [16, 6, 15, 1]
    assert batch["pixel_values"].shape[0] == 4
    is_image = batch["input_ids"] == image_id
    assert is_image.sum(1).tolist() == [16, 6, 15, 1, 0]
    assert batch["image_index"].tolist() == is_image.view(-1).nonzero().view(-1).tolist()

    # model side: each image's embeddings land in its own slots, with and without collate keys
    width = model.llm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    per_image = [torch.randn(n, width, generator=gen) for n in batch["image_tokens"]]
    text_ids = batch["input_ids"].masked_fill(is_image, 0)
    embeds = model.llm.get_input_embeddings()(text_ids).detach()
    fast = scatter_image_embeds(
        embeds, is_image, per_image, batch["image_index"], batch["image_tokens"], batch["ids"]
    )
    with _OpRecorder() as recorder:  # with collate's keys, the check reads host values only
        scatter_image_embeds(
            embeds, is_image, per_image, batch["image_index"], batch["image_tokens"], batch["ids"]
        )
    assert not any(recorder.ops[op] for op in SYNC_OPS), recorder.ops
    slow = scatter_image_embeds(embeds, is_image, per_image)
    assert torch.equal(fast, slow)
    for row, image in enumerate(per_image):
        assert torch.equal(fast[row][is_image[row]], image)
    assert torch.equal(fast[~is_image], embeds[~is_image])
    logits = model.llm(inputs_embeds=fast, attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()

    # a vision side that disagrees with the text for one image: the error names that sample
    short = [*per_image[:2], per_image[2][:-1], per_image[3]]
    for index, declared in ((batch["image_index"], batch["image_tokens"]), (None, None)):
        with pytest.raises(ValueError, match=r"sample 'c' \(batch row 2\)"):
            scatter_image_embeds(embeds, is_image, short, index, declared, batch["ids"])
    # same total, wrong split between two images: caught per image
    swapped = [per_image[0], torch.randn(15, width), torch.randn(6, width), per_image[3]]
    with pytest.raises(ValueError, match=r"sample 'b' \(batch row 1\).*6 image tokens.*15"):
        scatter_image_embeds(
            embeds, is_image, swapped, batch["image_index"], batch["image_tokens"], batch["ids"]
        )
    with pytest.raises(ValueError, match=r"sample 'b' \(batch row 1\) holds 6 image tokens"):
        scatter_image_embeds(embeds, is_image, swapped, sample_ids=batch["ids"])


def test_prompts_and_validation_ask_the_counter(tiny_model, tmp_path: Path) -> None:
    """Generation prompts and shard validation expand each image by its own size."""
    model, tokenizer = tiny_model
    text = _encoder(model, tokenizer, PatchGridTokens())
    turns = [Turn("human", "<image>\nWhat colour is it?")]
    for size in SIZES.values():
        ids = text.encode_prompt(turns, image_size=size)
        assert int((ids == model.image_token_id).sum()) == PatchGridTokens()(size).count

    entries = []
    for i, (key, size) in enumerate(SIZES.items()):
        (tmp_path / f"{key}.png").write_bytes(_png(size, i))
        value = {"id": key, "image": f"{key}.png", "conversations": _conversation(0, True)}
        entries.append(Entry(i, value))
    results = [Validator(tmp_path, text)(entry) for entry in entries]
    assert all(isinstance(r, Accepted) for r in results)
    lengths = [r.num_tokens for r in results if isinstance(r, Accepted)]
    counts = [PatchGridTokens()(size).count for size in SIZES.values()]
    # same conversation: lengths differ exactly by the images' counts
    assert [n - c for n, c in zip(lengths, counts)] == [lengths[0] - counts[0]] * len(counts)


def test_scatter_adjacent_images_in_one_row() -> None:
    """Two images back to back form one run of slots: each row's total is what is checked."""
    width = 8
    embeds = torch.zeros(2, 30, width)
    is_image = torch.zeros(2, 30, dtype=torch.bool)
    is_image[0, 2:24] = True  # images of 16 and 6 tokens, adjacent
    is_image[1, 5:20] = True  # one image of 15
    images = [torch.randn(n, width) for n in (16, 6, 15)]
    out = scatter_image_embeds(embeds, is_image, images)
    assert torch.equal(out[0, 2:24], torch.cat(images[:2]))
    assert torch.equal(out[1, 5:20], images[2])
    wrong = [images[0], images[1][:5], images[2]]
    with pytest.raises(ValueError, match=r"sample 'x' \(batch row 0\) holds 22 image tokens"):
        scatter_image_embeds(embeds, is_image, wrong, sample_ids=["x", "y"])
