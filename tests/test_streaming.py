"""Streaming at scale on real shards: exactly once with equal batches per rank, mixtures,
length grouping, bad samples through a real Lightning fit, and a 2-process DDP fit (slow)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import DictConfig

from tests.streaming_ddp import run_script
from vlmlab import checkpoints
from vlmlab.data.datamodule import SampleProcessor, ShardStream, VLMDataModule, _Collator
from vlmlab.data.grouping import fit_sizes
from vlmlab.data.mixture import Mixture, Source, largest_remainder
from vlmlab.data.prepare import resolve_dataset
from vlmlab.data.shapes import ShapesSpec, generate
from vlmlab.data.shards import MANIFEST, shard_index, write_shards
from vlmlab.data.split import Piece, batches_per_rank, plan_worker
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.schema import DataConfig, typed
from vlmlab.train import train

SPEC = ShapesSpec(num_images=90, num_heldout=0, image_size=32, seed=11)
UNEVEN = [7, 40, 12, 33, 9, 25, 18, 21]  # 165 samples in 8 shards


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("stream_shapes")
    paths = generate(SPEC, out)
    return out, {n: json.loads(paths[n].read_text()) for n in ("align", "instruct", "text")}


def _mixed(sets: dict[str, list[dict]], n: int) -> list[dict]:
    """n records alternating image (instruct) and text-only, in a fixed shuffled order."""
    records = [r for pair in zip(sets["instruct"], sets["text"]) for r in pair][:n]
    random.Random(0).shuffle(records)
    return records


@pytest.fixture(scope="module")
def uneven(shapes: tuple[Path, dict[str, list[dict]]], tmp_path_factory) -> tuple[Path, list[str]]:
    """8 shards of 7..40 samples, images and text-only mixed."""
    root, sets = shapes
    records = _mixed(sets, sum(UNEVEN))
    out = tmp_path_factory.mktemp("uneven")
    write_shards(records, root / "images", out, shard_sizes=UNEVEN)
    return out, [r["id"] for r in records]


def _process(tiny_model: tuple, max_length: int = 256) -> SampleProcessor:
    model, tokenizer = tiny_model
    encoder = TextEncoder.for_model(model, tokenizer, "vicuna_v1", max_length)
    return SampleProcessor(encoder, model.encoder.image_transform)


def _loaders(
    mixture: Mixture,
    tiny_model: tuple,
    world_size: int,
    num_workers: int = 0,
    batch_size: int = 8,
    **stream: Any,
) -> list[tuple[ShardStream, torch.utils.data.DataLoader]]:
    """The loader each rank of a `world_size` run builds (rank given explicitly, as Lightning does)."""
    out = []
    for rank in range(world_size):
        s = ShardStream(
            mixture,
            _process(tiny_model),
            batch_size=batch_size,
            seed=mixture.seed,
            shuffle_buffer=stream.pop("shuffle_buffer", 16),
            rank=rank,
            world_size=world_size,
            **stream,
        )
        loader = torch.utils.data.DataLoader(
            s,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_Collator(tiny_model[1].pad_token_id),
        )
        out.append((s, loader))
    return out


def _epoch(loaders: list, epoch: int) -> list[list[dict[str, Any]]]:
    """Batches of every rank for one epoch."""
    result = []
    for stream, loader in loaders:
        stream.set_epoch(epoch)
        result.append(list(loader))
    return result


def _ids(batches: list[dict[str, Any]]) -> list[str]:
    return [i for b in batches for i in b["ids"]]


# --------------------------------------------------------------------------- the plan (pure)


@pytest.mark.parametrize("sizes", [[7, 40, 12, 33, 9, 25, 18, 21], [1, 1, 1], [5], [3, 0, 8, 2]])
@pytest.mark.parametrize(
    ("world", "workers", "batch"), [(1, 1, 4), (2, 2, 4), (3, 2, 5), (4, 3, 1)]
)
def test_plan_assigns_every_sample_once_with_equal_batch_counts(
    sizes: list[int], world: int, workers: int, batch: int
) -> None:
    pieces = [Piece(f"s{i}", tuple(range(n))) for i, n in enumerate(sizes) if n]
    total = sum(sizes)
    seen: Counter[tuple[str, int]] = Counter()
    for rank in range(world):
        rank_batches: dict[int, int] = {}
        for worker in range(workers):
            plan = plan_worker(pieces, rank, world, worker, workers, batch)
            assert sum(plan.batch_sizes) == sum(len(p.positions) for p in plan.pieces)
            rank_batches.update(zip(plan.batch_indices, plan.batch_sizes))
            seen.update((p.url, q) for p in plan.pieces for q in p.positions)
        # every rank: the same batch count, batch positions 0..B-1 exactly once, none too big
        assert sorted(rank_batches) == list(range(batches_per_rank(total, world, batch)))
        assert max(rank_batches.values()) <= batch
        if total >= world * (batches_per_rank(total, world, batch) - 1) + world and batch > 1:
            assert min(rank_batches.values()) > 0  # no empty batch where a sample can be spared
    assert seen == Counter((p.url, q) for p in pieces for q in p.positions)


def test_fit_sizes_takes_skips_from_the_largest_batches() -> None:
    assert fit_sizes([8, 8, 8, 3], 27) == [8, 8, 8, 3]
    assert fit_sizes([8, 8, 8, 3], 25) == [7, 7, 8, 3]
    assert fit_sizes([8, 8, 8, 3], 24) == [7, 7, 7, 3]
    assert fit_sizes([4, 4], 0) == [0, 0]
    assert largest_remainder(40, [0.5, 0.3, 0.2]) == [20, 12, 8]
    assert sum(largest_remainder(7, [1, 1, 1])) == 7


# --------------------------------------------------------------------------- real shards


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (3, 2)])
def test_uneven_shards_every_sample_once_and_equal_batches(
    uneven: tuple[Path, list[str]], tiny_model: tuple, world: int, workers: int
) -> None:
    shard_dir, expected = uneven
    mixture = Mixture([Source("uneven", shard_dir)], seed=3)
    loaders = _loaders(mixture, tiny_model, world, num_workers=workers, batch_size=8)
    epochs = [_epoch(loaders, e) for e in (0, 1)]
    for per_rank in epochs:
        all_ids = [i for batches in per_rank for i in _ids(batches)]
        assert sorted(all_ids) == sorted(expected)  # each sample exactly once
        counts = {len(batches) for batches in per_rank}
        assert counts == {batches_per_rank(len(expected), world, 8)}, counts
        assert all(len(b["ids"]) > 0 for batches in per_rank for b in batches)
    first, second = (_ids(epochs[e][0]) for e in (0, 1))
    assert first != second and sorted(_ids(epochs[0][1])) != sorted(_ids(epochs[1][1]))
    # a function of (seed, epoch): the same loaders replay epoch 0 exactly
    assert [_ids(b) for b in _epoch(loaders, 0)] == [_ids(b) for b in epochs[0]]
    other = _loaders(Mixture([Source("uneven", shard_dir)], seed=4), tiny_model, world)
    assert _ids(_epoch(other, 0)[0]) != first


def test_bad_samples_leave_the_batch_count_alone(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple, tmp_path: Path
) -> None:
    """Rank 0's range is mostly bad: its batches shrink or come empty, but it yields as many."""
    root, sets = shapes
    good = sets["instruct"][:10]
    bad = [{**r, "id": f"bad{i}", "image": "nowhere.png"} for i, r in enumerate(sets["align"][:10])]
    write_shards(bad + good, root / "images", tmp_path, shard_sizes=[5, 5, 5, 5])
    mixture = Mixture([Source("s", tmp_path)], seed=0)
    loaders = _loaders(mixture, tiny_model, 2, batch_size=2, shuffle=False)
    per_rank = _epoch(loaders, 0)
    assert [len(b) for b in per_rank] == [5, 5]
    assert [len(b["ids"]) for b in per_rank[0]] == [0, 0, 0, 0, 0]  # every planned batch comes
    assert all(b["input_ids"].shape == (0, 0) for b in per_rank[0])
    assert sorted(_ids(per_rank[1])) == sorted(r["id"] for r in good)
    skipped = sum((Counter(b["skipped"]) for rank in per_rank for b in rank), Counter())
    assert skipped == {"missing_image": 10}


def test_missing_manifest_is_scanned(uneven: tuple[Path, list[str]], tmp_path: Path) -> None:
    shard_dir, _ = uneven
    for tar in shard_dir.glob("*.tar"):
        (tmp_path / tar.name).write_bytes(tar.read_bytes())
    assert not (tmp_path / MANIFEST).exists()
    scanned = [(Path(p).name, n) for p, n in shard_index(tmp_path)]
    assert scanned == [(Path(p).name, n) for p, n in shard_index(shard_dir)]
    assert [n for _, n in scanned] == UNEVEN


def test_fewer_shards_than_slots_names_the_keys(
    uneven: tuple[Path, list[str]], tiny_model: tuple
) -> None:
    model, _ = tiny_model
    dm = VLMDataModule(
        uneven[0],
        _process(tiny_model).text_encoder,
        model.encoder.image_transform,
        batch_size=4,
        num_workers=9,
    )
    with pytest.raises(ConfigError) as err:
        dm.train_dataloader()
    message = str(err.value)
    assert "data.num_workers" in message and "trainer.devices" in message
    assert "8 shards" in message and "at least 9" in message


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_mid_epoch_yields_exactly_the_rest(
    uneven: tuple[Path, list[str]], tiny_model: tuple, group_by_length: bool
) -> None:
    shard_dir, _ = uneven
    mixture = Mixture([Source("uneven", shard_dir)], seed=1)
    kwargs = {"group_by_length": group_by_length, "group_megabatch": 3}
    ((stream, loader),) = _loaders(mixture, tiny_model, 1, num_workers=2, batch_size=8, **kwargs)
    stream.set_epoch(1)
    full = [b["ids"] for b in loader]
    stream.skip_batches = 7
    rest = [b["ids"] for b in loader]
    assert len(full) == batches_per_rank(165, 1, 8) and rest == full[7:]


# --------------------------------------------------------------------------- length grouping


def _modality(sample_id: str) -> str:
    return "text" if sample_id.startswith("text") else "image"


@pytest.mark.parametrize("kind", ["image", "text", "mixed"])
def test_grouping_on_all_image_all_text_and_mixed(
    shapes: tuple[Path, dict[str, list[dict]]], tiny_model: tuple, tmp_path: Path, kind: str
) -> None:
    root, sets = shapes
    records = {
        "image": sets["instruct"][:64],
        "text": sets["text"][:64],
        "mixed": _mixed(sets, 64),
    }[kind]
    write_shards(records, root / "images", tmp_path, samples_per_shard=16)
    mixture = Mixture([Source(kind, tmp_path)], seed=0)
    results = {}
    for grouped in (False, True):
        loaders = _loaders(
            mixture, tiny_model, 2, batch_size=4, group_by_length=grouped, group_megabatch=8
        )
        per_rank = _epoch(loaders, 0)
        assert sorted(i for rank in per_rank for i in _ids(rank)) == sorted(
            r["id"] for r in records
        )
        assert [len(rank) for rank in per_rank] == [8, 8]
        batches = [b for rank in per_rank for b in rank]
        pad = sum(b["num_pad_tokens"] for b in batches) / sum(b["num_tokens"] for b in batches)
        mixed_batches = sum(1 for b in batches if len({_modality(i) for i in b["ids"]}) > 1)
        results[grouped] = (pad, mixed_batches)
        for b in batches:
            lengths = b["attention_mask"].sum(1)
            assert b["num_pad_tokens"] == int((b["attention_mask"] == 0).sum())
            assert b["padding_fraction"] == pytest.approx(
                1 - lengths.sum().item() / b["num_tokens"]
            )
    (pad_plain, _), (pad_grouped, mixed_grouped) = results[False], results[True]
    assert pad_grouped < pad_plain
    if kind == "mixed":
        assert results[False][1] >= 8  # ungrouped batches mix image and text
        assert mixed_grouped <= 2  # grouped: at most one boundary batch per megabatch per rank


# --------------------------------------------------------------------------- mixtures


def _tiny_mix(compose_cfg: Callable[..., DictConfig], *overrides: str) -> DictConfig:
    from vlmlab.data.prepare import ensure_shapes

    cfg = compose_cfg("data=tiny_mix", "stage=2", *overrides)
    ensure_shapes(typed(cfg.data, DataConfig))
    return cfg


def _mixture_ids(cfg: DictConfig, tiny_model: tuple, seed: int, epoch: int = 0) -> list[str]:
    sources = resolve_dataset(typed(cfg.data, DataConfig), "instruct")["sources"]
    mixture = Mixture(sources, seed=seed, total=cfg.data.mixture_size)
    ((stream, loader),) = _loaders(mixture, tiny_model, 1, batch_size=8)
    stream.set_epoch(epoch)
    return _ids(list(loader))


def _source(sample_id: str) -> str:
    return {"instruct": "vqa", "align": "captions", "text": "text"}[sample_id.rstrip("0123456789")]


def test_mixture_weights_are_realised_and_replayable(
    compose_cfg: Callable[..., DictConfig], tiny_model: tuple
) -> None:
    cfg = _tiny_mix(compose_cfg, "data.mixture_size=60")
    ids = _mixture_ids(cfg, tiny_model, seed=0)
    assert len(ids) == len(set(ids)) == 60  # no sample twice while a source has enough
    realised = Counter(map(_source, ids))
    assert realised == {"vqa": 30, "captions": 18, "text": 12}
    # the first half already follows the weights (shard order + buffer mixes the sources)
    half = Counter(map(_source, ids[:30]))
    for name, weight in (("vqa", 0.5), ("captions", 0.3), ("text", 0.2)):
        assert abs(half[name] / 30 - weight) <= 0.25, half
    assert _mixture_ids(cfg, tiny_model, seed=0) == ids  # same seed, same sequence
    assert _mixture_ids(cfg, tiny_model, seed=1) != ids
    assert set(_mixture_ids(cfg, tiny_model, seed=0, epoch=1)) != set(ids)  # new subsets


def test_mixture_fixed_counts_are_exact_and_repeat_when_larger(
    compose_cfg: Callable[..., DictConfig], tiny_model: tuple
) -> None:
    cfg = _tiny_mix(
        compose_cfg,
        "data.mixtures.instruct=[{name: vqa, set: instruct, count: 5}, "
        "{name: text, set: text, count: 100}, {name: captions, set: align}]",
    )
    ids = _mixture_ids(cfg, tiny_model, seed=0)
    assert Counter(map(_source, ids)) == {"vqa": 5, "text": 100, "captions": 48}
    text = Counter(i for i in ids if i.startswith("text"))
    assert len(text) == 48 and sorted(set(text.values())) == [2, 3]  # 2 passes + 4 extra


def test_mixture_config_errors_name_the_entry(compose_cfg: Callable[..., DictConfig]) -> None:
    for entries, key in (
        ("[{set: instruct, weight: 1, count: 3}]", "data.mixtures.instruct[0]:"),
        ("[{set: nope}]", "data.mixtures.instruct:"),
        ("[{name: a, path: /x}, {name: a, path: /y}]", "data.mixtures.instruct:"),
        ("[{set: instruct, weight: -1}]", "data.mixtures.instruct[0].weight:"),
        ("[{set: instruct, path: /x}]", "data.mixtures.instruct[0]:"),
    ):
        cfg = compose_cfg("data=tiny_mix", f"data.mixtures.instruct={entries}")
        with pytest.raises(ConfigError) as err:
            resolve_dataset(typed(cfg.data, DataConfig), "instruct")
        assert str(err.value).startswith(key), err.value
    with pytest.raises(ConfigError, match=r"data.mixtures.instruct\[0\]"):
        Mixture([Source("gone", Path("/nonexistent"), key="data.mixtures.instruct[0]")], 0).counts()


# --------------------------------------------------------------------------- acceptance: bad samples


def _bad_shard(root: Path, sets: dict[str, list[dict]], out: Path) -> list[str]:
    """One sample of each defect among good ones, in one shard; returns the good ids."""
    image = sets["instruct"][0]["image"]
    q = "What colour is the shape?"

    def conv(question: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]

    images = out / "images"
    images.mkdir(parents=True)
    for path in (root / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    bad = [
        {"id": "b_missing", "image": "nowhere.png", "conversations": conv(f"<image>\n{q}")},
        {"id": "b_corrupt", "image": "corrupt.png", "conversations": conv(f"<image>\n{q}")},
        {"id": "b_count", "image": image, "conversations": conv(q)},
        {"id": "b_empty", "image": image, "conversations": []},
        {"id": "b_roles", "image": image, "conversations": conv(f"<image>\n{q}")[::-1]},
        # LLaVA's placement (vicuna_v1: `front`) moves the tag first; the reply is cut off
        {"id": "b_long", "image": image, "conversations": conv("red " * 300 + "<image>")},
    ]
    good = sets["instruct"][1:13] + sets["text"][:12]
    records = good[:12] + bad + good[12:]
    write_shards(records, images, out / "shards", samples_per_shard=len(records))
    return [r["id"] for r in good]


def test_bad_samples_train_to_the_end_and_reach_mlflow(
    compose_cfg: Callable[..., DictConfig],
    shapes: tuple[Path, dict[str, list[dict]]],
    tmp_path: Path,
) -> None:
    root, sets = shapes
    _bad_shard(root, sets, tmp_path / "bad")
    cfg = compose_cfg(
        "stage=2",
        "stage.init_from=null",
        "stage.evaluate=false",
        "data.batch_size=4",
        "stage.global_batch_size=4",
        f"data.mixtures={{instruct: [{{name: bad, path: '{tmp_path / 'bad' / 'shards'}'}}]}}",
    )
    result = train(cfg)
    assert result["complete"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    assert run.info.status == "FINISHED"
    skipped = {
        k.removeprefix("data/skipped/"): v
        for k, v in run.data.metrics.items()
        if k.startswith("data/skipped/")
    }
    assert skipped == {
        "missing_image": 1,
        "corrupt_image": 1,
        "image_token_count": 1,
        "empty_conversation": 1,
        "wrong_role_order": 1,
        "no_targets": 1,
    }
    # instruct and text-only samples share batches: some padding, never all of it
    assert 0.0 < run.data.metrics["data/padding_fraction"] < 1.0
    # 30 samples / batch 4 = 8 planned batches; only an all-bad batch (skipped) costs a step
    steps = checkpoints.read_meta(Path(result["checkpoint"])).global_step
    assert 7 <= steps <= 8


# --------------------------------------------------------------------------- acceptance: DDP


@pytest.mark.slow
def test_two_rank_ddp_fit_sees_every_sample_once_per_epoch(
    shapes: tuple[Path, dict[str, list[dict]]], tmp_path: Path
) -> None:
    """A real Lightning fit, strategy=ddp, 2 CPU ranks x 2 workers, 8 uneven shards, 2 epochs.

    One shard holds only bad samples, so some batch comes out empty on one rank while the
    other trains: the ranks must still agree on the number of steps.
    """
    root, sets = shapes
    good = _mixed(sets, sum(UNEVEN) - 12)
    bad = [{**r, "id": f"bad{i}", "image": "gone.png"} for i, r in enumerate(sets["align"][:12])]
    records = good[:19] + bad + good[19:]  # shard 2 (12 samples) is the bad one
    shard_dir = tmp_path / "shards"
    write_shards(records, root / "images", shard_dir, shard_sizes=UNEVEN)
    expected = [r["id"] for r in good]
    proc = run_script("tests/streaming_ddp.py", str(shard_dir), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    planned = batches_per_rank(len(records), 2, 4)
    for epoch in ("0", "1"):
        seen = [rank[epoch]["ids"] for rank in ranks]
        assert Counter(seen[0] + seen[1]) == Counter(expected)  # union = dataset, no duplicate
        assert [rank[epoch]["batches"] for rank in ranks] == [planned, planned]
    # the hard cases did happen (deterministic for this seed)
    assert sum(rank[e]["empty"] for rank in ranks for e in ("0", "1")) > 0
    assert sum(rank[e]["text_only"] for rank in ranks for e in ("0", "1")) > 0
    assert ranks[0]["0"]["ids"] != ranks[0]["1"]["ids"]  # epoch 2 order differs
    assert all(rank["finished_epochs"] == 2 for rank in ranks)
