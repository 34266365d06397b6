"""Data pipeline on real files: shapes generator, tar shards, streaming DataModule, collate."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import DictConfig
from PIL import Image

from vlmlab.data.datamodule import (
    SampleProcessor,
    ShardStream,
    VLMDataModule,
    _Collator,
    collate,
)
from vlmlab.data.mixture import Mixture, Source
from vlmlab.data.prepare import ensure_shapes, resolve_dataset
from vlmlab.data.shapes import COLOURS, POSITIONS, ShapesSpec, generate
from vlmlab.data.shards import MANIFEST, read_manifest, write_shards
from vlmlab.data.tokenize import TextEncoder
from vlmlab.schema import DataConfig, typed
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.templates import get_template

SPEC = ShapesSpec(num_images=20, num_heldout=4, image_size=32, seed=3)
SETS = ("align", "instruct", "text", "heldout")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_tar(url: str) -> list[dict[str, Any]]:
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
    return list(pipeline)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("shapes")
    paths = generate(SPEC, out)
    return out, {name: json.loads(paths[name].read_text()) for name in SETS}


def _text_encoder(model: Any, tokenizer: Any, template: str = "vicuna_v1") -> TextEncoder:
    return TextEncoder(
        tokenizer,
        get_template(template, tokenizer.eos_token),
        model.image_token_counter(),
        model.image_token_id,
        256,
    )


def _datamodule(
    shard_dir: Path, tiny_model: tuple, num_workers: int = 0, batch_size: int = 8, seed: int = 0
) -> VLMDataModule:
    model, tokenizer = tiny_model
    return VLMDataModule(
        shard_dir,
        _text_encoder(model, tokenizer),
        model.image_processor,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=16,
        seed=seed,
    )


def _epoch_ids(loader: Any) -> list[str]:
    return [sample_id for batch in loader for sample_id in batch["ids"]]


# --------------------------------------------------------------------------- shapes generator


def test_generator_is_deterministic_per_seed(tmp_path: Path) -> None:
    generate(SPEC, tmp_path / "a")
    generate(SPEC, tmp_path / "b")
    generate(ShapesSpec(num_images=20, num_heldout=4, image_size=32, seed=4), tmp_path / "c")
    first, second, other = (_files(tmp_path / d) for d in "abc")

    assert {f"{name}.json" for name in SETS} <= set(first)
    assert sum(1 for name in first if name.startswith("images/")) == 24
    assert first == second  # byte-identical JSON and PNGs
    assert set(other) == set(first)
    assert other["instruct.json"] != first["instruct.json"]
    differing = [n for n in first if n.startswith("images/") and first[n] != other[n]]
    assert len(differing) > 12


def test_generated_records_are_valid_llava(shapes: tuple[Path, dict[str, list[dict]]]) -> None:
    root, sets = shapes
    assert [len(sets[name]) for name in SETS] == [20, 20, 20, 4]
    all_ids = [r["id"] for name in SETS for r in sets[name]]
    assert len(all_ids) == len(set(all_ids))
    for name in ("align", "instruct", "text"):
        for record in sets[name]:
            conv = record["conversations"]
            assert conv and len(conv) % 2 == 0, record
            assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert all(isinstance(m["value"], str) and m["value"].strip() for m in conv)
            tags = [m["value"].count("<image>") for m in conv]
            if name == "text":
                assert "image" not in record
                assert sum(tags) == 0
            else:
                assert (root / "images" / record["image"]).is_file()
                assert tags == [1] + [0] * (len(conv) - 1)
                assert conv[0]["value"].startswith("<image>\n")
    for record in sets["heldout"]:
        assert (root / "images" / record["image"]).is_file()
        assert record["answer"] in COLOURS and record["position"] in POSITIONS


def test_heldout_answer_is_the_drawn_colour(shapes: tuple[Path, dict[str, list[dict]]]) -> None:
    root, sets = shapes
    for record in sets["heldout"]:
        with Image.open(root / "images" / record["image"]) as image:
            assert image.size == (SPEC.image_size, SPEC.image_size)
            pixels = np.asarray(image.convert("RGB"), dtype=int)
        fx, fy = POSITIONS[record["position"]]
        pixel = pixels[int(fy * SPEC.image_size), int(fx * SPEC.image_size)]
        assert np.abs(pixel - np.array(COLOURS[record["answer"]])).max() <= 20, (record, pixel)
        nearest = min(COLOURS, key=lambda c: np.abs(pixel - np.array(COLOURS[c])).sum())
        assert nearest == record["answer"]


# --------------------------------------------------------------------------- shards


def _mixed_records(sets: dict[str, list[dict]], n: int) -> list[dict]:
    records = []
    for with_image, text_only in zip(sets["instruct"][:n], sets["text"][:n]):
        records += [with_image, text_only]
    return records


def test_shard_round_trip_and_manifest(
    shapes: tuple[Path, dict[str, list[dict]]], tmp_path: Path
) -> None:
    root, sets = shapes
    records = _mixed_records(sets, 10)[:17]  # 9 with an image, 8 text-only
    manifest = write_shards(records, root / "images", tmp_path / "shards", samples_per_shard=7)

    assert manifest["num_samples"] == 17
    assert (manifest["num_with_image"], manifest["num_text_only"]) == (9, 8)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [s["num_samples"] for s in manifest["shards"]] == [7, 7, 3]
    assert read_manifest(tmp_path / "shards") == manifest

    got = []
    for shard in manifest["shards"]:
        path = tmp_path / "shards" / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        samples = _read_tar(str(path))
        assert len(samples) == shard["num_samples"]
        got += samples
    assert [json.loads(s["json"]) for s in got] == records
    assert [s["__key__"] for s in got] == [r["id"] for r in records]
    for sample, record in zip(got, records):
        if "image" in record:
            assert sample["png"] == (root / "images" / record["image"]).read_bytes()
        else:
            assert not {"png", "jpg", "jpeg", "webp"} & set(sample)


def test_write_shards_is_byte_identical(
    shapes: tuple[Path, dict[str, list[dict]]], tmp_path: Path
) -> None:
    root, sets = shapes
    records = _mixed_records(sets, 8)
    write_shards(records, root / "images", tmp_path / "a", samples_per_shard=7)
    write_shards(records, root / "images", tmp_path / "b", samples_per_shard=7)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(first) == [MANIFEST] + [f"shard-{i:06d}.tar" for i in range(3)]
    assert first == second
    # and the content matters: other records give other bytes
    write_shards(records[::-1], root / "images", tmp_path / "c", samples_per_shard=7)
    assert _files(tmp_path / "c")[MANIFEST] != first[MANIFEST]


# --------------------------------------------------------------------------- DataModule / stream


@pytest.fixture
def instruct_shards(compose_cfg: Callable[..., DictConfig]) -> tuple[Path, list[str]]:
    cfg = compose_cfg()
    root = ensure_shapes(typed(cfg.data, DataConfig))
    shard_dir = resolve_dataset(typed(cfg.data, DataConfig), "instruct")["shard_dir"]
    ids = [r["id"] for r in json.loads((root / "instruct.json").read_text())]
    return shard_dir, ids


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_yields_every_sample_once(
    instruct_shards: tuple[Path, list[str]], tiny_model: tuple, num_workers: int
) -> None:
    shard_dir, expected = instruct_shards
    assert len(read_manifest(shard_dir)["shards"]) == 3
    dm = _datamodule(shard_dir, tiny_model, num_workers=num_workers)
    ids = _epoch_ids(dm.train_dataloader())
    assert len(expected) == 48
    assert Counter(ids) == Counter(expected)


def test_epochs_reshuffle_the_same_set(
    instruct_shards: tuple[Path, list[str]], tiny_model: tuple
) -> None:
    shard_dir, expected = instruct_shards
    dm = _datamodule(shard_dir, tiny_model)
    loader = dm.train_dataloader()
    dm.set_epoch(0)
    epoch0 = _epoch_ids(loader)
    dm.set_epoch(1)
    epoch1 = _epoch_ids(loader)
    dm.set_epoch(0)
    again = _epoch_ids(loader)
    assert sorted(epoch0) == sorted(epoch1) == sorted(expected)
    assert epoch0 != epoch1
    assert again == epoch0  # the order is a function of (seed, epoch)
    assert epoch0 != sorted(epoch0)  # and it is actually shuffled


def test_batches_have_consistent_shapes(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple, tmp_path: Path
) -> None:
    root, sets = shapes
    records = _mixed_records(sets, 12)
    write_shards(records, root / "images", tmp_path, samples_per_shard=8)
    model, _ = tiny_model
    dm = _datamodule(tmp_path, tiny_model, batch_size=5)
    seen, images_seen = [], 0
    size = model.encoder.image_size
    for batch in dm.train_dataloader():
        n = len(batch["ids"])
        shape = batch["input_ids"].shape
        assert shape[0] == n
        assert batch["labels"].shape == shape and batch["attention_mask"].shape == shape
        num_images = sum(1 for i in batch["ids"] if i.startswith("instruct"))
        if num_images:
            assert batch["pixel_values"].shape == (num_images, 3, size, size)
            assert batch["image_sizes"] == [(SPEC.image_size, SPEC.image_size)] * num_images
        else:
            assert batch["pixel_values"] is None
        image_slots = int((batch["input_ids"] == model.image_token_id).sum())
        assert image_slots == num_images * model.num_image_tokens
        assert batch["skipped"] == {}
        images_seen += num_images
        seen += batch["ids"]
    assert Counter(seen) == Counter(r["id"] for r in records)
    assert images_seen == 12


def _rank_loaders(
    shard_dir: Path, tiny_model: tuple, world_size: int, batch_size: int = 8, num_workers: int = 0
) -> list[torch.utils.data.DataLoader]:
    """What `train_dataloader` builds on each rank of a `world_size` run (seed 0, epoch 0)."""
    model, tokenizer = tiny_model
    process = SampleProcessor(_text_encoder(model, tokenizer), model.image_processor)
    return [
        torch.utils.data.DataLoader(
            ShardStream(
                Mixture([Source("instruct", shard_dir)], seed=0),
                process,
                batch_size=batch_size,
                seed=0,
                shuffle=True,
                shuffle_buffer=16,
                rank=rank,
                world_size=world_size,
            ),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_Collator(tokenizer.pad_token_id),
        )
        for rank in range(world_size)
    ]


def test_ranks_partition_the_samples(
    instruct_shards: tuple[Path, list[str]], tiny_model: tuple
) -> None:
    shard_dir, expected = instruct_shards
    per_rank = [_epoch_ids(loader) for loader in _rank_loaders(shard_dir, tiny_model, 2)]
    assert all(per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(expected)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1  # samples, not whole shards


@pytest.mark.parametrize(("world_size", "num_workers", "batch_size"), [(2, 0, 8), (1, 2, 5)])
def test_batches_per_epoch_is_exact(
    instruct_shards: tuple[Path, list[str]],
    tiny_model: tuple,
    world_size: int,
    num_workers: int,
    batch_size: int,
) -> None:
    shard_dir, _ = instruct_shards  # 48 samples in 3 shards of 16
    dm = _datamodule(shard_dir, tiny_model, num_workers=num_workers, batch_size=batch_size)
    if world_size == 1:
        seen = [len(list(dm.train_dataloader()))]
    else:
        seen = [
            len(list(loader))
            for loader in _rank_loaders(shard_dir, tiny_model, world_size, batch_size)
        ]
    # the LR schedule is sized from this number: every rank yields exactly that many
    assert seen == [dm.batches_per_epoch(world_size)] * world_size
    assert seen[0] == -(-48 // world_size // batch_size)


@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 8), (3, 5), (2, 7)])
def test_ranks_see_the_same_number_of_batches(
    instruct_shards: tuple[Path, list[str]], tiny_model: tuple, world_size: int, batch_size: int
) -> None:
    shard_dir, _ = instruct_shards
    loaders = _rank_loaders(shard_dir, tiny_model, world_size, batch_size)
    seen = [[len(b["ids"]) for b in loader] for loader in loaders]
    assert len({len(sizes) for sizes in seen}) == 1, seen
    assert all(min(sizes) > 0 for sizes in seen), seen  # no rank pads with an empty batch
    assert sum(map(sum, seen)) == 48


# --------------------------------------------------------------------------- bad samples


def _conv(question: str, answer: str = "red") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _bad_records(image: str) -> dict[str, dict]:
    """One record per skip reason (keyed by the reason); `corrupt.png` holds garbage bytes."""
    return {
        "missing_image": {
            "id": "bad_missing",
            "image": "nowhere.png",
            "conversations": _conv("<image>\nWhat colour is the shape?"),
        },
        "corrupt_image": {
            "id": "bad_corrupt",
            "image": "corrupt.png",
            "conversations": _conv("<image>\nWhat colour is the shape?"),
        },
        "wrong_role_order": {
            "id": "bad_roles",
            "image": image,
            "conversations": [
                {"from": "gpt", "value": "<image>\nred"},
                {"from": "human", "value": "What colour?"},
            ],
        },
        "empty_conversation": {"id": "bad_empty", "image": image, "conversations": []},
        "image_token_count": {
            "id": "bad_tags",
            "image": image,
            "conversations": _conv("What colour is the shape?"),
        },
    }


@pytest.fixture
def bad_image_root(shapes: tuple[Path, dict[str, list[dict]]], tmp_path: Path) -> Path:
    root, _ = shapes
    image_root = tmp_path / "images"
    image_root.mkdir()
    for path in (root / "images").iterdir():
        (image_root / path.name).write_bytes(path.read_bytes())
    (image_root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return image_root


def _skipped(loader: Any) -> tuple[list[str], Counter[str]]:
    ids, skipped = [], Counter()
    for batch in loader:
        ids += batch["ids"]
        skipped.update(batch["skipped"])
    return ids, skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(
    shapes: tuple[Path, dict[str, list[dict]]],
    bad_image_root: Path,
    tiny_model: tuple,
    tmp_path: Path,
    num_workers: int,
) -> None:
    _, sets = shapes
    good = sets["instruct"][:3] + sets["text"][:2]
    bad = _bad_records(good[0]["image"])
    # two shards of 5; bad samples in the middle and at the end of each shard
    records = [
        good[0],
        bad["missing_image"],
        good[1],
        bad["corrupt_image"],
        bad["wrong_role_order"],
        good[2],
        good[3],
        bad["empty_conversation"],
        good[4],
        bad["image_token_count"],
    ]
    write_shards(records, bad_image_root, tmp_path / "shards", samples_per_shard=5)
    dm = _datamodule(tmp_path / "shards", tiny_model, num_workers=num_workers, batch_size=3)

    ids, skipped = _skipped(dm.train_dataloader())
    assert Counter(ids) == Counter(r["id"] for r in good)
    assert dict(skipped) == dict.fromkeys(bad, 1)


def test_skips_at_the_end_of_a_shard_are_reported(
    shapes: tuple[Path, dict[str, list[dict]]],
    bad_image_root: Path,
    tiny_model: tuple,
    tmp_path: Path,
) -> None:
    _, sets = shapes
    bad = _bad_records(sets["instruct"][0]["image"])
    model, tokenizer = tiny_model
    process = SampleProcessor(_text_encoder(model, tokenizer), model.image_processor)
    # one shard whose last samples are bad, one shard with nothing but bad samples
    tail = [*sets["instruct"][:2], bad["missing_image"], bad["corrupt_image"]]
    write_shards(tail, bad_image_root, tmp_path / "tail", samples_per_shard=10)
    only_bad = [bad["wrong_role_order"], bad["empty_conversation"]]
    write_shards(only_bad, bad_image_root, tmp_path / "only_bad", samples_per_shard=10)

    for shuffle in (False, True):
        stream = ShardStream(
            Mixture([Source("tail", tmp_path / "tail")], seed=0),
            process,
            batch_size=3,
            seed=0,
            shuffle=shuffle,
            shuffle_buffer=4,
        )
        samples = _flat(stream)
        good_ids = [s["id"] for s in samples if not s.get("empty")]
        assert sorted(good_ids) == sorted(r["id"] for r in tail[:2])
        total = sum((Counter(s.get("skipped", {})) for s in samples), Counter())
        assert total == {"missing_image": 1, "corrupt_image": 1}

    dm = _datamodule(tmp_path / "only_bad", tiny_model)
    batches = list(dm.train_dataloader())
    assert sum(len(b["ids"]) for b in batches) == 0
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == {
        "wrong_role_order": 1,
        "empty_conversation": 1,
    }
    assert all(b["input_ids"].shape[0] == 0 for b in batches)
    assert len(batches) == dm.batches_per_epoch(1) == 1  # the planned batch, empty, still comes


def _flat(stream: ShardStream) -> list[dict[str, Any]]:
    """Every sample (and skip marker) the stream yields, batches concatenated."""
    return [sample for batch in stream for sample in batch]


def test_hand_made_tar_with_garbage_image_is_skipped(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple, tmp_path: Path
) -> None:
    root, sets = shapes
    good = sets["instruct"][0]
    corrupt = {**sets["instruct"][1], "id": "garbage"}
    shard = tmp_path / "hand.tar"
    with tarfile.open(shard, "w") as tar:
        for key, record, payload in (
            (corrupt["id"], corrupt, b"\x00garbage\xff" * 50),
            (good["id"], good, (root / "images" / good["image"]).read_bytes()),
        ):
            for name, data in (
                (f"{key}.json", json.dumps(record).encode()),
                (f"{key}.png", payload),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    model, tokenizer = tiny_model
    process = SampleProcessor(_text_encoder(model, tokenizer), model.image_processor)
    # no manifest: the sample counts come from scanning the tar
    stream = ShardStream(
        Mixture([Source("hand", tmp_path)], seed=0), process, 4, shuffle=False, shuffle_buffer=1
    )
    (batch,) = list(stream)
    samples = [s for s in batch if not s.get("empty")]
    assert [s["id"] for s in samples] == [good["id"]]
    assert batch[-1]["skipped"] == {"corrupt_image": 1}
    assert samples[0]["pixel_values"].shape == (3, 64, 64)


def test_plain_template_skips_multi_turn_samples(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple, tmp_path: Path
) -> None:
    root, sets = shapes
    multi = next(r for r in sets["instruct"] if len(r["conversations"]) > 2)
    good = sets["align"][:2]
    write_shards([good[0], multi, good[1]], root / "images", tmp_path, samples_per_shard=10)
    model, tokenizer = tiny_model
    process = SampleProcessor(
        _text_encoder(model, tokenizer, template="plain"), model.image_processor
    )
    stream = ShardStream(
        Mixture([Source("align", tmp_path)], seed=0), process, 8, shuffle=False, shuffle_buffer=1
    )
    samples = _flat(stream)  # a stage-1 run on multi-turn data must skip, never crash
    assert [s["id"] for s in samples if not s.get("empty")] == [r["id"] for r in good]
    assert sum(sum(s.get("skipped", {}).values()) for s in samples) == 1


# --------------------------------------------------------------------------- collate


def test_collate_pads_right_with_masks() -> None:
    pad = 3
    samples = [
        {
            "id": "a",
            "input_ids": torch.tensor([5, 6, 7, 8]),
            "labels": torch.tensor([-100, 6, 7, 8]),
            "pixel_values": None,
            "skipped": {},
        },
        {
            "id": "b",
            "input_ids": torch.tensor([9, 10]),
            "labels": torch.tensor([-100, 10]),
            "pixel_values": torch.ones(3, 4, 4),
            "skipped": {"corrupt_image": 1},
        },
        {"skipped": {"corrupt_image": 2, "missing_image": 1}, "empty": True},
    ]
    batch = collate(samples, pad_token_id=pad)
    assert batch["ids"] == ["a", "b"]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8], [-100, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4)
    assert batch["skipped"] == {"corrupt_image": 3, "missing_image": 1}


def test_collate_real_samples(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple
) -> None:
    root, sets = shapes
    model, tokenizer = tiny_model
    process = SampleProcessor(_text_encoder(model, tokenizer), model.image_processor)
    raws = [
        {
            "__key__": r["id"],
            "json": json.dumps(r).encode(),
            **({"png": (root / "images" / r["image"]).read_bytes()} if "image" in r else {}),
        }
        for r in (sets["text"][0], sets["instruct"][0], sets["instruct"][1])
    ]
    samples = [process(raw) for raw in raws]
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1  # padding actually happens
    batch = collate(samples, tokenizer.pad_token_id)
    width = max(lengths)
    assert batch["input_ids"].shape == (3, width)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], sample["input_ids"])
        assert torch.equal(batch["labels"][row, :n], sample["labels"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert torch.equal(batch["pixel_values"][0], samples[1]["pixel_values"])
