"""The loader's workers send uint8 pixels and normalise a whole batch into shared memory
(issue 15, item 7): the model must see exactly the floats the per-image transform gives.

Real JPEG/PNG shards (odd sizes, greyscale, wide and tall), the real streaming DataModule with 0
and 2 worker processes, the tiny tokenizer; the reference is `ImageTransform.__call__` on the
decoded image (itself equal to transformers' `CLIPImageProcessorPil`, tests/test_hf_llava.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.data.datamodule import SampleProcessor, VLMDataModule, uint8_normalization
from vlmlab.data.shards import write_shards
from vlmlab.data.tokenize import TextEncoder
from vlmlab.data.validate import decode_image
from vlmlab.models.anyres import AnyResImages
from vlmlab.models.image_transform import ImageTransform, normalize_planes, to_planes
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IMAGE_TOKEN
from vlmlab.text.templates import get_template

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TRANSFORM = ImageTransform(size=48, mean=MEAN, std=STD)
SIZES = [(64, 48), (48, 64), (100, 30), (48, 48), (31, 77), (200, 150), (17, 90), (90, 60)]


def _text_encoder() -> TextEncoder:
    tok = build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return TextEncoder(tok, get_template("vicuna_v1", tok.eos_token), 4, image_id, 256)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Four shards: 16 images (JPEG and PNG, RGB and greyscale) and 4 text-only samples."""
    root = tmp_path_factory.mktemp("pixels")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records: list[dict[str, Any]] = []
    payloads: dict[str, bytes] = {}
    for i, (width, height) in enumerate(SIZES * 2):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if i % 3 == 2:
            image = image.convert("L")
        name = f"im{i:02d}.{'jpg' if i % 2 else 'png'}"
        image.save(images / name)
        payloads[f"img{i:02d}"] = (images / name).read_bytes()
        question = {"from": "human", "value": "<image>\nWhat is it?"}
        records.append({"id": f"img{i:02d}", "image": name, "conversations": [question, _gpt()]})
    for i in range(4):
        question = {"from": "human", "value": "Name a colour."}
        records.append({"id": f"txt{i}", "conversations": [question, _gpt()]})
    write_shards(records, images, root / "shards", shard_sizes=[5, 5, 5, 5])
    return root / "shards", payloads


def _gpt() -> dict[str, str]:
    return {"from": "gpt", "value": "a coloured shape"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_pixels_equal_the_per_image_float_path(
    shards: tuple[Path, dict[str, bytes]], num_workers: int
) -> None:
    shard_dir, payloads = shards
    module = VLMDataModule(
        shard_dir, _text_encoder(), TRANSFORM, batch_size=3, num_workers=num_workers, seed=0
    )
    seen = 0
    for batch in module.train_dataloader():
        with_image = [i for i in batch["ids"] if i.startswith("img")]
        if not with_image:
            assert batch["pixel_values"] is None
            continue
        expected = torch.stack(
            [TRANSFORM(decode_image(payloads[i], orient=False)) for i in with_image]
        )
        assert batch["pixel_values"].dtype == torch.float32
        assert torch.equal(batch["pixel_values"], expected)
        seen += len(with_image)
    assert seen == len(payloads)


def test_workers_send_uint8_planes_of_the_same_geometry(
    shards: tuple[Path, dict[str, bytes]],
) -> None:
    """SampleProcessor(uint8_pixels=True) gives the geometry as uint8 (a quarter of the bytes);
    normalising it gives the float processor's output, for pad and AnyRes processors."""
    anyres = AnyResImages(((48, 96), (96, 48), (96, 96)), 48, MEAN, STD)
    raw_json = b'{"id": "x", "image": "x.jpg", "conversations": [%s, %s]}' % (
        b'{"from": "human", "value": "<image>\\nWhat is it?"}',
        b'{"from": "gpt", "value": "a shape"}',
    )
    text = _text_encoder()
    for processor in (TRANSFORM, anyres):
        norm = uint8_normalization(processor)
        assert norm == (MEAN, STD)
        as_floats = SampleProcessor(text, processor)
        as_planes = SampleProcessor(text, processor, uint8_pixels=True)
        for payload in shards[1].values():
            raw = {"json": raw_json, "jpg": payload, "__key__": "x"}
            floats = as_floats(raw)["pixel_values"]
            planes = as_planes(raw)
            assert planes["pixel_values"].dtype == torch.uint8
            normalised = normalize_planes(planes["pixel_values"].numpy(), *norm, shared=True)
            assert normalised.is_shared() and torch.equal(normalised, floats)
    assert uint8_normalization(lambda image: torch.zeros(3)) is None  # any callable: floats


def test_every_level_of_every_channel_normalises_identically() -> None:
    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([levels, np.roll(levels, 85), np.roll(levels, 170)], -1)[None])
    planes = to_planes(image)
    reference = ImageTransform(size=1, mean=MEAN, std=STD).normalize(image)
    assert torch.equal(normalize_planes(planes.numpy(), MEAN, STD, shared=True), reference)
    # the table is `(x / 255 - mean) / std` in float32, as transformers' rescale + normalize
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy())
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (MEAN, STD))
    assert torch.equal(reference, (x / torch.tensor(255.0) - mean) / std)
    # the wire format: uint8, a quarter of the float bytes
    assert planes.dtype == torch.uint8 and planes.shape == (3, 1, 256)
    assert io.BytesIO(planes.numpy().tobytes()).getbuffer().nbytes * 4 == reference.nbytes
