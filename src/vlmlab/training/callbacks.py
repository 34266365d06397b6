"""The training-level callbacks of a stage: data position, resumable checkpoints, throughput,
the sample audit, and `trainer.extra_callbacks`. The recipe (`train.build_callbacks`) adds
evaluation, tracking and launch callbacks around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from vlmlab.data.datamodule import StreamPosition
from vlmlab.errors import ConfigError
from vlmlab.training.audit import SampleRecorder
from vlmlab.training.resumable import EpochEndCheckpoint, StepCheckpoint
from vlmlab.training.throughput import FlopsModel, Throughput


def training_callbacks(
    model: nn.Module,
    resume_dir: Path,
    every_n_steps: int,
    peak_flops: float | None = None,
    record_samples: str | None = None,
) -> list[L.Callback]:
    """Where the data stream is, `last.ckpt` every N steps and at epoch ends, throughput/MFU,
    and (debug.record_samples) which samples went into which step."""
    callbacks: list[L.Callback] = [
        StreamPosition(),
        StepCheckpoint(str(resume_dir), every_n_steps),
        EpochEndCheckpoint(str(resume_dir)),  # a resume never replays a finished epoch
        Throughput(FlopsModel.of(model), peak_flops),
    ]
    if record_samples:
        callbacks.append(SampleRecorder(record_samples))
    return callbacks


def extra_callbacks(specs: list[Any]) -> list[L.Callback]:
    """`trainer.extra_callbacks`: Lightning callbacks given as `{_target_: ..., **kwargs}`."""
    from hydra.utils import instantiate

    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"got {spec!r}.",
                "give a mapping with `_target_: package.module.CallbackClass` and its arguments.",
            )
        try:
            callback = instantiate(spec)
        except Exception as err:
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"could not build {spec['_target_']}: {err}",
                "check the import path and the arguments.",
            ) from err
        if not isinstance(callback, L.Callback):
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"{spec['_target_']} is not a lightning.Callback.",
            )
        built.append(callback)
    return built
