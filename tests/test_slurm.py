"""SLURM time limits (vlmlab.launch): the signal reaches every rank's save at one optimizer step,
the job is requeued, and the requeued job resumes its own checkpoint.

No SLURM here: the jobs are real processes with the SLURM_* variables srun sets (Lightning's
SLURMEnvironment then maps them to ranks, as on a cluster), real signals and real 2-rank DDP
(gloo). `scontrol` is absent, so the requeue is attempted and its failure handled. The sbatch
script is the one submitit writes for the composed `hydra/launcher=slurm` preset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmlab import checkpoints
from vlmlab.launch import (
    MARKER,
    REQUEUE_SIGNALS,
    lightning_root,
    requeue_command,
    requeued_checkpoint,
    slurm_job_id,
)

ROOT = Path(__file__).resolve().parents[1]


def test_job_ids_and_the_requeue_command() -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "4242"}) == "4242"
    # submitit sweeps are job arrays: requeue the array task, not the whole array
    array = {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_job_id(array) == "4242_3"
    assert requeue_command(array) == ["scontrol", "requeue", "4242_3"]
    assert slurm_job_id({}) is None and requeue_command({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "42; rm -rf /"}) is None


def test_a_requeued_job_resumes_only_its_own_checkpoint(tmp_path: Path) -> None:
    job = {"SLURM_JOB_ID": "4242"}
    assert requeued_checkpoint(tmp_path, job) is None  # nothing recorded
    old = tmp_path / "last.ckpt"
    checkpoints.atomic_torch_save({"global_step": 3}, old)  # another run of this config
    past = time.time() - 100
    os.utime(old, (past, past))
    (tmp_path / MARKER).write_text(json.dumps({"job_id": "4242"}))  # this job started
    assert requeued_checkpoint(tmp_path, job) is None  # older than this job: not ours
    checkpoints.atomic_torch_save({"global_step": 7}, old)  # this job saved, then was requeued
    assert requeued_checkpoint(tmp_path, job) == old
    assert requeued_checkpoint(tmp_path, {"SLURM_JOB_ID": "5000"}) is None  # a new job
    assert requeued_checkpoint(tmp_path, {}) is None  # not under SLURM
    (tmp_path / "FINISHED").write_text("done\n")  # the job finished after that save
    assert requeued_checkpoint(tmp_path, job) is None
    assert lightning_root(tmp_path) == tmp_path / "lightning"


def test_the_slurm_preset_signals_every_task_with_a_signal_vlmlab_handles(
    compose_cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sbatch script submitit writes for `hydra/launcher=slurm`, through the same calls as
    hydra_submitit_launcher's SlurmLauncher.launch (submitit checks only that `srun` exists)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmJobEnvironment

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_cfg("hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8")
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    params["submitit_folder"] = str(tmp_path / "submitit")
    init_keys = {"max_num_timeout", "python", "submitit_folder"}
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params["submitit_folder"],
        **{f"slurm_{k}": v for k, v in params.items() if k in {"max_num_timeout", "python"}},
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{(k if k in base else f"slurm_{k}"): v for k, v in params.items() if k not in init_keys}
    )
    slurm_executor: Any = executor._executor
    sbatch = slurm_executor._make_submission_file_text("python -m job", "uid")
    lines = set(sbatch.splitlines())
    sent = SlurmJobEnvironment._usr_sig()  # what submitit asks SLURM for, and handles itself
    assert f"#SBATCH --signal={sent.name.removeprefix('SIG')}@300" in lines
    assert sent in REQUEUE_SIGNALS  # ... so vlmlab sees it on every rank
    assert "#SBATCH --requeue" in lines
    assert {
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
    } <= lines
    assert slurm_executor.max_num_timeout == 3  # submitit's count of requeues after a limit


JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import torch
    import lightning as L
    from vlmlab import checkpoints
    from vlmlab.launch import SlurmRequeue, lightning_root, requeued_checkpoint

    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    resume_dir = out / "resume"

    if os.environ.get("TEST_SUBMITIT"):  # what submitit's process_job does before the job runs
        import submitit
        from submitit.core.utils import DelayedSubmission

        class Job:
            def __call__(self):
                pass
            def checkpoint(self):
                return DelayedSubmission(self)

        env = submitit.JobEnvironment()
        env.paths.folder.mkdir(parents=True, exist_ok=True)
        delayed = DelayedSubmission(Job())
        delayed.set_timeout(60, 2)
        delayed.dump(env.paths.submitted_pickle)
        env._handle_signals(env.paths, delayed)

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 100_000
        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.full((4,), float(i % 7))

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Report(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 2:
                (out / f"ready.{rank}").touch()
        def on_exception(self, trainer, module, exception):
            (out / f"stopped.{rank}.json").write_text(json.dumps(
                {"step": trainer.global_step, "exception": type(exception).__name__}))

    ckpt = requeued_checkpoint(resume_dir)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        max_steps=max_steps, accumulate_grad_batches=2,
        callbacks=[SlurmRequeue(resume_dir), Report()],
        plugins=[checkpoints.atomic_checkpoint_io()],
        default_root_dir=lightning_root(resume_dir),
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(Slow(), batch_size=2),
                ckpt_path=str(ckpt) if ckpt else None)
    (out / f"done.{rank}.json").write_text(json.dumps(
        {"step": trainer.global_step, "resumed_from": str(ckpt) if ckpt else None}))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_job(out: Path, world: int, max_steps: int, **extra: str) -> list[subprocess.Popen]:
    """`srun --ntasks-per-node=<world>`: one process per task, SLURM's variables per rank."""
    script = out / "job.py"
    script.write_text(JOB)
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "vlmlab-test",
            "SLURM_NTASKS": str(world),
            "SLURM_NTASKS_PER_NODE": str(world),
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            **extra,
        }
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), str(max_steps)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _wait_ready(out: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all((out / f"ready.{r}").exists() for r in range(len(procs))):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
    pytest.fail(f"the job did not start training:\n{logs}")


def _wait_exit(procs: list[subprocess.Popen], out: Path, timeout: float = 180) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
            pytest.fail(f"a rank hung after the signal:\n{logs}")
    return codes


@pytest.fixture
def no_scontrol() -> None:
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol is installed: this test must not requeue a real job")


@pytest.mark.slow
def test_time_limit_signal_on_one_rank_saves_on_all_requeues_and_the_requeued_job_resumes(
    tmp_path: Path, no_scontrol: None
) -> None:
    """2 DDP ranks as srun starts them; USR1 (Lightning's requeue signal) reaches rank 1 only.
    Both ranks stop at the same optimizer step after one collective save, rank 0 attempts
    `scontrol requeue 4242`, nobody hangs; Lightning's own handler (an in-handler save to
    `hpc_ckpt_*`) never runs. Then the requeued incarnation resumes from that checkpoint."""
    first = tmp_path / "first"
    first.mkdir()
    procs = _start_job(first, world=2, max_steps=100_000)
    _wait_ready(first, procs)
    procs[1].send_signal(signal.SIGUSR1)
    codes = _wait_exit(procs, first)
    logs = [(first / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [1, 1], logs  # SystemExit with the message: not a success for submitit
    stopped = [json.loads((first / f"stopped.{r}.json").read_text()) for r in range(2)]
    assert {s["exception"] for s in stopped} == {"SlurmRequeued"}
    assert stopped[0]["step"] == stopped[1]["step"] >= 2
    ckpt = first / "resume" / "last.ckpt"
    assert checkpoints.is_loadable(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == stopped[0]["step"]
    assert "scontrol requeue 4242" in logs[0] and "NOT requeued" in logs[0]
    assert "scontrol" not in logs[1].split("SLURM job 4242")[0]  # rank 0 alone requeues
    assert not list(tmp_path.rglob("hpc_ckpt_*"))
    assert json.loads((first / "resume" / MARKER).read_text())["job_id"] == "4242"

    # the requeued job: same job id, SLURM_RESTART_COUNT=1, same command and resume folder
    (first / "ready.0").unlink()
    (first / "ready.1").unlink()
    target = stopped[0]["step"] + 3
    procs = _start_job(first, world=2, max_steps=target, SLURM_RESTART_COUNT="1")
    codes = _wait_exit(procs, first, timeout=300)
    assert codes == [0, 0], [(first / f"rank{r}.log").read_text()[-3000:] for r in range(2)]
    for rank in range(2):
        done = json.loads((first / f"done.{rank}.json").read_text())
        assert done == {"step": target, "resumed_from": str(ckpt)}


@pytest.mark.slow
def test_under_submitit_rank_0_hands_the_requeue_to_submitit_after_the_save(
    tmp_path: Path, no_scontrol: None
) -> None:
    """submitit's USR2 handler (installed as in its process_job) used to act at once on rank 0
    without a save. Now the save comes first, then submitit's handler runs: it re-dumps its
    job pickle (its timeout count) and calls `scontrol requeue` (absent here: it raises)."""
    procs = _start_job(
        tmp_path,
        world=1,
        max_steps=100_000,
        TEST_SUBMITIT="1",
        SUBMITIT_EXECUTOR="slurm",
        SUBMITIT_FOLDER=str(tmp_path / "submitit"),
    )
    _wait_ready(tmp_path, procs)
    pickle = next((tmp_path / "submitit").glob("*_submitted.pkl"))
    before = pickle.stat().st_mtime_ns
    procs[0].send_signal(signal.SIGUSR2)
    (code,) = _wait_exit(procs, tmp_path)
    log = (tmp_path / "rank0.log").read_text()
    assert code != 0, log
    stopped = json.loads((tmp_path / "stopped.0.json").read_text())
    assert stopped["exception"] == "FileNotFoundError"  # submitit's `scontrol requeue`
    assert "handing over to submitit" in log
    saved = torch.load(tmp_path / "resume" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == stopped["step"] >= 2
    assert pickle.stat().st_mtime_ns > before  # submitit checkpointed its job for the requeue
