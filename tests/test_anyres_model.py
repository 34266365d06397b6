"""AnyRes on the model side: `encoder.image=anyres` builds a VLM that encodes every tile of a
batch at once, packs each image's tiles into its own token run (a different count per image),
learns `image_newline` with the connector, refuses connectors without a tile grid, and plans
the largest grid. Real tiny models; the tiles and counter themselves are tests/test_anyres.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from vlmlab import stages
from vlmlab.config import compose
from vlmlab.errors import ConfigError
from vlmlab.models import anyres_counter, build_vlm
from vlmlab.models.anyres import AnyResImages, AnyResTokens, pack_tile_features
from vlmlab.plan import plan
from vlmlab.text import IGNORE_INDEX
from vlmlab.training.module import VLMModule

ANYRES = ["encoder.image=anyres"]
# Tiny pinpoints (64 px tiles): a wide, a tall and a square image give three different grids.
SIZES = [(150, 60), (50, 130), (90, 90)]


def _images(sizes: list[tuple[int, int]] = SIZES) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for width, height in sizes:
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
        out.append(Image.fromarray(pixels.numpy()))
    return out


@pytest.fixture
def anyres_model(compose_cfg: Callable[..., DictConfig]) -> tuple[Any, Any]:
    cfg = compose_cfg(*ANYRES)
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm)


def _batch(model: Any, tokenizer: Any, images: list[Image.Image]) -> dict[str, Any]:
    """Rows of text + one `<image>` run each (count from the model's counter), a text-only row
    last, labels on the text after the image; pixels and sizes as the data side sends them."""
    counter = model.image_token_counter()
    rows, counts = [], []
    for k in range(len(images) + 1):
        prefix = tokenizer(f"row {k} look", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" answer number {k}", add_special_tokens=False)["input_ids"]
        image = []
        if k < len(images):
            counts.append(counter(images[k].size).count)
            image = [model.image_token_id] * counts[-1]
        ids = [tokenizer.bos_token_id, *prefix, *image, *answer]
        labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(ids)], mask[i, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(lab),
            1,
        )
    pixel_values = torch.cat([model.image_processor(image) for image in images])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": [image.size for image in images],
        "image_tokens": counts,
    }


def test_image_strategy_defaults_to_pad_and_keeps_the_state_dict(tiny_model: tuple) -> None:
    model, _ = tiny_model
    assert model.image_strategy == "pad" and model.image_newline is None
    assert model.image_processor is model.encoder.image_transform
    assert not any("newline" in name for name in model.state_dict())
    assert model.max_image_tiles == 1


def test_anyres_model_parts(anyres_model: tuple) -> None:
    model, _ = anyres_model
    counter = model.image_token_counter()
    assert isinstance(counter, AnyResTokens)
    assert (counter.tile_size, counter.side) == (64, 4)  # tiny: 64 px, 16 patches per tile
    assert counter.pinpoints == ((64, 128), (128, 64), (128, 128), (192, 64), (64, 192))
    assert isinstance(model.image_processor, AnyResImages)
    assert model.image_newline is not None and model.image_newline.shape == (128,)
    assert model.max_image_tiles == 1 + 4  # overview + the 2x2 grid
    with pytest.raises(ValueError, match="depends on the image"):
        _ = model.num_image_tokens
    pixels = model.image_processor(_images([(150, 60)])[0])
    rows, cols = counter((150, 60)).grid
    assert pixels.shape == (1 + rows * cols, 3, 64, 64)


def test_image_newline_init_is_deterministic_and_leaves_the_connector_alone(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    """LLaVA-NeXT's randn(D) / sqrt(D), drawn from the connector's seed after its weights."""
    a, _ = build_vlm(*(compose_cfg(*ANYRES)[k] for k in ("encoder", "connector", "llm")))
    b, _ = build_vlm(*(compose_cfg(*ANYRES)[k] for k in ("encoder", "connector", "llm")))
    pad, _ = build_vlm(*(compose_cfg()[k] for k in ("encoder", "connector", "llm")))
    assert torch.equal(a.image_newline, b.image_newline)
    std = float(a.image_newline.detach().std())
    assert 0.5 / 128**0.5 < std < 1.5 / 128**0.5
    for (name, p), q in zip(a.connector.named_parameters(), pad.connector.parameters()):
        assert torch.equal(p, q), name
    seeded = compose_cfg(*ANYRES, "connector.init_seed=1")
    c, _ = build_vlm(seeded.encoder, seeded.connector, seeded.llm)
    assert not torch.equal(a.image_newline, c.image_newline)


def test_no_newline_option(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg(*ANYRES, "encoder.anyres.newline=false")
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert model.image_newline is None
    counter = model.image_token_counter()
    (rows, cols), (h, w) = counter.layout((150, 60))
    assert (rows, cols, h, w) == (1, 3, 4, 10)  # 192x64 canvas, 12 columns, 2 of padding cut
    assert counter((150, 60)).count == 16 + h * w  # overview + unpadded grid, no newlines


@pytest.mark.parametrize("mode", ["transformers", "llava"])
def test_batched_tiles_scatter_each_images_own_run(
    compose_cfg: Callable[..., DictConfig], mode: str
) -> None:
    """Images of three shapes (three token counts) and a text-only row in one batch: every
    image's slots hold exactly the packed features of that image encoded alone."""
    cfg = compose_cfg(*ANYRES, f"encoder.anyres.mode={mode}")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    images = _images()
    counts = [model.image_token_counter()(image.size).count for image in images]
    assert len(set(counts)) == 3, counts  # the shapes give different counts
    batch = _batch(model, tokenizer, images)
    with torch.no_grad():
        embeds = model.embed(
            batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"]
        )
    is_image = batch["input_ids"] == model.image_token_id
    assert is_image.sum(1).tolist() == [*counts, 0]
    counter = model.image_token_counter()
    for row, image in enumerate(images):
        with torch.no_grad():
            alone = model.encode_images(model.image_processor(image))
            expected = pack_tile_features(alone, image.size, counter, model.image_newline)
        torch.testing.assert_close(embeds[row][is_image[row]], expected, rtol=1e-5, atol=1e-5)
        # the last token of each grid row is the learned newline
        if counter.newline:
            (_, _), (h, w) = counter.layout(image.size)
            newline_rows = expected[counter.side**2 :].view(h, w + 1, -1)[:, -1]
            assert torch.equal(newline_rows, model.image_newline.expand(h, -1))


def test_anyres_needs_image_sizes(anyres_model: tuple) -> None:
    model, tokenizer = anyres_model
    batch = _batch(model, tokenizer, _images())
    with pytest.raises(ValueError, match="image_sizes"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    wrong = [batch["image_sizes"][1], batch["image_sizes"][0], batch["image_sizes"][2]]
    with pytest.raises(ValueError, match="tiles"):  # sizes that do not fit the pixels
        model.embed(batch["input_ids"], batch["pixel_values"], image_sizes=wrong[:2])


@pytest.mark.parametrize("connector", ["qformer", "resampler"])
def test_query_connectors_are_refused_before_the_build(connector: str) -> None:
    cfg = compose([*ANYRES, f"connector={connector}"])
    with pytest.raises(ConfigError, match="connector") as err:
        # a 7B LLM: refused before any weights exist (no memory, no download)
        build_vlm(cfg.encoder, cfg.connector, compose(["llm=vicuna7b"]).llm, weights="none")
    assert err.value.key == "encoder.image"
    assert "encoder.image=pad" in str(err.value)
    # built parts (an encoder preset without architecture numbers skips the probe): the same
    # check on the real connector, whose 64 queries are a square count but no grid
    built = compose([f"connector={connector}"])
    model, _ = build_vlm(built.encoder, built.connector, built.llm)
    with pytest.raises(ConfigError) as err:
        anyres_counter({}, model.encoder, model.connector)
    assert err.value.key == "encoder.image"


def test_cls_features_are_refused() -> None:
    cfg = compose([*ANYRES, "encoder.select_feature=cls_patch"])
    with pytest.raises(ConfigError) as err:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert err.value.key == "encoder.select_feature"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("encoder.image=tiles", "encoder.image"),
        ("encoder.anyres.mode=hf", "encoder.anyres.mode"),
        ("encoder.anyres.grid_pinpoints=[[64,100]]", "encoder.anyres.grid_pinpoints"),
        ("encoder.anyres.max_tiles=1", "encoder.anyres.max_tiles"),
    ],
)
def test_bad_anyres_settings_name_their_key(override: str, key: str) -> None:
    image = [] if override.startswith("encoder.image") else ANYRES
    cfg = compose([*image, override])
    with pytest.raises(ConfigError) as err:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert err.value.key == key


def test_range_form_and_max_tiles(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg(
        *ANYRES, "encoder.anyres.grid_pinpoints='(1x1),...,(3x3)'", "encoder.anyres.max_tiles=4"
    )
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    pinpoints = model.image_token_counter().pinpoints
    assert pinpoints == ((64, 64), (64, 128), (64, 192), (128, 64), (128, 128), (192, 64))
    assert model.max_image_tiles == 5


def test_stage1_trains_image_newline_with_the_connector(anyres_model: tuple) -> None:
    model, _ = anyres_model
    policy = {
        "train": ["connector"],
        "param_groups": [{"name": "projector", "match": "connector.*", "lr": 2e-5}],
    }
    plan_ = stages.apply(policy, model)
    assert "image_newline" in plan_.trainable and model.image_newline.requires_grad
    (group,) = plan_.groups
    assert group["name"] == "projector" and "image_newline" in group["params"]
    row = next(r for r in plan_.table if r["component"] == "connector")
    connector = sum(p.numel() for p in model.connector.parameters())
    assert row["total"] == row["trainable"] == connector + 128
    # LLM-only and an explicit freeze leave it frozen
    stages.apply({"train": ["llm"]}, model)
    assert not model.image_newline.requires_grad
    stages.apply({"train": ["connector"], "freeze": ["image_newline"]}, model)
    assert not model.image_newline.requires_grad


def test_training_step_reaches_image_newline(anyres_model: tuple) -> None:
    """A CPU training step through VLMModule (which passes the batch's image_sizes): the loss
    reaches image_newline, and a text-only batch still gives it a (zero) gradient."""
    model, tokenizer = anyres_model
    stages.apply({"train": ["connector"]}, model)
    module = VLMModule(model, {"lr": 1e-2}, total_steps=1)
    batch = _batch(model, tokenizer, _images())
    out = module(batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.image_newline.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    before = model.image_newline.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert not torch.equal(before, model.image_newline)

    model.zero_grad(set_to_none=True)
    text = {k: v[-1:] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    module(text).loss.backward()  # the vision anchor: DDP/FSDP see every trainable parameter
    assert model.image_newline.grad is not None
    assert float(model.image_newline.grad.abs().sum()) == 0.0


def test_generation_batches_images_of_different_counts(anyres_model: tuple) -> None:
    """Greedy answers for a mixed batch equal each request generated alone."""
    from vlmlab.eval.generate import GenerationConfig, Generator, Request
    from vlmlab.text import IMAGE_PLACEHOLDER
    from vlmlab.text.templates import Turn, get_template

    model, tokenizer = anyres_model
    model.eval()
    gen = Generator(
        model, tokenizer, get_template("vicuna_v1", tokenizer.eos_token), model.image_processor
    )
    images: list[Image.Image | None] = [*_images(), None]
    requests = [
        Request([Turn("human", (f"{IMAGE_PLACEHOLDER}\n" if im else "") + "What is it?")], im)
        for im in images
    ]
    config = GenerationConfig(max_new_tokens=5)
    together = gen(requests, config)
    alone = [gen([r], config)[0] for r in requests]
    assert together == alone


def test_plan_counts_tokens_and_tiles_at_the_largest_grid() -> None:
    """LLaVA-NeXT 7B shapes: 576 + 2x2 x 576 + 48 newlines = 2,928 tokens at most (the number
    transformers gives a 672x672 image), 5 tiles through the encoder; a trained encoder's
    activations scale with the tiles."""
    base = ["encoder=clip336", "connector=mlp", "llm=vicuna7b", "data.max_length=4096"]
    train_encoder = ["stage=2", "stage.train=[connector,llm,encoder]"]
    pad = plan(compose([*base, *train_encoder]), micro_batch=1, seq_len=2048)
    anyres = plan(compose([*base, *train_encoder, *ANYRES]), micro_batch=1, seq_len=2048)
    assert (pad["image_tokens"], pad["image_tiles"]) == (576, 1)
    assert (anyres["image_tokens"], anyres["image_tiles"]) == (2928, 5)
    connector = pad["components"]["connector"]["total"]
    assert anyres["components"]["connector"]["total"] == connector + 4096  # image_newline
    # the LLM's share is equal (same seq_len): the difference is the encoder's 4 extra tiles
    extra = anyres["memory"]["activations_gb"] - pad["memory"]["activations_gb"]
    per_layer_tile = 34 * 576 * 1024 * 4 / 2  # bytes per layer and tile: fp32 (32-true)
    assert extra == pytest.approx(4 * 24 * per_layer_tile / 1e9, rel=1e-6)
    # the loader's look-ahead: 16 x 16 samples (grouped, the default) x 5 uint8 tiles x 4 workers
    grouped = ["data.batch_size=16", "data.group_by_length=true", "data.num_workers=4"]
    loader = plan(compose([*base, *ANYRES, *grouped]))["loader"]
    assert loader["lookahead_samples"] == 16 * 16 and loader["workers"] == 4
    assert loader["bytes_per_sample_max"] == 5 * 3 * 336 * 336
    assert loader["gb_per_rank_max"] == pytest.approx(256 * 5 * 3 * 336**2 * 4 / 1e9, abs=1e-3)
    assert plan(compose([*base, *grouped]))["loader"]["bytes_per_sample_max"] == 3 * 336 * 336
    small = plan(compose([*base, *ANYRES, "data.max_length=2048"]))
    assert any("2928 tokens" in note and "data.max_length" in note for note in small["notes"])


def test_generator_prepares_images_as_training_does(tiny_model: tuple, anyres_model: tuple) -> None:
    """A 16-bit image keeps its top 8 bits (PIL's convert('RGB') would clip it to white), both
    paths; AnyRes applies the EXIF orientation (width and height swap), pad keeps the pixels."""
    from vlmlab.eval.generate import Generator
    from vlmlab.text.templates import get_template

    deep = np.arange(40 * 70, dtype=np.uint16).reshape(40, 70) * 23
    image16 = Image.fromarray(deep.astype(np.int32)).convert("I;16")
    eight = Image.fromarray((deep >> 8).astype(np.uint8), mode="L")
    rotated = _images([(150, 60)])[0]
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tagged = Image.open(io.BytesIO(_png(rotated, exif)))
    for model, tokenizer in (tiny_model, anyres_model):
        gen = Generator(
            model, tokenizer, get_template("vicuna_v1", tokenizer.eos_token), model.image_processor
        )
        pixels, sizes = gen.pixels([image16])
        expected = model.image_processor(eight)
        assert torch.equal(pixels, expected if expected.dim() == 4 else expected[None])
        _, sizes = gen.pixels([tagged])
        assert sizes == ([(60, 150)] if model.image_strategy == "anyres" else [(150, 60)])


def _png(image: Image.Image, exif: Image.Exif) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()
