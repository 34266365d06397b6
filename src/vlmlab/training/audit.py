"""`debug.record_samples: <path>`: which samples went into which optimizer step, per rank.

Why: "each sample exactly once per epoch, also across a crash and a resume" is a claim about
data order that a user should be able to audit on a real run, not only trust. Each rank appends
one JSON line per micro-batch to `<path stem>.rank<r>.jsonl`:

    {"rank": 0, "epoch": 0, "step": 3, "batch": 7, "ids": ["a12", ...]}

plus `step_loss` (the global token-mean loss of that step) on the batch that completed a step.

`step` is the optimizer step the batch contributes to (the trainer's global step when the batch
started), so the samples a checkpoint taken at global step s has trained on are exactly the
lines with step < s. Lines are flushed one by one: a killed process loses at most the batch it
was in, which no checkpoint contains anyway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import lightning as L


def rank_file(path: str | Path, rank: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}.jsonl")


def read_records(path: str | Path, rank: int | None = None) -> list[dict[str, Any]]:
    """The records of one rank, or of every rank file next to `path` when rank is None."""
    path = Path(path)
    files = (
        [rank_file(path, rank)]
        if rank is not None
        else sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))
    )
    out = []
    for file in files:
        if file.is_file():
            out += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return out


class SampleRecorder(L.Callback):
    """Appends (rank, epoch, optimizer step, batch index, sample ids) for every micro-batch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = rank_file(self.path, trainer.global_rank)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(target, "a", encoding="utf-8")  # noqa: SIM115 (closed at train end)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if self._file is None:
            return
        record: dict[str, Any] = {
            "rank": trainer.global_rank,
            "epoch": trainer.current_epoch,
            "step": self._step,
            "batch": _batch_index(*_),
            "ids": [str(i) for i in batch.get("ids", [])],
        }
        loss = getattr(pl_module, "last_step_loss", None)
        if trainer.global_step != self._step and loss is not None:
            # this batch completed the step: its global loss (a device tensor: a debug-only sync)
            record["step_loss"] = float(loss)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException
    ) -> None:
        self.on_train_end(trainer, pl_module)


def _batch_index(*args: Any) -> int | None:
    return int(args[0]) if args else None
