"""The resumable checkpoints of a run: every N optimizer steps and at every epoch that ended.

Why not plain ModelCheckpoint: (1) with every_n_train_steps it never saves at an epoch end, so
a run killed early in epoch e+1 would replay the tail of epoch e; (2) Lightning >= 2.5 saves
`last.ckpt` once more in on_train_end, and after an early stop (trainer.max_steps, a stop
signal) that checkpoint records the epoch as finished: a resume would skip its remaining
batches. So: steps as configured, epoch ends only when the epoch's data ran out, nothing at
train end.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_steps` optimizer steps."""

    def __init__(self, dirpath: str, every_n_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_steps,
            enable_version_counter=False,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No save here: see the module docstring."""


class EpochEndCheckpoint(L.Callback):
    """`last.ckpt` at the end of every epoch whose data ran out.

    A callback of its own: ModelCheckpoint(save_top_k=0) writes `last` only in a step where it
    also wrote a top-k checkpoint, so at an epoch end it would write nothing.
    """

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hit_max_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if hit_max_steps or trainer.should_stop or trainer.sanity_checking:
            return  # stopped early: the epoch's data did not run out
        trainer.save_checkpoint(str(self.path))  # every rank: sharded saves are collective
