"""AnyRes on the data side: images of many shapes through real shards, the real streaming
DataModule, the tiny tokenizer and template, real grouping and collate (issue 14, acceptance 4).

The image side is `models.anyres` at the tiny encoder's size (64 px tiles, 16 px patches, so
a 4 x 4 feature grid per tile) with the tiny preset's LLaVA-1.6-shaped pinpoints: images from
1:4 to 4:1 give 34 to 88 tokens each. Bad input (smaller than a patch, a 100:1 panorama, a float
image, a grid longer than `data.max_length`) is a counted skip; CMYK, 16-bit and EXIF-rotated
images are read correctly; the epoch completes with every good sample exactly once.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vlmlab.config import conf_dir
from vlmlab.data.datamodule import SampleProcessor, VLMDataModule, collate
from vlmlab.data.shards import MANIFEST, write_shards
from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.data.validate import Accepted, Entry, Rejected, Validator
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import AnyResImages, AnyResTokens, parse_grid_pinpoints
from vlmlab.models.image_transform import ImageTransform
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IMAGE_TOKEN
from vlmlab.text.templates import get_template
from vlmlab.visual import FixedImageTokens

TINY = OmegaConf.load(conf_dir() / "encoder" / "tiny.yaml")
TILE = int(TINY.config.image_size)  # 64
SIDE = TILE // int(TINY.config.patch_size)  # 4 x 4 features per tile
MEAN, STD = tuple(TINY.transform.mean), tuple(TINY.transform.std)
PINPOINTS = parse_grid_pinpoints([[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]], TILE)
# (width, height): square, 2:1, 1:2, 4:3, 3:4, 4:1, 1:4, odd sizes, tiny (20 px > one patch)
SIZES = [
    (64, 64),
    (128, 64),
    (64, 128),
    (200, 150),
    (150, 200),
    (256, 64),
    (64, 256),
    (37, 90),
    (300, 300),
    (90, 30),
    (500, 80),
    (640, 480),
    (480, 640),
    (20, 20),
]


def _tokenizer() -> Any:
    return build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})


def _text_encoder(counter: Any, max_length: int = 512) -> TextEncoder:
    tok = _tokenizer()
    return TextEncoder(
        tok,
        get_template("vicuna_v1", tok.eos_token),
        counter,
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        max_length,
    )


def _anyres(
    pinpoints: tuple[tuple[int, int], ...] = PINPOINTS,
) -> tuple[AnyResTokens, AnyResImages]:
    return AnyResTokens(pinpoints, TILE, SIDE), AnyResImages(pinpoints, TILE, MEAN, STD)


def _tiles(counter: AnyResTokens, size: tuple[int, int]) -> int:
    """Tiles of one image: the overview plus its grid."""
    rows, cols = counter.layout(size)[0]
    return 1 + rows * cols


def _pixels(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def _record(sample_id: str, image: str | None, words: int = 1) -> dict[str, Any]:
    answer = " ".join(["a picture of a coloured shape"] * words)
    if image is None:
        return {
            "id": sample_id,
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": answer},
            ],
        }
    return {"id": sample_id, "image": image, "conversations": _conv("What is it?", answer)}


def write_mixed_shapes(
    root: Path,
    shard_dir: Path,
    shard_sizes: list[int],
    extra: tuple[tuple[str, bytes], ...] = (),
) -> tuple[Path, dict[str, Any]]:
    """Shards of 28 images of the 14 SIZES (answers of 1-3 lengths) and 4 text-only samples,
    shuffled, plus `extra` (file name, bytes) image samples. Returns (image root,
    {id: (width, height) or None for text-only}); `extra` ids are their names' stems."""
    images = root / "images"
    images.mkdir(parents=True)
    records: list[dict[str, Any]] = []
    sizes: dict[str, tuple[int, int] | None] = {}
    for i, size in enumerate(SIZES * 2):
        name = f"im{i:02d}.png"
        _pixels(size, i).save(images / name)
        records.append(_record(f"img{i:02d}", name, words=1 + i % 3))
        sizes[f"img{i:02d}"] = size
    for i in range(4):
        records.append(_record(f"txt{i}", None, words=1 + i))
        sizes[f"txt{i}"] = None
    for name, payload in extra:
        (images / name).write_bytes(payload)
        records.append(_record(Path(name).stem, name))
    order = np.random.default_rng(0).permutation(len(records))
    write_shards([records[i] for i in order], images, shard_dir, shard_sizes=shard_sizes)
    return images, sizes


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(shard dir, image root, {id: size}): `write_mixed_shapes` in 4 uneven shards."""
    root = tmp_path_factory.mktemp("anyres_mixed")
    images, sizes = write_mixed_shapes(root, root / "shards", [9, 7, 8, 8])
    return root / "shards", images, sizes


def _datamodule(
    shard_dir: Path,
    text_encoder: TextEncoder,
    processor: Any,
    num_workers: int = 0,
    batch_size: int = 4,
    group_by_length: bool = False,
) -> VLMDataModule:
    return VLMDataModule(
        shard_dir,
        text_encoder,
        processor,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=8,
        seed=0,
        group_by_length=group_by_length,
        group_megabatch=4,
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_shapes_stream_once_with_tiles_sizes_and_counts(
    mixed_shards: tuple[Path, Path, dict[str, Any]], num_workers: int
) -> None:
    """Every sample once; per batch the tiles of all images concatenated in order, the decoded
    size and token count of each image, each row's `<image>` run as long as its image's count."""
    shard_dir, images, sizes = mixed_shards
    counter, processor = _anyres()
    text = _text_encoder(counter)
    dm = _datamodule(shard_dir, text, processor, num_workers, group_by_length=True)
    seen = []
    for batch in dm.train_dataloader():
        seen += batch["ids"]
        with_image = [i for i in batch["ids"] if sizes[i] is not None]
        assert batch["image_sizes"] == [sizes[i] for i in with_image]
        assert batch["image_tokens"] == [counter(sizes[i]).count for i in with_image]
        tiles = [_tiles(counter, sizes[i]) for i in with_image]
        if not with_image:
            assert batch["pixel_values"] is None
            continue
        assert batch["pixel_values"].shape == (sum(tiles), 3, TILE, TILE)
        per_row = (batch["input_ids"] == text.image_token_id).sum(1).tolist()
        assert per_row == [counter(sizes[i]).count if sizes[i] else 0 for i in batch["ids"]]
        for sample_id, part in zip(with_image, batch["pixel_values"].split(tiles)):
            index = int(sample_id[3:])
            with Image.open(images / f"im{index:02d}.png") as image:
                assert torch.equal(part, processor(image))
    assert sorted(seen) == sorted(sizes)  # exactly once
    assert len(set(text.tokens_for(s).count for s in SIZES)) >= 10  # truly mixed counts


def test_collate_concatenates_tiles_and_stacks_single_tiles() -> None:
    """AnyRes images (4-D each) are joined along dim 0; `pad` images (3-D) stacked as before;
    `image_sizes` lists the images' sizes in order and is present (empty) without images."""

    def sample(n: int, tiles: int | None, size: tuple[int, int] | None) -> dict[str, Any]:
        pixels = None if size is None else torch.rand((tiles, 3, 8, 8) if tiles else (3, 8, 8))
        return {
            "id": f"s{n}",
            "input_ids": torch.arange(1, 4 + n),
            "labels": torch.arange(1, 4 + n),
            "pixel_values": pixels,
            "image_size": size,
            "image_tokens": [5] if size else [],
        }

    anyres = [sample(0, 3, (128, 64)), sample(1, None, None), sample(2, 5, (200, 150))]
    batch = collate(anyres, pad_token_id=0)
    assert batch["pixel_values"].shape == (8, 3, 8, 8)
    assert torch.equal(batch["pixel_values"][3:], anyres[2]["pixel_values"])
    assert batch["image_sizes"] == [(128, 64), (200, 150)]
    pad = [sample(0, None, (64, 64)), sample(1, 0, (30, 40))]
    assert collate(pad, pad_token_id=0)["pixel_values"].shape == (2, 3, 8, 8)
    text_only = collate([sample(1, None, None)], pad_token_id=0)
    assert text_only["pixel_values"] is None and text_only["image_sizes"] == []


# --------------------------------------------------------------------------- bad input


def _save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _exif_rotated_jpeg(size: tuple[int, int]) -> bytes:
    """A JPEG stored `size` (width, height) with EXIF orientation 6 (shown rotated 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_pixels(size, 7), "JPEG", quality=95, exif=exif.tobytes())


def _sixteen_bit(size: tuple[int, int]) -> tuple[bytes, Image.Image]:
    """A 16-bit greyscale PNG, and the 8-bit image of its top 8 bits (what it must read as)."""
    width, height = size
    values = np.random.default_rng(5).integers(0, 65536, (height, width)).astype(np.uint16)
    png = _save(Image.fromarray(values), "PNG")
    return png, Image.fromarray((values >> 8).astype(np.uint8), mode="L")


# A 3x3 pinpoint makes a square image of 172 tokens while every other image stays <= 88.
BIG = parse_grid_pinpoints([*PINPOINTS, (192, 192)], TILE)


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(shard dir, image root, data.max_length) holding good, degenerate and odd images."""
    root = tmp_path_factory.mktemp("anyres_bad")
    images = root / "images"
    images.mkdir()
    files = {
        "good_a.png": _save(_pixels((128, 64), 1), "PNG"),
        "good_b.png": _save(_pixels((64, 256), 2), "PNG"),
        "tiny.png": _save(_pixels((10, 10), 3), "PNG"),  # smaller than one 16 px patch
        "panorama.png": _save(_pixels((1000, 10), 4), "PNG"),  # 100:1
        "float.png": _save(Image.fromarray(np.ones((40, 60), np.float32), "F"), "TIFF"),
        "cmyk.jpg": _save(_pixels((64, 128), 6, "CMYK"), "JPEG", quality=95),
        "sixteen.png": _sixteen_bit((128, 64))[0],
        "rotated.jpg": _exif_rotated_jpeg((96, 48)),
        "huge.png": _save(_pixels((600, 600), 8), "PNG"),  # 3x3 tiles: 172 tokens
    }
    for name, payload in files.items():
        (images / name).write_bytes(payload)
    records = [_record(Path(name).stem, name) for name in files]
    records += [_record("text_a", None), _record("text_b", None, words=2)]
    write_shards(records, images, root / "shards", samples_per_shard=4)
    counter = AnyResTokens(BIG, TILE, SIDE)
    # the longest good sample fits; the 3x3 grid does not, whatever truncation keeps
    longest = len(
        _text_encoder(counter).encode(records[0]["conversations"], True, (80, 80))["input_ids"]
    )
    return root / "shards", images, longest + 8


SKIPPED = {"tiny": "unusable_image", "panorama": "unusable_image", "float": "unusable_image"}
SKIPPED["huge"] = "too_long"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_are_counted_skips_and_the_epoch_completes(
    bad_input: tuple[Path, Path, int], num_workers: int
) -> None:
    shard_dir, images, max_length = bad_input
    counter, processor = AnyResTokens(BIG, TILE, SIDE), AnyResImages(BIG, TILE, MEAN, STD)
    dm = _datamodule(shard_dir, _text_encoder(counter, max_length), processor, num_workers, 3)
    ids: list[str] = []
    skipped: Counter[str] = Counter()
    sizes: dict[str, tuple[int, int]] = {}
    pixels: dict[str, torch.Tensor] = {}
    for batch in dm.train_dataloader():
        ids += batch["ids"]
        skipped.update(batch["skipped"])
        with_image = [i for i in batch["ids"] if not i.startswith("text")]
        tiles = [_tiles(counter, s) for s in batch["image_sizes"]]
        sizes.update(zip(with_image, batch["image_sizes"]))
        if with_image:
            pixels.update(zip(with_image, batch["pixel_values"].split(tiles)))
    good = ["good_a", "good_b", "cmyk", "sixteen", "rotated", "text_a", "text_b"]
    assert sorted(ids) == sorted(good)
    assert dict(skipped) == dict(Counter(SKIPPED.values()))
    assert sizes["rotated"] == (48, 96)  # EXIF orientation 6 applied: tiled as it is seen
    with Image.open(images / "rotated.jpg") as stored:
        assert torch.equal(
            pixels["rotated"], processor(stored.transpose(Image.Transpose.ROTATE_270))
        )
    _, eight_bit = _sixteen_bit((128, 64))
    assert torch.equal(pixels["sixteen"], processor(eight_bit))  # not clipped to white
    with Image.open(images / "cmyk.jpg") as cmyk:
        assert torch.equal(pixels["cmyk"], processor(cmyk.convert("RGB")))


def test_bad_images_are_named_and_cost_no_tiles() -> None:
    """SampleProcessor alone: each degenerate image is a BadSample with a named reason."""
    counter, processor = _anyres()
    process = SampleProcessor(_text_encoder(counter), processor)

    def raw(payload: bytes, ext: str = "png") -> dict[str, Any]:
        record = _record("x", f"x.{ext}")
        return {"__key__": "x", "json": json.dumps(record).encode(), ext: payload}

    for payload, reason, detail in [
        (_save(_pixels((10, 10), 0), "PNG"), "unusable_image", "smaller than one encoder patch"),
        (_save(_pixels((1000, 10), 0), "PNG"), "unusable_image", "too elongated"),
        (_save(Image.fromarray(np.ones((4, 4), np.float32), "F"), "TIFF"), "unusable_image", "F"),
        (b"\x89PNG\r\n\x1a\nnot a png", "corrupt_image", ""),
    ]:
        with pytest.raises(BadSample) as err:
            process(raw(payload))
        assert err.value.reason == reason and detail in str(err.value)
    assert process(raw(_save(_pixels((64, 128), 0, "CMYK"), "JPEG"), "jpg"))["image_size"] == (
        64,
        128,
    )


def test_pad_path_reads_16_bit_images_and_keeps_the_stored_orientation() -> None:
    """`pad` (LLaVA-1.5): a 16-bit image reads as its top 8 bits (PIL alone makes it white);
    EXIF orientation is NOT applied, as LLaVA-1.5 and transformers' CLIP processor read files."""
    transform = ImageTransform(TILE, MEAN, STD)
    process = SampleProcessor(_text_encoder(FixedImageTokens(16)), transform)

    def raw(payload: bytes, ext: str) -> dict[str, Any]:
        record = _record("x", f"x.{ext}")
        return {"__key__": "x", "json": json.dumps(record).encode(), ext: payload}

    png, eight_bit = _sixteen_bit((128, 64))
    sample = process(raw(png, "png"))
    assert torch.equal(sample["pixel_values"], transform(eight_bit))
    assert float(sample["pixel_values"].std()) > 0.1  # not one flat (white) colour
    rotated = _exif_rotated_jpeg((96, 48))
    sample = process(raw(rotated, "jpg"))
    with Image.open(io.BytesIO(rotated)) as stored:
        assert torch.equal(sample["pixel_values"], transform(stored))
    assert sample["image_size"] == (96, 48)


def test_validator_counts_anyres_tokens_from_the_decoded_size(
    bad_input: tuple[Path, Path, int],
) -> None:
    """`vlmlab shards` validation decodes as the loader does, so its token counts (manifest
    lengths) and rejects are the loader's: the rotated image counts as 48x96, not 96x48."""
    _, images, max_length = bad_input
    counter = AnyResTokens(BIG, TILE, SIDE)
    validator = Validator.create(images, image_tokens=counter, max_length=max_length)
    results = {}
    for i, name in enumerate(sorted(p.name for p in images.iterdir())):
        results[Path(name).stem] = validator(Entry(i, _record(Path(name).stem, name)))
    rejected = {k: r.reason for k, r in results.items() if isinstance(r, Rejected)}
    assert rejected == SKIPPED
    rotated = results["rotated"]
    assert isinstance(rotated, Accepted)
    fixed = _text_encoder(FixedImageTokens(1)).encode(_record("r", "r.jpg")["conversations"], True)
    assert rotated.num_tokens == len(fixed["input_ids"]) - 1 + counter((48, 96)).count
    assert counter((48, 96)).count != counter((96, 48)).count


# --------------------------------------------------------------------------- presized shards


def test_anyres_refuses_presized_shards(
    mixed_shards: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Shards written with `--presize` hold every image squared to one tile: AnyRes would tile
    that square, silently. The DataModule refuses, naming encoder.image and the fix."""
    shard_dir, _, _ = mixed_shards
    presized = tmp_path / "presized"
    presized.mkdir()
    for tar in shard_dir.glob("*.tar"):
        (presized / tar.name).write_bytes(tar.read_bytes())
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["converter"] = {"args": {"presize": {"encoder": "tiny", "size": TILE}}}
    (presized / MANIFEST).write_text(json.dumps(manifest))
    counter, processor = _anyres()
    with pytest.raises(ConfigError) as err:
        _datamodule(presized, _text_encoder(counter), processor).train_dataloader()
    assert "encoder.image" in str(err.value) and "--presize" in str(err.value)
    # the same shards still train with `pad` (what they were written for)
    pad = ImageTransform(TILE, MEAN, STD)
    assert next(iter(_datamodule(presized, _text_encoder(16), pad).train_dataloader()))["ids"]


def test_shards_presize_refuses_an_anyres_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmlab shards --presize` with an encoder preset whose `image` is anyres: exit 2 with a
    message naming --presize and encoder.image; no shard is written."""
    from vlmlab import config
    from vlmlab.data import convert

    conf = tmp_path / "conf"
    (conf / "encoder").mkdir(parents=True)
    preset = OmegaConf.load(conf_dir() / "encoder" / "tiny.yaml")
    preset.image = "anyres"
    OmegaConf.save(preset, conf / "encoder" / "tiny_anyres.yaml")
    monkeypatch.setattr(config, "conf_dir", lambda: conf)
    images = tmp_path / "images"
    images.mkdir()
    _pixels((64, 32), 0).save(images / "a.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_record("a", "a.png")]))
    out = tmp_path / "out"
    argv = [str(data), "--image-root", str(images), "--out", str(out), "--presize", "tiny_anyres"]
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert "--presize" in err and "encoder.image" in err and "anyres" in err
    assert not list(out.glob("*.tar"))


def test_anyres_parts_survive_pickling_into_workers() -> None:
    """Workers get the processor by pickle: the copy tiles and counts the same."""
    import pickle

    counter, processor = _anyres()
    process = SampleProcessor(_text_encoder(counter), processor)
    copy = pickle.loads(pickle.dumps(process))
    image = _pixels((200, 150), 0)
    assert copy.anyres and torch.equal(copy.image_processor(image), processor(image))
    assert copy.text_encoder.tokens_for((200, 150)) == counter((200, 150))


def test_the_tiny_models_anyres_parts_take_these_batches(
    compose_cfg: Any, mixed_shards: tuple[Path, Path, dict[str, Any]]
) -> None:
    """The contract with the model side: `python train.py encoder=tiny encoder.image=anyres`
    builds exactly the counter and processor these tests use, and a collated batch of mixed
    shapes (tiles concatenated, `image_sizes`) goes through its forward to a finite loss."""
    from vlmlab.models import build_vlm

    cfg = compose_cfg("encoder=tiny", "encoder.image=anyres")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    counter, processor = _anyres()
    assert model.image_token_counter() == counter and model.image_processor == processor
    shard_dir, _, _ = mixed_shards
    text = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 512)
    loader = _datamodule(shard_dir, text, model.image_processor, batch_size=8).train_dataloader()
    batch = max(loader, key=lambda b: len(b["image_sizes"]))
    assert len(set(batch["image_tokens"])) > 1  # images of different counts in one batch
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_shards_anyres_counts_each_image_by_its_decoded_size(
    bad_input: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vlmlab shards --anyres tiny`: the preset's counter (the model's, see above) validates,
    so `--max-length`, the rejects and the manifest's token lengths are the loader's."""
    from vlmlab.data import convert

    counter, _ = _anyres()
    assert convert.encoder_anyres_tokens("tiny") == counter
    _, images, _ = bad_input
    names = ["good_a.png", "rotated.jpg", "cmyk.jpg", "panorama.png", "tiny.png", "huge.png"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_record(Path(n).stem, n) for n in names]))
    text = _text_encoder(counter)
    lengths = {  # rotated.jpg is 96x48 on disk, 48x96 as decoded
        stem: len(text.encode(_record(stem, "x")["conversations"], True, size)["input_ids"])
        for stem, size in (("good_a", (128, 64)), ("rotated", (48, 96)), ("cmyk", (64, 128)))
    }
    huge = len(text.encode(_record("huge", "x")["conversations"], True, (600, 600))["input_ids"])
    limit = max(lengths.values())
    assert huge > limit
    out = tmp_path / "out"
    base = [str(data), "--image-root", str(images), "--out", str(out)]
    assert convert.main([*base, "--anyres", "tiny", "--max-length", str(limit)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["rejected"] == {"too_long": 1, "unusable_image": 2}
    histogram = manifest["token_lengths"]
    assert (histogram["min"], histogram["max"]) == (min(lengths.values()), limit)
    assert manifest["converter"]["args"]["image_tokens"] == "anyres:tiny"
    capsys.readouterr()
    assert convert.main([*base, "--anyres", "tiny", "--presize", "tiny"]) == 2
    assert "--presize" in capsys.readouterr().err
