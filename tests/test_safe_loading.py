"""Resumable checkpoints are read with torch's weights-only unpickler: a planted pickle payload
is refused, never executed (issue 17, item 7)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from vlmlab import checkpoints
from vlmlab.train import train

RUN = (
    "stage=2_lora",
    "stage.init_from=null",
    "stage.evaluate=false",
    "logger=none",
    "trainer.max_steps=3",
    "checkpoint.every_n_steps=1",
)


class Payload:
    """What an attacker plants: unpickling it makes a directory (any callable would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_a_planted_payload_is_refused_not_executed(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    train(compose_cfg(*RUN))  # stops at max_steps, resumably
    (last,) = (tmp_path / "resume").glob("*/last.ckpt")
    assert checkpoints.is_loadable(last)  # a real checkpoint reads with weights_only=True
    state = checkpoints.load_resumable(last)
    assert state["global_step"] == 3

    marker = tmp_path / "payload-ran"
    state["vlmlab"]["note"] = Payload(marker)
    torch.save(state, last)
    planted = tmp_path / "planted.ckpt"
    planted.write_bytes(last.read_bytes())

    assert not checkpoints.is_loadable(last)  # resume=auto skips it (to last.ckpt.prev)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.atomic_checkpoint_io().load_checkpoint(last)
    assert not marker.exists()
    # a resumed run does not run it either: it continues from the previous checkpoint
    assert checkpoints.newest_loadable(last.parent) == last.parent / "last.ckpt.prev"
    train(compose_cfg(*RUN, "trainer.max_steps=4", "resume=auto"))
    assert not marker.exists()
    assert checkpoints.load_resumable(last)["global_step"] == 4  # written anew, safely

    torch.load(planted, weights_only=False)  # the payload is real: the unsafe unpickler runs it
    assert marker.is_dir()
