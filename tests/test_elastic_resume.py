"""Elastic resume: an epoch stopped at one world size / worker count goes on at another with
every untrained sample exactly once and no batch replayed (issue 17.1).

Fast: real shards read by real ShardStreams in DataLoader worker processes, cut at k batches
under one layout, the rest planned by `split.consumed` for another. Slow: train.py stopped at 2
DDP ranks resumes at 1 (and 1 -> 2); the sample ids trained over the epoch are the dataset once.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_scale import final_weights, run_train, run_until_killed
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


def _loader(
    mixture: Mixture, layout: Layout, rank: int, **state: Any
) -> tuple[ShardStream, torch.utils.data.DataLoader]:
    """Rank `rank` of `layout` in epoch 1, its stream's resume `state` set (remaining, replay,
    skip_batches), read by `layout.num_workers` DataLoader workers."""
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
    for name, value in state.items():
        setattr(stream, name, value)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=layout.num_workers, collate_fn=_ids
    )
    return stream, loader


def _read(
    mixture: Mixture, layout: Layout, batches: int | None, remaining: list[int] | None
) -> list[str]:
    """Ids the ranks of `layout` train in their first `batches` batches (None: all)."""
    ids: list[str] = []
    for rank in range(layout.world_size):
        _, loader = _loader(mixture, layout, rank, remaining=remaining)
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


def _batches(
    mixture: Mixture, layout: Layout, rank: int, replay: Layout | None, skip: int = 0
) -> list[list[str]]:
    """The ids of every batch rank `rank` of `layout` yields (replaying `replay`'s batches)."""
    stream, loader = _loader(mixture, layout, rank, replay=replay, skip_batches=skip)
    batches = list(loader)
    assert len(batches) == stream.num_batches() - skip
    return batches


@pytest.mark.parametrize(
    ("origin", "now", "skip"),
    [((2, 2, 8), (1, 1, 8), 0), ((1, 1, 8), (2, 2, 5), 3), ((2, 1, 8), (3, 2, 3), 2)],
)
def test_another_layout_replays_the_runs_own_batches(
    shards: tuple[Path, list[str]],
    origin: tuple[int, int, int],
    now: tuple[int, int, int],
    skip: int,
) -> None:
    """data.elastic=exact: M ranks deal the N-rank run's micro-batches round robin (rank 0's
    batch 0, rank 1's batch 0, ...), so every optimizer step holds the same samples; resumed
    after `skip` batches per rank, the rest of the deal; padded with empty batches at the end."""
    mixture = Mixture([Source("data", shards[0])], seed=5)
    run = Layout(origin[0], origin[1], batch_size=4, shuffle_buffer=origin[2], group_megabatch=1)
    later = Layout(now[0], now[1], batch_size=4, shuffle_buffer=now[2], group_megabatch=1)
    own = [_batches(mixture, run, rank, None) for rank in range(run.world_size)]
    sequence = [own[r][k] for k in range(len(own[0])) for r in range(run.world_size)]
    assert sorted(i for batch in sequence for i in batch) == sorted(shards[1])
    replayed = [_batches(mixture, later, rank, run) for rank in range(later.world_size)]
    dealt = [replayed[j % later.world_size][j // later.world_size] for j in range(len(sequence))]
    assert dealt == sequence  # same samples, same order within each micro-batch
    padded = sum(len(r) for r in replayed) - len(sequence)
    assert padded < later.world_size and all(not r[-1] for r in replayed[-padded:] if padded)
    resumed = [_batches(mixture, later, rank, run, skip) for rank in range(later.world_size)]
    assert resumed == [r[skip:] for r in replayed]


def test_exact_resume_counts_in_the_new_layout_and_refuses_what_it_cannot_replay(
    shards: tuple[Path, list[str]],
) -> None:
    """The saved position (batches per rank at the saved layout) becomes batches per rank at
    the new one; the run's own layout travels in every later checkpoint; what cannot be
    replayed exactly is a ConfigError naming the key, before any batch."""
    from types import SimpleNamespace

    from vlmlab.data.datamodule import VLMDataModule
    from vlmlab.errors import ConfigError

    def module(world: int, workers: int, **options: Any) -> VLMDataModule:
        options = {"batch_size": 4, "shuffle_buffer": 8, **options}
        dm = VLMDataModule(shards[0], None, None, num_workers=workers, **options)  # type: ignore[arg-type]
        dm.trainer = SimpleNamespace(world_size=world, global_rank=0)  # type: ignore[assignment]
        return dm

    def resumed(state: dict[str, Any], world: int, workers: int, **options: Any) -> VLMDataModule:
        dm = module(world, workers, **options)
        dm.load_state_dict(state)
        dm.resolve_resume()
        return dm

    run = module(2, 1)
    run.batches_done = 3  # 6 micro-batches of the epoch's 16 (2 ranks x 8)
    state = run.state_dict()
    later = resumed(state, 1, 2)
    assert later.elastic and later._origin == run.layout()
    assert later.batches_done == 6 and later.resumed_batch_count(2) == 6
    assert later.batches_per_epoch(1) == 16 and later.state_dict()["origin"] == state["origin"]
    later.batches_done = 10
    back = resumed(later.state_dict(), 2, 1)  # the run's own layout again: no replay
    assert back._origin is None and back.batches_done == 5
    with pytest.raises(ConfigError) as err:
        resumed(later.state_dict(), 3, 1)  # 10 micro-batches do not split over 3 ranks
    assert err.value.key == "trainer.devices"
    with pytest.raises(ConfigError) as err:
        resumed(state, 1, 2, batch_size=2)
    assert err.value.key == "data.batch_size"
    grouped = module(2, 1, group_by_length=True, group_megabatch=2)
    grouped.batches_done = 4
    with pytest.raises(ConfigError) as err:
        resumed(grouped.state_dict(), 1, 2, group_by_length=True, group_megabatch=2)
    assert err.value.key == "data.elastic" and "data.elastic=replan" in str(err.value)
    replanned = resumed(
        grouped.state_dict(), 1, 2, group_by_length=True, group_megabatch=2, elastic="replan"
    )
    assert replanned.elastic and len(replanned._remaining or []) == 60 - 2 * 4 * 4
    with pytest.raises(ConfigError) as err:
        module(1, 1, elastic="exactly")
    assert err.value.key == "data.elastic" and "exact, replan" in str(err.value)


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
    resume) holds one global batch: accumulation and Lightning's batch count follow the world.
    data.elastic=exact: each step holds the samples of the uninterrupted run's step, and the
    final weights equal its weights up to fp32 reduction order (all-reduce over 2 ranks vs 2
    accumulated micro-batches)."""
    root, straight = tmp_path / "run", tmp_path / "straight"
    run = (*RUN, f"stage.global_batch_size={batch}")
    run_train(root, data_root, *run, *first, *_record(root), timeout=300)
    stopped = int(first[-1].split("=")[1])
    assert len([i for r in _records(root) for i in r["ids"]]) == stopped * batch
    for old in root.glob("checkpoints/*"):  # only the resumed run's final weights remain
        shutil.rmtree(old)
    run_train(root, data_root, *run, *then, *_record(root), "resume=auto", timeout=300)
    trained = Counter(i for r in _records(root) for i in r["ids"])
    assert len(trained) == 48 and set(trained.values()) == {1}, trained
    per_step: dict[int, list[str]] = {}
    for r in _records(root):
        per_step.setdefault(r["step"], []).extend(r["ids"])
    assert {k: len(v) for k, v in per_step.items()} == dict.fromkeys(range(48 // batch), batch)
    run_train(straight, data_root, *run, *first[:-1], *_record(straight), timeout=300)
    _assert_uninterrupted(per_step, root, straight)


def _record(root: Path) -> tuple[str]:
    return (f"debug.record_samples={root}/samples.jsonl",)


def _assert_uninterrupted(per_step: dict[int, list[str]], root: Path, straight: Path) -> None:
    """data.elastic=exact: every step of the resumed run (`per_step`: its sample ids) holds the
    samples of the same step of the run never stopped (`straight`), and the final weights are
    that run's up to fp32 reduction order (all-reduce over ranks vs accumulated micro-batches)."""
    uninterrupted: dict[int, list[str]] = {}
    for r in _records(straight):
        uninterrupted.setdefault(r["step"], []).extend(r["ids"])
    assert {k: sorted(v) for k, v in per_step.items()} == {
        k: sorted(v) for k, v in uninterrupted.items()
    }
    expected, resumed = final_weights(straight), final_weights(root)
    assert expected.keys() == resumed.keys() and expected
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sigkill_at_two_ranks_resumes_at_one(tmp_path: Path, data_root: Path) -> None:
    """Acceptance 17.1 with a real kill: 2 DDP ranks x 1 worker (global batch 8: 6 steps per
    epoch, a checkpoint every step) are SIGKILLed mid-epoch; `resume=auto` at 1 rank x 2 workers
    (accumulation 2) trains the rest. The steps kept by the checkpoint plus the resumed ones are
    the epoch's 48 samples exactly once, each step one global batch of 8, the samples of the same
    step of a 2-rank run never killed, and the final weights are that run's (fp32 reduction
    order apart)."""
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
    per_step: dict[int, list[str]] = {}
    for r in kept + resumed:
        per_step.setdefault(r["step"], []).extend(r["ids"])
    assert {k: len(v) for k, v in per_step.items()} == dict.fromkeys(range(6), 8), per_step
    # data.elastic=exact: the steps and weights of the run never killed, at 2 ranks
    straight = tmp_path / "straight"
    two_ranks = ("trainer.devices=2", "data.num_workers=1", *_record(straight))
    run_train(straight, data_root, *run, *two_ranks, timeout=300)
    _assert_uninterrupted(per_step, tmp_path, straight)


def _records_of(path: Path, rank: int | None = None) -> list[dict[str, Any]]:
    from vlmlab.training.audit import read_records

    return read_records(path, rank=rank)
