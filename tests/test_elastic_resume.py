"""Elastic resume: an epoch stopped at one world size / worker count goes on at another with
every untrained sample exactly once and no batch replayed (issue 17.1).

Fast: real shards read by real ShardStreams in DataLoader worker processes, cut at k batches
under one layout, the rest planned by `split.consumed` for another. Slow: train.py stopped at 2
DDP ranks resumes at 1 (and 1 -> 2); the sample ids trained over the epoch are the dataset once.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_scale import run_train, run_until_killed
from vlmlab.data.datamodule import ShardStream
from vlmlab.data.mixture import Mixture, Source
from vlmlab.data.shapes import ShapesSpec, generate
from vlmlab.data.shards import write_shards
from vlmlab.data.split import Layout, consumed

SIZES = [10, 7, 13, 10, 9, 11]  # 60 samples, 6 shards


def _key(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's id only: what was read is the point, not its tensors (picklable)."""
    return {"id": json.loads(raw["json"])["id"]}


def _ids(samples: list[dict[str, Any]]) -> list[str]:
    return [s["id"] for s in samples if not s.get("empty")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("elastic")
    paths = generate(ShapesSpec(num_images=sum(SIZES), num_heldout=0, image_size=16, seed=3), out)
    records = json.loads(paths["instruct"].read_text())[: sum(SIZES)]
    write_shards(records, out / "images", out / "shards", shard_sizes=SIZES)
    return out / "shards", [r["id"] for r in records]


def _read(
    mixture: Mixture, layout: Layout, batches: int | None, remaining: list[int] | None
) -> list[str]:
    """Ids the ranks of `layout` train in their first `batches` batches (None: all)."""
    ids: list[str] = []
    for rank in range(layout.world_size):
        stream = ShardStream(
            mixture,
            _key,
            batch_size=layout.batch_size,
            seed=mixture.seed,
            shuffle_buffer=layout.shuffle_buffer,
            rank=rank,
            world_size=layout.world_size,
        )
        stream.set_epoch(1)
        stream.remaining = remaining
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=layout.num_workers, collate_fn=_ids
        )
        for batch in islice(loader, batches):
            ids += batch
    return ids


@pytest.mark.parametrize(
    ("world", "workers", "to_world", "to_workers", "batches"),
    [(2, 2, 1, 1, 3), (1, 1, 2, 2, 5), (2, 1, 2, 2, 2)],
)
def test_rest_of_the_epoch_is_every_untrained_sample_once(
    shards: tuple[Path, list[str]],
    world: int,
    workers: int,
    to_world: int,
    to_workers: int,
    batches: int,
) -> None:
    shard_dir, all_ids = shards
    mixture = Mixture([Source("data", shard_dir)], seed=5)
    before = Layout(world, workers, batch_size=4, shuffle_buffer=8, group_megabatch=1)
    after = Layout(to_world, to_workers, batch_size=4, shuffle_buffer=8, group_megabatch=1)
    trained = _read(mixture, before, batches, None)
    assert len(trained) == world * batches * 4
    stream = list(range(mixture.num_samples()))
    taken, unknown = consumed(stream, before, batches, f"{mixture.seed}-1")
    assert not unknown and len(taken) == len(trained)
    rest = _read(mixture, after, None, [i for i in stream if i not in taken])
    union = Counter(trained + rest)
    assert sorted(union) == sorted(all_ids)
    assert set(union.values()) == {1}, [i for i, n in union.items() if n > 1]


def test_half_a_length_grouped_megabatch_is_unknowable() -> None:
    layout = Layout(2, 1, batch_size=4, shuffle_buffer=8, group_megabatch=4)
    stream = list(range(64))
    _, unknown = consumed(stream, layout, 4, "0-0")
    assert not unknown
    _, unknown = consumed(stream, layout, 3, "0-0")
    assert unknown == ["rank 0 worker 0", "rank 1 worker 0"]


# ---- train.py stopped at one world size, resumed at another (slow) ---------------------------

RUN = (
    "trainer.strategy=ddp",
    "stage=2",
    "stage.init_from=null",
    "stage.evaluate=false",
    "stage.epochs=1",
    "data.batch_size=4",
    "checkpoint.every_n_steps=1",
    "logger=none",
)


def _records(root: Path) -> list[dict[str, Any]]:
    return _records_of(root / "samples.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "first", "then"),
    [
        # 2 ranks x 4 x accumulation 2 -> 1 rank x 4 x accumulation 4
        (16, ("trainer.devices=2", "data.num_workers=1", "trainer.max_steps=1"),
         ("trainer.devices=1", "data.num_workers=2")),
        # 1 rank x 4 x accumulation 2 -> 2 ranks x 4 x accumulation 1
        (8, ("trainer.devices=1", "data.num_workers=0", "trainer.max_steps=3"),
         ("trainer.devices=2", "data.num_workers=1")),
    ],
    ids=["2to1", "1to2"],
)  # fmt: skip
def test_train_resumes_at_another_world_size(
    tmp_path: Path, data_root: Path, batch: int, first: tuple[str, ...], then: tuple[str, ...]
) -> None:
    """The epoch's 48 samples are trained once, and every optimizer step (before and after the
    resume) holds one global batch: accumulation and Lightning's batch count follow the world."""
    run = (
        *RUN,
        f"stage.global_batch_size={batch}",
        f"debug.record_samples={tmp_path}/samples.jsonl",
    )
    run_train(tmp_path, data_root, *run, *first, timeout=300)
    stopped = int(first[-1].split("=")[1])
    assert len([i for r in _records(tmp_path) for i in r["ids"]]) == stopped * batch
    run_train(tmp_path, data_root, *run, *then, "resume=auto", timeout=300)
    trained = Counter(i for r in _records(tmp_path) for i in r["ids"])
    assert len(trained) == 48 and set(trained.values()) == {1}, trained
    per_step: Counter[int] = Counter()
    for r in _records(tmp_path):
        per_step[r["step"]] += len(r["ids"])
    assert per_step == dict.fromkeys(range(48 // batch), batch), per_step


@pytest.mark.slow
def test_sigkill_at_two_ranks_resumes_at_one(tmp_path: Path, data_root: Path) -> None:
    """Acceptance 17.1 with a real kill: 2 DDP ranks x 1 worker (global batch 8: 6 steps per
    epoch, a checkpoint every step) are SIGKILLed mid-epoch; `resume=auto` at 1 rank x 2 workers
    (accumulation 2) trains the rest. The steps kept by the checkpoint plus the resumed ones are
    the epoch's 48 samples exactly once, each step one global batch of 8."""
    run = (*RUN, "stage.global_batch_size=8")
    killed_log = tmp_path / "killed.jsonl"

    def mid_epoch() -> bool:
        steps = [r["step"] for r in _records_of(killed_log, rank=0)]
        return bool(list(tmp_path.glob("resume/*/last.ckpt")) and steps and max(steps) >= 2)

    run_until_killed(
        tmp_path,
        data_root,
        *run,
        "trainer.devices=2",
        "data.num_workers=1",
        f"debug.record_samples={killed_log}",
        ready=mid_epoch,
        timeout=300,
    )
    (last,) = tmp_path.glob("resume/*/last.ckpt")
    resumed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= resumed_at < 6, resumed_at  # inside the epoch
    resumed_log = tmp_path / "resumed.jsonl"
    run_train(
        tmp_path,
        data_root,
        *run,
        "trainer.devices=1",
        "data.num_workers=2",
        "resume=auto",
        f"debug.record_samples={resumed_log}",
        timeout=300,
    )
    kept = [r for r in _records_of(killed_log) if r["step"] < resumed_at]
    resumed = _records_of(resumed_log)
    assert min(r["step"] for r in resumed) == resumed_at
    trained = Counter(i for r in kept + resumed for i in r["ids"])
    assert len(trained) == 48 and set(trained.values()) == {1}, trained
    per_step: Counter[int] = Counter()
    for r in kept + resumed:
        per_step[r["step"]] += len(r["ids"])
    assert per_step == dict.fromkeys(range(6), 8), per_step


def _records_of(path: Path, rank: int | None = None) -> list[dict[str, Any]]:
    from vlmlab.training.audit import read_records

    return read_records(path, rank=rank)
