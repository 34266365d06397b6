"""VLMModule on the paths multi-GPU runs take, reproduced on CPU: the global token-mean loss
without host reads per micro-batch, an all-bad micro-batch on one of two FSDP ranks (slow), and
a 2-rank DDP resume that continues every rank's own random streams (slow)."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import REPO
from tests.test_scale import _metric_history, train_command

# ---- global token loss: same gradients as the old formula, no host reads --------------------


class _HostReads(TorchDispatchMode):
    """Counts tensor -> Python scalar conversions (`.item()`, `float(t)`, `int(t)`, `bool(t)`):
    on a GPU each one waits for the device; on CPU they are the same calls, so they can be
    counted here."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _probed_module_class() -> Any:
    from vlmlab.training.module import VLMModule

    class Probed(VLMModule):
        """VLMModule whose own per-micro-batch code runs under a host-read counter. The model's
        forward (models/vlm.py) is excluded: it is not this module's code."""

        reads = 0
        grads: dict[str, torch.Tensor] | None = None
        _mode: _HostReads | None = None

        @contextmanager
        def _counting(self) -> Iterator[_HostReads]:
            mode = _HostReads()
            with mode:
                self._mode = mode
                yield mode
            self._mode = None
            Probed.reads += mode.count

        def forward(self, batch: dict[str, Any]) -> Any:
            mode = getattr(self, "_mode", None)
            if mode is not None:
                mode.paused = True
            try:
                return super().forward(batch)
            finally:
                if mode is not None:
                    mode.paused = False

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
            with self._counting():
                return super().training_step(batch, batch_idx)

        def on_after_backward(self) -> None:
            with self._counting():
                super().on_after_backward()

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            super().on_before_optimizer_step(optimizer)
            if Probed.grads is None:  # the first step: its gradients, after normalisation
                Probed.grads = {
                    n: p.grad.detach().clone()
                    for n, p in self.model.named_parameters()
                    if p.grad is not None
                }

    return Probed


def test_token_normalisation_matches_the_old_formula_without_host_reads(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    """One optimizer step over 3 micro-batches of different sizes and target counts (images and
    text-only) in a real Lightning fit: the gradients are bit-identical to the previous
    implementation's (sum of loss x tokens / accumulation, then x float(acc x world / tokens)),
    the step loss is the global token mean, and the module's own code reads no tensor back to
    the host (the old `float(stats)` in _normalize_step did, once per step)."""
    from tests.test_models import _batch
    from vlmlab import stages
    from vlmlab.models import as_dict, build_vlm

    cfg = compose_cfg("stage=2", "stage.init_from=null")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    stages.apply(cfg.stage, model)
    batches = [
        _batch(model, tokenizer, [True, False], start=0),
        _batch(model, tokenizer, [True, True, False], start=2),
        _batch(model, tokenizer, [False], start=5),
    ]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(set(counts)) == 3  # unequal micro-batches: a per-micro-batch mean would differ

    # the reference: the old formula by hand, on a copy of the same weights
    reference = copy.deepcopy(model)
    reference.train()
    acc, tokens, loss_sum = len(batches), sum(counts), 0.0
    for batch in batches:
        out = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        )
        (out.loss * out.num_target_tokens / acc).backward()
        loss_sum += float(out.loss.detach().double()) * out.num_target_tokens
    scale = acc * 1 / tokens
    expected = {}
    for name, param in reference.named_parameters():
        if param.grad is not None:
            expected[name] = param.grad.mul_(scale)

    probed = _probed_module_class()
    probed.reads, probed.grads = 0, None
    module = probed(model, as_dict(cfg.stage.optim), total_steps=1)
    dataset: Any = batches  # a list of collated batches
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        accumulate_grad_batches=acc,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=loader)

    assert trainer.global_step == 1
    assert probed.grads is not None and probed.grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(probed.grads[name], grad), name
    assert module.last_step_loss is not None
    assert float(module.last_step_loss) == pytest.approx(loss_sum / tokens, rel=1e-12)
    assert float(trainer.callback_metrics["train/target_tokens"]) == tokens
    assert probed.reads == 0


def _draw() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_random_state_round_trip_and_a_changed_world_size(
    tiny_model: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """One process: the saved torch / `random` / numpy state comes back at the next batch.
    A checkpoint of 2 ranks loaded by 1 process restores rank 0's state, keeps the global
    bad-sample counts and warns; an older checkpoint (rank 0's torch state only) still loads."""
    from vlmlab.training.module import VLMModule

    model, _ = tiny_model
    module = VLMModule(model, {"lr": 1e-3}, total_steps=1)
    module.skipped.update({"missing_image": 2})
    _seed_all(1)
    checkpoint: dict[str, Any] = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    expected = _draw()

    _seed_all(99)
    fresh = VLMModule(model, {"lr": 1e-3}, total_steps=1)
    fresh.on_load_checkpoint(checkpoint)
    fresh.on_train_batch_start({}, 0)
    assert _draw() == expected
    assert fresh.skipped == {"missing_image": 2}

    (rank0,) = checkpoint["vlmlab"]["per_rank"]
    _seed_all(5)
    rank1 = {"rng": {"torch": torch.get_rng_state()}, "skipped": {"corrupt_image": 1}}
    _seed_all(99)
    with caplog.at_level("WARNING", logger="vlmlab.training.module"):
        fresh.on_load_checkpoint({"vlmlab": {"per_rank": [rank0, rank1]}})
    assert "2 rank(s), this run has 1" in caplog.text
    assert fresh.skipped == {"missing_image": 2, "corrupt_image": 1}
    fresh.on_train_batch_start({}, 0)
    assert _draw() == expected

    _seed_all(1)
    old = {"vlmlab": {"rng": {"torch": torch.get_rng_state()}, "skipped": {"too_long": 3}}}
    torch_draw = torch.rand(3).tolist()
    _seed_all(99)
    fresh.on_load_checkpoint(old)
    fresh.on_train_batch_start({}, 0)
    assert torch.rand(3).tolist() == torch_draw and fresh.skipped == {"too_long": 3}


# ---- an all-bad micro-batch on one of two FSDP ranks ----------------------------------------


def _run_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `train.py` (and the ranks Lightning launches from it) in its own process group;
    on timeout the whole group is killed, so a hung rank cannot outlive the test."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train.py did not finish in {timeout:.0f}s (hung ranks?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


class ReduceScatterProbe(L.Callback):
    """Counts `torch.distributed.reduce_scatter_single` calls (FSDP2's gradient reduce-scatter)
    per micro-batch and writes them to `<path stem>.rank<r>.jsonl`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.calls = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch.distributed as dist

        original = dist.reduce_scatter_single

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        dist.reduce_scatter_single = counted  # FSDP2 looks it up on the module at each call

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        target = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}.jsonl")
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "calls": self.calls}) + "\n")
        self.calls = 0


def _bad_half_shards(out: Path) -> None:
    """32 instruct samples in shards of 16 good, 8 missing-image, 8 good, read in order
    (shuffle buffer 1): with 2 ranks x batch 4 the bad shard is two whole micro-batches of one
    rank, whatever the epoch's shard order, while the other rank trains."""
    from vlmlab.data.shapes import ShapesSpec, generate
    from vlmlab.data.shards import write_shards

    paths = generate(ShapesSpec(num_images=40, num_heldout=0, image_size=32, seed=5), out)
    instruct = json.loads(paths["instruct"].read_text())
    good = instruct[:24]
    bad = [{**r, "id": f"bad{i}", "image": "gone.png"} for i, r in enumerate(instruct[24:32])]
    write_shards(
        good[:16] + bad + good[16:], out / "images", out / "shards", shard_sizes=[16, 8, 8]
    )


RS_PROBE = "tests.test_module_paths.ReduceScatterProbe"


def _fsdp_on(shards: Path) -> tuple[str, ...]:
    """trainer=fsdp_cpu (2 ranks), stage 2 from scratch, micro-batch 4, the instruct set
    replaced by `shards`, read in order (shuffle buffer 1)."""
    return (
        "trainer=fsdp_cpu",
        "stage=2",
        "stage.init_from=null",
        "stage.evaluate=false",
        "data.batch_size=4",
        "data.shuffle_buffer=1",
        f"data.mixtures={{instruct: [{{name: bad, path: '{shards}'}}]}}",
    )


@pytest.mark.slow
def test_all_bad_micro_batch_on_one_fsdp_rank_finishes(tmp_path: Path, data_root: Path) -> None:
    """trainer=fsdp_cpu, 2 ranks, micro-batch 4, accumulation 2: one rank's micro-batches
    come out empty (every sample bad) while the other rank's all-gathers wait for it. The
    empty rank must run a real (zero-weighted) forward and backward; the old 0 x sum(params)
    link ran none and the run hung. Both ranks must finish the planned 2 steps, and gradients
    are reduce-scattered once per step, not once per micro-batch."""
    from vlmlab import checkpoints
    from vlmlab.training.audit import read_records

    _bad_half_shards(tmp_path / "bad")
    record = tmp_path / "run" / "seen.jsonl"
    command, env = train_command(
        tmp_path / "run",
        data_root,
        *_fsdp_on(tmp_path / "bad" / "shards"),
        "stage.global_batch_size=16",
        f"debug.record_samples={record}",
        f"trainer.extra_callbacks=[{{_target_: {RS_PROBE}, path: '{tmp_path}/rs'}}]",
    )
    proc = _run_group(command, env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = {rank: read_records(record, rank=rank) for rank in (0, 1)}
    assert [len(rows[0]), len(rows[1])] == [4, 4]  # 32 samples / (2 ranks x 4) micro-batches
    empty = [(r["rank"], r["batch"]) for rank in rows.values() for r in rank if not r["ids"]]
    assert [rank for rank, _ in empty] == [1, 1], empty  # rank 1 (seed 0's shard order), 2 batches
    trained = {i for rank in rows.values() for r in rank for i in r["ids"]}
    assert len(trained) == 24 and not any(i.startswith("bad") for i in trained)
    (final,) = (tmp_path / "run" / "checkpoints").glob("*/meta.json")
    assert checkpoints.read_meta(final.parent).global_step == 2
    # the bad samples were all rank 1's: the logged count is global, not rank 0's share (0)
    skipped = _metric_history(tmp_path / "run", "data/skipped/missing_image")
    assert skipped and skipped[-1][1] == 8
    # FSDP2 reduce-scatters on each step's last micro-batch only (set_requires_gradient_sync)
    for rank in (0, 1):
        lines = (tmp_path / f"rs.rank{rank}.jsonl").read_text().splitlines()
        calls = [json.loads(line)["calls"] for line in lines]
        assert len(calls) == 4 and calls[0] == calls[2] == 0 < calls[1] == calls[3], calls


def _alternating_shards(out: Path) -> None:
    """4 shards of 4 good then 4 missing-image samples: with micro-batch 4 and shuffle buffer 1
    every rank reads good, bad, good, bad whatever the shard order (ranks get whole shards)."""
    from vlmlab.data.shapes import ShapesSpec, generate
    from vlmlab.data.shards import write_shards

    paths = generate(ShapesSpec(num_images=16, num_heldout=0, image_size=32, seed=5), out)
    good = json.loads(paths["instruct"].read_text())
    records = []
    for shard in range(4):
        records += good[4 * shard : 4 * shard + 4]
        records += [
            {**r, "id": f"bad{shard}{i}", "image": "gone.png"} for i, r in enumerate(good[:4])
        ]
    write_shards(records, out / "images", out / "shards", shard_sizes=[8] * 4)


@pytest.mark.slow
def test_all_bad_step_under_fsdp_trains_nothing_on_any_rank(
    tmp_path: Path, data_root: Path
) -> None:
    """trainer=fsdp_cpu, 2 ranks, micro-batch 4, no accumulation: step 1 is all-bad on both ranks
    (no target token anywhere). Both ranks run its collectives (the run finishes), it changes
    no weight shard on any rank (AdamW's momentum from step 0 would move them under a zero
    gradient: the step is skipped, not stepped with zeros), and it is counted in
    `train/skipped_empty`; steps 0 and 2 train."""
    from tests.test_nonfinite import poison, step_ids, weights_after

    _alternating_shards(tmp_path / "bad")
    record = tmp_path / "weights"
    command, env = train_command(
        tmp_path / "run",
        data_root,
        *_fsdp_on(tmp_path / "bad" / "shards"),
        "stage.global_batch_size=8",
        "trainer.max_steps=3",
        poison([], record),  # no poison: records each rank's ids and weight-shard digests
    )
    proc = _run_group(command, env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        ids = step_ids(record, rank)
        assert len(ids[0]) == len(ids[2]) == 4 and ids[1] == [], (rank, ids)
        after = weights_after(record, rank)
        assert sorted(after) == [1, 2, 3], rank
        assert after[2]["digest"] == after[1]["digest"], rank  # the all-bad step: no update
        assert after[3]["digest"] != after[2]["digest"], rank  # training went on
    empty = dict(_metric_history(tmp_path / "run", "train/skipped_empty"))
    assert empty == {0: 0.0, 1: 1.0, 2: 1.0}, empty
    assert _metric_history(tmp_path / "run", "data/skipped/missing_image")[-1][1] == 8


# ---- 2-rank DDP resume: every rank continues its own random streams -------------------------


class RngProbe(L.Callback):
    """Gives each rank its own torch / `random` / numpy streams at train start and records a
    draw from each after every micro-batch, to `<path stem>.rank<r>.jsonl`.

    Why its own streams: `seed_everything` seeds every rank alike, and on a real run the ranks'
    streams part as soon as their batch shapes differ (dropout draws per element); seeding per
    rank makes that difference certain, so a resume that hands rank 0's state to rank 1 shows.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = 1000 + trainer.global_rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        row = {
            "step": trainer.global_step,
            "torch": torch.rand(2).tolist(),
            "python": random.random(),
            "numpy": float(np.random.rand()),
        }
        target = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}.jsonl")
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


PROBE = "tests.test_module_paths.RngProbe"


def _draws(root: Path, rank: int) -> dict[int, dict]:
    lines = (root / f"rng.rank{rank}.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_random_streams(tmp_path: Path, data_root: Path) -> None:
    """2 CPU ranks (gloo), stage 1, 6 steps. One run goes through; the other stops at step 3
    (trainer.max_steps, checkpoint every 3 steps) and resumes (resume=auto) to step 6. After
    the resume each rank's torch, `random` and numpy draws equal the uninterrupted run's. The
    old checkpoint held rank 0's torch state only, restored on every rank."""
    common = (
        "stage=1",
        "stage.init_from=null",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "data.batch_size=2",
        "stage.global_batch_size=4",
        "checkpoint.every_n_steps=3",
        "logger=none",
        "seed=7",
    )

    def run(root: Path, *extra: str) -> None:
        probe = f"trainer.extra_callbacks=[{{_target_: {PROBE}, path: '{root}/rng'}}]"
        command, env = train_command(root, data_root, *common, probe, *extra)
        proc = _run_group(command, env, timeout=420)
        assert proc.returncode == 0, proc.stderr[-4000:]

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run(whole, "trainer.max_steps=6")
    run(stopped, "trainer.max_steps=3")
    assert sorted(_draws(stopped, 0)) == [1, 2, 3]
    run(stopped, "trainer.max_steps=6", "resume=auto")

    reference = {rank: _draws(whole, rank) for rank in (0, 1)}
    assert sorted(reference[0]) == sorted(reference[1]) == [1, 2, 3, 4, 5, 6]
    assert reference[0][4]["torch"] != reference[1][4]["torch"]  # the ranks' streams differ
    for rank in (0, 1):
        resumed = _draws(stopped, rank)
        assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
        for step in (4, 5, 6):
            for stream in ("torch", "python", "numpy"):
                assert resumed[step][stream] == reference[rank][step][stream], (rank, step, stream)
