"""Numerical guards (training/guards.py): a step with a non-finite loss or gradient norm is
skipped by every rank together, counted and logged with its samples; K in a row fail the run.

NaNs are injected by `Poison`, a real Lightning callback passed through
`trainer.extra_callbacks` (no product knob for tests): into a micro-batch's images (the loss
path, like a corrupt image decoded to NaN) or into one rank's gradients after DDP's all-reduce
(the gradient path, and the case where only one rank sees the NaN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from tests.test_scale import final_weights, run_train
from vlmlab.errors import ConfigError
from vlmlab.training.guards import NonFiniteError, NonFiniteGuard, check_fail_after

POISON = "tests.test_nonfinite.Poison"


class Poison(L.Callback):
    """Writes NaN into the batch images (`where=pixels`), the gradients (`where=grad`) or a
    trainable weight (`where=weights`) in the optimizer steps `steps` (0-based global steps),
    on `rank` only if given, in micro-batch `micro_batch` only if given. With `record`, each
    rank appends JSON lines to `<record>.rank<r>.jsonl`: the ids of each micro-batch, and a
    digest of its trainable weights (local shards under FSDP) after each batch."""

    def __init__(
        self,
        steps: list[int],
        where: str = "pixels",
        rank: int | None = None,
        micro_batch: int | None = None,
        record: str | None = None,
    ) -> None:
        self.steps, self.where, self.rank = set(steps), where, rank
        self.micro_batch, self.record = micro_batch, record

    def _mine(self, trainer: L.Trainer) -> bool:
        return trainer.global_step in self.steps and self.rank in (None, trainer.global_rank)

    def _write(self, trainer: L.Trainer, entry: dict[str, Any]) -> None:
        if self.record:
            with open(f"{self.record}.rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"rank": trainer.global_rank, **entry}) + "\n")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        micro = batch_idx % trainer.accumulate_grad_batches
        step = trainer.global_step
        poisoned = (
            self.where == "pixels"
            and self._mine(trainer)
            and self.micro_batch in (None, micro)
            and batch.get("pixel_values") is not None
        )
        if poisoned:
            batch["pixel_values"].fill_(math.nan)
        if self.where == "weights" and self._mine(trainer) and micro == 0:
            weight = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.view(-1)[:1].fill_(math.nan)  # like an update that overflowed
        self._write(trainer, {"kind": "ids", "step": step, "ids": list(batch["ids"])})

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.where != "grad" or not self._mine(trainer):
            return
        grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        with torch.no_grad():
            local.view(-1)[:1].fill_(math.nan)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        digest = hashlib.sha256()
        finite = True
        for p in pl_module.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                local = local.detach().cpu()
                finite = finite and bool(torch.isfinite(local).all())
                digest.update(local.numpy().tobytes())
        self._write(
            trainer,
            {"kind": "weights", "after": trainer.global_step, "digest": digest.hexdigest(),
             "finite": finite},
        )  # fmt: skip


def poison(steps: list[int], record: Path | None = None, **kwargs: Any) -> str:
    """The `trainer.extra_callbacks` override that installs Poison."""
    args = [f"steps:{json.dumps(steps).replace(' ', '')}"]
    args += [f"{k}:{v}" for k, v in kwargs.items()]
    if record is not None:
        args.append(f"record:'{record}'")
    return f"trainer.extra_callbacks=[{{_target_:{POISON},{','.join(args)}}}]"


def records(record: Path, rank: int) -> list[dict[str, Any]]:
    path = Path(f"{record}.rank{rank}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_ids(record: Path, rank: int = 0) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in records(record, rank):
        if r["kind"] == "ids":
            out.setdefault(r["step"], []).extend(r["ids"])
    return out


def weights_after(record: Path, rank: int) -> dict[int, dict[str, Any]]:
    """Global step -> the weights' digest once that many steps were taken (last batch wins)."""
    return {r["after"]: r for r in records(record, rank) if r["kind"] == "weights"}


def _ckpt(root: Path) -> dict[str, Any]:
    (last,) = root.glob("resume/*/last.ckpt")
    return torch.load(last, map_location="cpu", weights_only=False)


def _mlflow(root: Path) -> tuple[Any, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlmlab")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


# stage 1 (the connector trains), micro batch 4 x accumulation 2
STAGE1 = (
    "stage=1",
    "data.batch_size=4",
    "stage.global_batch_size=8",
    "checkpoint.every_n_steps=1",
)


# ---- one process --------------------------------------------------------------------------------


def test_fail_after_nonfinite_steps_names_the_key() -> None:
    assert check_fail_after(2) == 2
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigError, match=r"trainer\.fail_after_nonfinite_steps"):
            check_fail_after(bad)
    guard = NonFiniteGuard(2)
    guard.record(5, True, ["a"])
    guard.record(6, False, [])  # a good step ends the streak
    guard.record(7, True, ["b"])
    with pytest.raises(NonFiniteError, match=r"(?s)steps 7, 8;.*step 7: b\n  step 8: c, d"):
        guard.record(8, True, ["c", "d"])
    assert guard.total == 3


def test_nan_in_one_micro_batch_skips_the_whole_step_and_changes_nothing(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN images in the second micro-batch of step 2 (the last of 3): the step is skipped and
    counted, and the run ends with exactly the weights and optimizer state of a run that
    stopped after step 1 (no update, no AdamW moment or step count changed); the LR schedule
    still advanced with the global step (a resume stays exact)."""
    from vlmlab.train import train

    record = tmp_path / "poison"
    poisoned, clean = tmp_path / "poisoned", tmp_path / "clean"
    with caplog.at_level(logging.WARNING, logger="vlmlab.training.guards"):
        train(
            compose_cfg(
                *STAGE1,
                "trainer.max_steps=3",
                f"paths.root={poisoned}",
                poison([2], record, micro_batch=1),
            )
        )
    train(compose_cfg(*STAGE1, "trainer.max_steps=2", f"paths.root={clean}"))

    a, b = final_weights(poisoned), final_weights(clean)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ckpt_a, ckpt_b = _ckpt(poisoned), _ckpt(clean)
    assert (ckpt_a["global_step"], ckpt_b["global_step"]) == (3, 2)
    state_a = ckpt_a["optimizer_states"][0]["state"]
    state_b = ckpt_b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index, moments in state_a.items():
        for key, value in moments.items():
            assert torch.equal(value, state_b[index][key]), (index, key)
    assert ckpt_a["lr_schedulers"][0]["last_epoch"] == 3  # in lockstep with the global step
    assert ckpt_a["vlmlab"]["nonfinite"] == {"total": 1, "streak": [[2, step_ids(record)[2]]]}

    client, run = _mlflow(poisoned)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/skipped_nonfinite")
    assert {m.step: m.value for m in history} == {0: 0.0, 1: 0.0, 2: 1.0}
    # the warning names all 8 samples of the skipped step (both micro-batches)
    ids = step_ids(record)[2]
    assert len(ids) == 8
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "step 2 skipped" in message and all(i in message for i in ids)


def test_k_nonfinite_steps_in_a_row_fail_the_run_with_their_ids(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """fail_after_nonfinite_steps=2, NaN images in steps 1 and 2: the run raises at step 2 with
    the ids of both steps, MLflow says FAILED with them in its error, and the resume point is
    the checkpoint after step 1 (skipped: the weights of step 0, finite). resume=auto (K is not
    part of the run's identity) continues from it and finishes."""
    from vlmlab.train import train

    record = tmp_path / "poison"
    run = (*STAGE1, "trainer.max_steps=4")
    with pytest.raises(NonFiniteError) as raised:
        train(compose_cfg(*run, "trainer.fail_after_nonfinite_steps=2", poison([1, 2], record)))
    ids = step_ids(record)
    message = str(raised.value)
    assert "steps 1, 2;" in message and "trainer.fail_after_nonfinite_steps=2" in message
    assert all(i in message for i in ids[1] + ids[2]) and len(ids[1] + ids[2]) == 16
    assert not any(i in message for i in ids[0])

    client, mlrun = _mlflow(tmp_path)
    assert mlrun.info.status == "FAILED"
    error = mlrun.data.tags["error"]
    assert error.startswith("NonFiniteError: 2 optimizer steps in a row")
    assert all(i in error for i in ids[1] + ids[2])
    history = client.get_metric_history(mlrun.info.run_id, "train/skipped_nonfinite")
    assert {m.step: m.value for m in history} == {0: 0.0, 1: 1.0}  # step 2 raised first

    ckpt = _ckpt(tmp_path)
    assert ckpt["global_step"] == 2  # written after the skipped step 1, none after step 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    digests = weights_after(record, 0)
    assert digests[2]["digest"] == digests[1]["digest"] and digests[2]["finite"]

    # the same run (the poison is part of its config) resumed with K=3: step 2 is poisoned
    # again and skipped (the streak of step 1 came back from the checkpoint: 2 < 3), step 3
    # trains, the run finishes on finite weights
    resumed = ("resume=auto", "trainer.fail_after_nonfinite_steps=3", poison([1, 2], record))
    result = train(compose_cfg(*run, *resumed))
    assert math.isfinite(result["metrics"]["train/loss"])
    ckpt = _ckpt(tmp_path)
    assert ckpt["global_step"] == 4 and ckpt["vlmlab"]["nonfinite"]["total"] == 2
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


def test_non_finite_weights_are_never_checkpointed(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A weight turned NaN at step 2 (no skipped step can undo that): the step-2 checkpoint is
    refused with an error and the run ends FAILED; last.ckpt stays the one after step 1, finite.
    """
    from vlmlab.train import train

    with pytest.raises(NonFiniteError, match="trainable weights are not finite at step 3"):
        train(compose_cfg(*STAGE1, "trainer.max_steps=4", poison([2], where="weights")))
    ckpt = _ckpt(tmp_path)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    _, run = _mlflow(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteError: trainable weights are not finite")


# ---- several ranks: the skip is collective (slow) --------------------------------------------

DISTRIBUTED = (
    "stage=1",
    "data.batch_size=4",
    "stage.global_batch_size=8",  # 4 per rank x 2 ranks: one micro-batch per step
    "trainer.max_steps=4",
    "logger=none",
)


def _check_collective_skip(record: Path, same_on_ranks: bool) -> None:
    """Step 1 was poisoned on rank 1 only: on both ranks the weights after step 2 are those
    after step 1 (that step changed nothing), every other step changed them, all stay finite."""
    for rank in (0, 1):
        after = weights_after(record, rank)
        assert sorted(after) == [1, 2, 3, 4], rank
        assert all(entry["finite"] for entry in after.values()), rank
        assert after[2]["digest"] == after[1]["digest"], rank  # the poisoned step: no update
        assert after[3]["digest"] != after[2]["digest"], rank  # training went on
    if same_on_ranks:  # DDP replicas stay identical
        d0, d1 = weights_after(record, 0), weights_after(record, 1)
        assert all(d0[s]["digest"] == d1[s]["digest"] for s in d0)


@pytest.mark.slow
def test_ddp_skips_on_every_rank_when_one_rank_sees_a_nan(tmp_path: Path, data_root: Path) -> None:
    """2 gloo ranks; NaN written into rank 1's gradients after DDP's all-reduce, so rank 0's
    gradients are clean: both ranks must skip (a rank that stepped alone would leave the
    replicas different; one that did not skip at all would turn rank 1's weights into NaN)."""
    record = tmp_path / "poison"
    run_train(
        tmp_path,
        data_root,
        *DISTRIBUTED,
        "trainer.strategy=ddp",
        "trainer.devices=2",
        poison([1], record, where="grad", rank=1),
    )
    _check_collective_skip(record, same_on_ranks=True)
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


@pytest.mark.slow
def test_fsdp_skips_on_every_rank_when_one_shard_sees_a_nan(
    tmp_path: Path, data_root: Path
) -> None:
    """trainer=fsdp_cpu (FSDP2 over gloo): NaN in rank 1's gradient shard only. Both ranks skip
    the step (each rank's shard unchanged), every rank still ran its forward and backward (the
    collectives of the next steps complete), and the run finishes with finite weights."""
    record = tmp_path / "poison"
    run_train(
        tmp_path,
        data_root,
        *DISTRIBUTED,
        "trainer=fsdp_cpu",
        poison([1], record, where="grad", rank=1),
    )
    _check_collective_skip(record, same_on_ranks=False)
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())
