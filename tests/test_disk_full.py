"""A checkpoint write that fails (issue 17 item 6) on a real filesystem: a small tmpfs that is
full (ENOSPC) or mounted read-only (EROFS). The previous checkpoint is kept and loads, the
partial file is removed, the error names the path and says what to do, the run ends FAILED,
and `resume=auto` continues from the previous checkpoint once there is room.

tmpfs needs mount rights (root, as in CI); elsewhere these tests skip.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_scale import train_command
from vlmlab import checkpoints


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    folder = tmp_path / "tmpfs"
    mount_tmpfs(folder, "2m")
    yield folder
    unmount(folder)


def fill(folder: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the filesystem of `folder` (allocated, not sparse)."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(0, free - leave))
    return filler


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((60_000,), value)}  # 240 KB


@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_failed_save_keeps_the_previous_checkpoint(tmpfs: Path, failure: str) -> None:
    path = tmpfs / "resume" / "last.ckpt"
    checkpoints.atomic_torch_save(state(1.0), path)
    checkpoints.atomic_torch_save(state(2.0), path)  # last = 2.0, .prev = 1.0 (hard link)
    if failure == "full":
        fill(tmpfs, leave=100_000)
        expected = errno.ENOSPC
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        expected = errno.EROFS
    with pytest.raises(checkpoints.CheckpointWriteError) as raised:
        checkpoints.atomic_torch_save(state(3.0), path)
    message = str(raised.value)
    assert raised.value.errno == expected
    assert str(path) in message and "resume=auto" in message and "Fix:" in message
    assert os.strerror(expected) in message
    assert not path.with_name("last.ckpt.tmp").exists()  # the partial file gave its space back
    assert checkpoints.newest_loadable(path.parent) == path
    assert torch.equal(checkpoints.load_resumable(path)["w"], state(2.0)["w"])
    prev = path.with_name("last.ckpt.prev")
    assert torch.equal(checkpoints.load_resumable(prev)["w"], state(1.0)["w"])


def test_failed_stage_save_leaves_no_partial_folder(tmpfs: Path) -> None:
    """The final stage checkpoint (trainable weights + meta) on a full disk: no `.tmp` folder
    is left behind, the error names the folder."""
    fill(tmpfs, leave=50_000)
    out = tmpfs / "checkpoints" / "stage1"
    with pytest.raises(checkpoints.CheckpointWriteError, match=str(out)) as raised:
        checkpoints.save_trainable(torch.nn.Linear(1, 1), out, {"stage": "1"}, tensors=state(1.0))
    assert raised.value.errno == errno.ENOSPC
    assert not out.exists() and not out.with_name("stage1.tmp").exists()


RUN = (
    "stage=1",
    "stage.evaluate=false",
    "stage.epochs=2",  # 12 steps
    "data.batch_size=8",
    "stage.global_batch_size=8",
    "logger.samples=0",
    "checkpoint.every_n_steps=2",
)


@pytest.mark.slow
def test_full_disk_mid_run_fails_clearly_and_resumes(tmp_path: Path, data_root: Path) -> None:
    """Resume folder on a tmpfs: a run stops resumably at step 4 (checkpoint at step 4), the disk
    fills, the resumed run fails at its step-6 save: exit != 0, the error names last.ckpt and
    says resume=auto, its MLflow run is FAILED with that error, last.ckpt is still the step-4
    checkpoint and loads. With room again, resume=auto continues from step 4 to the end."""
    root = tmp_path / "run"
    resume = root / "resume"
    mount_tmpfs(resume, "8m")
    try:
        first, env = train_command(root, data_root, *RUN, "trainer.max_steps=4")
        done = subprocess.run(first, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (last,) = resume.glob("*/last.ckpt")
        assert checkpoints.load_resumable(last)["global_step"] == 4
        filler = fill(resume, leave=64_000)  # less than one checkpoint (about 320 KB)

        again, env = train_command(root, data_root, *RUN, "resume=auto")
        failed = subprocess.run(
            again, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert failed.returncode != 0
        assert f"could not write checkpoint {last}" in failed.stderr, failed.stderr[-3000:]
        assert "No space left on device" in failed.stderr and "resume=auto" in failed.stderr
        assert checkpoints.newest_loadable(last.parent) == last
        assert checkpoints.load_resumable(last)["global_step"] == 4
        assert not last.with_name("last.ckpt.tmp").exists()
        from mlflow import MlflowClient

        mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        (run,) = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
        assert run.info.status == "FAILED"
        assert str(last) in run.data.tags["error"]

        filler.unlink()  # room again
        done = subprocess.run(again, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming from {last}" in done.stdout + done.stderr
    finally:
        unmount(resume)
    metas = [checkpoints.read_meta(m.parent) for m in (root / "checkpoints").glob("*/meta.json")]
    (final,) = [m for m in metas if m.complete]  # the step-4 stop left an incomplete one
    assert final.global_step == 12
    (run,) = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert run.info.status == "FINISHED"  # the same MLflow run, continued
