"""A kill at the worst moment: at an epoch boundary, and while a run is finishing.

Resuming from the epoch-end checkpoint, or from the step checkpoint of the epoch's last batch
while the epoch-end one lies torn in `last.ckpt.tmp`, must train what an uninterrupted run
trains next (same samples in the same order) and end with equal weights (torch.equal, fp32
CPU). A run SIGKILLed while it finishes (final weights being published, or published but not
yet marked FINISHED) resumes with resume=auto into the same final checkpoint folder and the
same MLflow run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.conftest import REPO, TINY_DATA
from tests.test_scale import final_weights, train_command
from vlmlab import checkpoints
from vlmlab.training.audit import read_records
from vlmlab.training.resumable import EpochEndCheckpoint

# Stage 2 with LoRA (its dropout makes the random state matter; 60 trainable tensors), 48
# samples, batch 8: 6 steps per epoch, 2 epochs; step checkpoints every 3 steps, so step 6 (the
# epoch's last batch) writes one, then the epoch-end checkpoint replaces it.
LORA = ("stage=2_lora", "stage.lora.r=4", "stage.lora.alpha=8")  # lora dropout 0.05 stays
TENSORS = 60
RUN = (
    *LORA,
    "stage.init_from=null",
    "stage.epochs=2",
    "stage.evaluate=false",
    "checkpoint.every_n_steps=3",
    "logger=none",
    "seed=3",
)
STEPS_PER_EPOCH = 6


class EpochEndSnapshot(L.Callback):
    """Copies the resume folder once the first epoch-end checkpoint is written: `last.ckpt` is
    then the epoch-end checkpoint and `last.ckpt.prev` the step checkpoint of the last batch."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        (saver,) = [c for c in trainer.callbacks if isinstance(c, EpochEndCheckpoint)]
        shutil.copytree(saver.path.parent, self.out)


def _compose(root: Path, data_root: Path, *overrides: str) -> Any:
    from vlmlab.config import compose

    return compose([f"paths.root={root}", f"data.root={data_root}", *TINY_DATA, *RUN, *overrides])


def _trained(record: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["ids"]) for r in read_records(record)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Two epochs never interrupted; `snapshot/` holds its resume folder at the first epoch end."""
    from vlmlab.train import train

    root = tmp_path_factory.mktemp("uninterrupted")
    snapshot = f"{{_target_: tests.test_epoch_resume.EpochEndSnapshot, out: '{root / 'snapshot'}'}}"
    cfg = _compose(
        root,
        data_root,
        f"debug.record_samples={root / 'seen.jsonl'}",
        f"trainer.extra_callbacks=[{snapshot}]",
    )
    train(cfg)
    return root


@pytest.mark.parametrize("moment", ["epoch_end_written", "epoch_end_torn"])
def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(
    uninterrupted: Path, data_root: Path, tmp_path: Path, moment: str
) -> None:
    from vlmlab.train import resolve_resume, run_key, train

    snapshot = uninterrupted / "snapshot"
    end, step = snapshot / "last.ckpt", snapshot / "last.ckpt.prev"
    assert torch.load(end, weights_only=False)["global_step"] == STEPS_PER_EPOCH
    assert torch.load(step, weights_only=False)["global_step"] == STEPS_PER_EPOCH

    cfg = _compose(
        tmp_path, data_root, "resume=auto", f"debug.record_samples={tmp_path / 's.jsonl'}"
    )
    resume_dir = tmp_path / "resume" / run_key(cfg)
    resume_dir.mkdir(parents=True)
    shutil.copy2(snapshot / "run.json", resume_dir / "run.json")
    layout = json.loads((snapshot / "run.json").read_text())["layout"]  # the run's own
    assert layout["world_size"] == 1 and layout["batch_size"] == cfg.data.batch_size
    if moment == "epoch_end_written":
        shutil.copy2(end, resume_dir / "last.ckpt")
    else:  # killed while the epoch-end checkpoint was being written over the step checkpoint
        shutil.copy2(step, resume_dir / "last.ckpt")
        data = end.read_bytes()
        (resume_dir / "last.ckpt.tmp").write_bytes(data[: len(data) // 2])
    picked, _ = resolve_resume(cfg, resume_dir)
    assert picked == resume_dir / "last.ckpt"

    train(cfg)

    whole = _trained(uninterrupted / "seen.jsonl")
    assert [s for s, _ in whole] == list(range(2 * STEPS_PER_EPOCH))  # batch = global batch
    resumed = _trained(tmp_path / "s.jsonl")
    assert resumed == whole[STEPS_PER_EPOCH:], "the resumed run trained other samples"
    a, b = final_weights(uninterrupted), final_weights(tmp_path)
    assert a.keys() == b.keys() and len(a) == TENSORS
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ"


# ---- SIGKILL while finishing (real processes) ---------------------------------------------------

# Runs train.py and SIGKILLs itself at one exact moment, found through Python's audit events
# (raised before the operation): `epoch_end_write` when the epoch-end checkpoint (the third
# last.ckpt write: steps 3 and 6, then the epoch end) is about to replace the step-6 one,
# `final_save` when the stage checkpoint folder is renamed into place (its files are written,
# not yet published), `mark` when FINISHED is opened (the folder is published, the MLflow run
# tagged).
_KILL_AT = """
import os, runpy, signal, sys
from pathlib import Path
phase = sys.argv.pop(1)
writes = []
def hook(event, args):
    if phase == "epoch_end_write" and event == "os.rename":
        if Path(str(args[0])).name == "last.ckpt.tmp":
            writes.append(args[1])
            if len(writes) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
    if phase == "final_save" and event == "os.rename":
        src, dst = Path(str(args[0])), Path(str(args[1]))
        if dst.parent.name == "checkpoints" and src.name == dst.name + ".tmp":
            os.kill(os.getpid(), signal.SIGKILL)
    if phase == "mark" and event == "open" and str(args[0]).endswith("/FINISHED"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["epoch_end_write", "final_save", "mark"])
def test_a_run_killed_while_finishing_resumes_into_one_checkpoint_and_one_mlflow_run(
    tmp_path: Path, data_root: Path, phase: str
) -> None:
    from mlflow import MlflowClient

    overrides = (*LORA, "stage.init_from=null", "stage.evaluate=false", "data.batch_size=8")
    overrides += ("stage.global_batch_size=8", "checkpoint.every_n_steps=3", "logger.samples=0")
    command, env = train_command(tmp_path, data_root, *overrides)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT, phase, *command[2:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (resume_dir,) = (tmp_path / "resume").iterdir()
    assert not (resume_dir / "FINISHED").exists()
    folders = list((tmp_path / "checkpoints").glob("*"))
    if phase == "epoch_end_write":
        assert not folders and (resume_dir / "last.ckpt.tmp").is_file()
    else:
        assert len(folders) == 1 and folders[0].name.endswith(".tmp") == (phase == "final_save")
    last = torch.load(resume_dir / "last.ckpt", weights_only=False)  # what resume=auto picks
    assert last["global_step"] == 6  # step 6's checkpoint, or the epoch end after it

    resumed = subprocess.run(
        [*command, "resume=auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (final,) = (tmp_path / "checkpoints").iterdir()  # one final checkpoint, no stray .tmp
    assert (final / checkpoints.META).is_file() and checkpoints.read_meta(final).complete
    assert (resume_dir / "FINISHED").read_text().strip() == str(final)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlmlab")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])  # one MLflow run
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"] == str(final)
    weights = final_weights(tmp_path)  # the weights of step 6: nothing trained twice
    assert len(weights) == TENSORS
    for name, tensor in weights.items():
        assert torch.equal(tensor, last["state_dict"][f"model.{name}"]), name
