"""SLURM time limits: every rank saves at the same optimizer step, the job is requeued and the
requeued job resumes its own checkpoint.

What happens without this (Lightning 2.6 + submitit 1.5, read from their sources):
- `hydra/launcher=slurm` (submitit) writes `#SBATCH --signal=USR2@<signal_delay_s>`; SLURM
  sends USR2 to every task of the job step. submitit's handler (installed in every task by
  `process_job`) acts on task 0 only: it requeues and `sys.exit`s, or, once `max_num_timeout`
  is used up, raises. Either way rank 0 dies mid-step without a save and the other ranks wait
  in their next collective until SLURM kills them.
- Lightning's own SLURM handler listens to SIGUSR1 (never sent here) and, where it is sent,
  runs `trainer.save_checkpoint` *inside the signal handler*: a collective started wherever
  each rank happens to be (mid-backward on one, between steps on another) can pair with the
  wrong collective. It writes `hpc_ckpt_<n>.ckpt` into `default_root_dir`, and Lightning
  restores the newest `hpc_ckpt_*` of that folder into *any* later fit run under SLURM
  (`_CheckpointConnector._hpc_resume_path`): with a shared `root/lightning`, an unrelated run.

Here (`SlurmRequeue`): the handler only records the signal (USR1 or USR2, on any rank). At the
end of each optimizer step all ranks all-reduce "did anyone get it?"; if so, every rank saves
`resume/<run key>/last.ckpt` together (a normal, collective Lightning save at a safe point),
then rank 0 requeues: through submitit's own handler when it is installed (so its
`max_num_timeout` count and pickle stay right), else `scontrol requeue <job>`. Then every
rank leaves with `SlurmRequeued` (a SystemExit: submitit writes no result, the job is
pending again). Installing the handler before Lightning registers its own also keeps
Lightning's in-handler save off (it installs none where a SIGUSR1 handler exists).

The requeued job keeps its job id; `requeued_checkpoint` finds the checkpoint this job saved
(recorded in `slurm_job.json` beside it) and resume takes it whatever `resume` says.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vlmlab import checkpoints

log = logging.getLogger(__name__)

# USR2: what submitit asks sbatch to send (`--signal=USR2@<signal_delay_s>`); USR1: Lightning's
# convention, what a hand-written `#SBATCH --signal=USR1@300` script sends.
REQUEUE_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGUSR1)
MARKER = "slurm_job.json"
CHECKPOINT = "last.ckpt"


class SlurmRequeued(SIGTERMException):
    """Raised on every rank after the save: the job was handed back to SLURM.

    A SystemExit (Lightning's SIGTERMException), so that submitit records no result for the
    requeued job and the MLflow run ends KILLED, not FAILED."""


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task (submitit's
    sweeps are arrays), else SLURM_JOB_ID; None outside SLURM. Requeueing keeps it."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else env.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return None
    return job


def requeue_command(environ: Mapping[str, str] | None = None) -> list[str] | None:
    job = slurm_job_id(environ)
    return ["scontrol", "requeue", job] if job else None


def lightning_root(resume_dir: Path) -> Path:
    """Lightning's `default_root_dir` for a run: inside its own resume folder, so that the
    `hpc_ckpt_*` files Lightning auto-loads under SLURM can only be this run's."""
    return Path(resume_dir) / "lightning"


def requeued_checkpoint(resume_dir: Path, environ: Mapping[str, str] | None = None) -> Path | None:
    """The checkpoint to continue when this SLURM job is a requeued incarnation of itself.

    Only a checkpoint written by this job (same job id as `slurm_job.json`, saved after the
    job first started) counts, and not when the job already finished afterwards: a fresh
    job of the same config never picks up another run's checkpoint this way."""
    job = slurm_job_id(environ)
    marker = Path(resume_dir) / MARKER
    if job is None or not marker.is_file():
        return None
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("job_id") != job:
        return None
    path = checkpoints.newest_loadable(Path(resume_dir))
    if path is None:
        return None
    saved = checkpoints.saved_at(path)
    if saved < marker.stat().st_mtime_ns:
        return None  # older than this job: another run's
    finished = Path(resume_dir) / "FINISHED"
    if finished.is_file() and finished.stat().st_mtime_ns >= saved:
        return None
    log.info("SLURM job %s was requeued: resuming its checkpoint %s", job, path)
    return path


_Handler = Callable[[int, FrameType | None], Any] | int | None


class SlurmRequeue(L.Callback):
    """Save on every rank at one optimizer step when SLURM signals the time limit, requeue, exit.

    Active in a SLURM job (SLURM_JOB_ID set) and in the main thread. See the module docstring.
    """

    def __init__(
        self,
        resume_dir: str | Path,
        signals: tuple[signal.Signals, ...] = REQUEUE_SIGNALS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.resume_dir = Path(resume_dir)
        self.signals = signals
        self.environ = environ
        self.received: int | None = None
        self.requeue_attempt: list[str] | None = None
        self._previous: dict[int, _Handler] = {}
        self._step_seen = -1

    @property
    def active(self) -> bool:
        return slurm_job_id(self.environ) is not None

    # -- handlers ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else here: the save happens at a step boundary

    def _install(self) -> None:
        if not self.active or self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("SLURM requeue: not in the main thread, no signal handler installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        log.info(
            "SLURM job %s: on %s every rank saves %s at the next optimizer step, then requeue",
            slurm_job_id(self.environ),
            "/".join(s.name for s in self.signals),
            self.resume_dir / CHECKPOINT,
        )

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning's register_signal_handlers, which then leaves SIGUSR1 to us
        if stage == "fit":
            self._install()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            self.resume_dir.mkdir(parents=True, exist_ok=True)
            env = os.environ if self.environ is None else self.environ
            marker = {
                "job_id": slurm_job_id(self.environ),
                "restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0),
                "started_at": time.time(),
            }
            path = self.resume_dir / MARKER
            # written once per job: a requeued incarnation keeps its first start time
            if not path.is_file() or json.loads(path.read_text()).get("job_id") != marker["job_id"]:
                path.write_text(json.dumps(marker))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._previous or trainer.global_step == self._step_seen:
            return  # inactive, or a micro-batch that only accumulated gradients
        self._step_seen = trainer.global_step
        # every rank, every optimizer step: a signal seen by any rank stops all at this step
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.resume_dir / CHECKPOINT
        log.warning(
            "SLURM time limit signal: saving %s at step %d on every rank",
            path,
            trainer.global_step,
        )
        trainer.save_checkpoint(str(path))  # collective, at the same step on every rank
        outcome = "saved; requeue is rank 0's"
        if trainer.is_global_zero:
            outcome = self._requeue()
        raise SlurmRequeued(
            f"SLURM job {slurm_job_id(self.environ)}: saved {path} at step "
            f"{trainer.global_step}; {outcome}"
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    # -- requeue ----------------------------------------------------------------------------
    def _requeue(self) -> str:
        """Rank 0: hand over to submitit's handler if it is installed, else `scontrol requeue`."""
        signum = self.received if self.received is not None else int(self.signals[0])
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous) and _is_submitit_handler(previous):
            # submitit checkpoints its pickle, counts timeouts, runs `scontrol requeue` and
            # exits (SystemExit), or raises UncompletedJobError when max_num_timeout is used up
            log.warning(
                "SLURM requeue: handing over to submitit's %s handler", signal.Signals(signum).name
            )
            previous(signum, None)
            return "submitit returned without requeueing"
        command = requeue_command(self.environ)
        if command is None:
            return "not requeued (no SLURM job id)"
        self.requeue_attempt = command
        log.warning("SLURM requeue: %s", " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("SLURM requeue failed: `%s`: %s", " ".join(command), err)
            return f"NOT requeued: `{' '.join(command)}` failed: {err}"
        if result.returncode != 0:
            log.error("SLURM requeue failed: `%s`: %s", " ".join(command), result.stderr.strip())
            return f"NOT requeued: `{' '.join(command)}` exited {result.returncode}"
        return f"requeued (`{' '.join(command)}`)"


def _is_submitit_handler(handler: Callable[..., Any]) -> bool:
    owner = getattr(handler, "__self__", None)
    return type(owner).__module__.startswith("submitit.")
