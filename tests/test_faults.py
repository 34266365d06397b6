"""Surviving faults: atomic checkpoint writes, resume from the newest loadable checkpoint, and a
training run killed with SIGKILL that resumes to bit-identical weights and exactly one epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import REPO
from tests.test_scale import final_weights, run_train, run_until_killed
from vlmlab import checkpoints
from vlmlab.train import resolve_resume


def _state(step: int, size: int = 1000) -> dict:
    return {"global_step": step, "weights": torch.full((size,), float(step))}


def test_atomic_save_keeps_the_previous_checkpoint_and_resume_skips_a_torn_one(
    tmp_path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    io = checkpoints.atomic_checkpoint_io()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(1), last)
    time.sleep(0.01)  # distinct mtimes
    io.save_checkpoint(_state(2), last)
    assert torch.load(last, weights_only=False)["global_step"] == 2
    prev = tmp_path / "last.ckpt.prev"
    assert torch.load(prev, weights_only=False)["global_step"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    assert checkpoints.newest_loadable(tmp_path) == last

    # a torn file, as a non-atomic writer killed mid-copy leaves it (and a stray .tmp)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    (tmp_path / "last.ckpt.tmp").write_bytes(data[:100])
    assert not checkpoints.is_loadable(last)
    assert checkpoints.newest_loadable(tmp_path) == prev
    path, _ = resolve_resume(compose_cfg("resume=auto"), tmp_path)
    assert path == prev


_WRITER = """
import sys, torch
from pathlib import Path
from vlmlab.checkpoints import atomic_checkpoint_io
io, target = atomic_checkpoint_io(), Path(sys.argv[1])
step = 0
while True:  # a run that checkpoints over and over, ~160 MB each time
    step += 1
    io.save_checkpoint({"global_step": step, "w": [torch.full((1_000_000,), float(step)) for _ in range(40)]}, target)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(
    tmp_path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    last, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(last)], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a complete checkpoint, and the next one half written
            if last.is_file() and tmp.is_file() and tmp.stat().st_size > 10_000_000:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        else:
            pytest.fail("the writer never got to a second checkpoint")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_file() and not checkpoints.is_loadable(tmp)  # killed mid-write
    state = torch.load(last, weights_only=False)
    step = state["global_step"]
    assert all(torch.equal(t, torch.full((1_000_000,), float(step))) for t in state["w"])
    assert checkpoints.newest_loadable(tmp_path) == last
    path, _ = resolve_resume(compose_cfg("resume=auto"), tmp_path)
    assert path == last


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, data_root: Path
) -> None:
    """Stage 1, 48 samples, batch 2: 24 steps, checkpoints every 4. The run is killed with
    SIGKILL after a checkpoint and at least two more steps, resumed with resume=auto, and must
    end with the same weights (torch.equal, fp32 CPU) as a run that was never interrupted; the
    samples of committed steps (killed run before its checkpoint's step + resumed run) are one
    epoch, each sample once."""
    from vlmlab.training.audit import read_records

    common = (
        "stage=1",
        "stage.init_from=null",
        "data.batch_size=2",
        "stage.global_batch_size=2",
        "checkpoint.every_n_steps=4",
        "logger=none",
        "seed=3",
    )
    whole = tmp_path / "whole"
    run_train(whole, data_root, *common, f"debug.record_samples={whole / 'seen.jsonl'}")
    epoch = [i for r in read_records(whole / "seen.jsonl") for i in r["ids"]]
    assert len(epoch) == 48 == len(set(epoch))
    (end,) = whole.glob("resume/*/last.ckpt")  # the epoch-end checkpoint, after step 24's
    assert _load(end)["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 1

    root = tmp_path / "killed"
    killed_log = root / "killed.jsonl"

    def mid_epoch() -> bool:
        steps = [r["step"] for r in read_records(killed_log, rank=0)]
        return bool(list(root.glob("resume/*/last.ckpt")) and steps and max(steps) >= 6)

    run_until_killed(
        root, data_root, *common, f"debug.record_samples={killed_log}", ready=mid_epoch
    )
    (last,) = root.glob("resume/*/last.ckpt")
    resumed_at = _load(last)["global_step"]
    killed = read_records(killed_log)
    assert 4 <= resumed_at < 24 and max(r["step"] for r in killed) > resumed_at  # mid-epoch

    resumed_log = root / "resumed.jsonl"
    run_train(root, data_root, *common, "resume=auto", f"debug.record_samples={resumed_log}")
    resumed = read_records(resumed_log)
    assert min(r["step"] for r in resumed) == resumed_at  # picked up where the checkpoint stood

    a, b = final_weights(whole), final_weights(root)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    seen = [i for r in killed if r["step"] < resumed_at for i in r["ids"]]
    seen += [i for r in resumed for i in r["ids"]]
    assert len(seen) == len(set(seen)), "a sample was trained twice"
    assert sorted(seen) == sorted(epoch)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
