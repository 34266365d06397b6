"""Launch-side DDP plumbing for Hydra sweeps: each rank runs exactly its own job, once.

Lightning starts ranks > 0 by re-running `sys.argv` (plus `hydra.run.dir=...`, see
lightning/fabric/strategies/launchers/subprocess_script.py `_hydra_subprocess_cmd`). Under `-m`
that is the whole sweep again. The job exports its own overrides (`export_job_for_ranks`) and
the entry point of a rank > 0 swaps the sweep for them (`argv_for_rank`). `isolated_job` lets
the next sweep job in the same process start its DDP ranks afresh.

This is launch code, not tracking: it touches only argv, the environment and the process group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

JOB_ENV = "VLMLAB_SWEEP_JOB"
_LIGHTNING_RANK_ARGS = ("hydra.run.dir=", "hydra.job.name=", "hydra.output_subdir=")
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def export_job_for_ranks() -> None:
    """In a multirun job: tell Lightning-launched ranks > 0 which job they belong to."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra_cfg = HydraConfig.get()
    os.environ[JOB_ENV] = json.dumps(
        {"overrides": list(hydra_cfg.overrides.task), "output_dir": hydra_cfg.runtime.output_dir}
    )


def argv_for_rank(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """Command-line overrides for this process: a rank > 0 of a sweep job gets only its job.

    Lightning re-launches ranks with `[*sys.argv[1:], hydra.run.dir=..., hydra.job.name=...,
    hydra.output_subdir=null]` and `LOCAL_RANK` set; the job's overrides come from `JOB_ENV`.
    """
    env = os.environ if environ is None else environ
    if env.get("LOCAL_RANK", "0") in ("", "0") or not env.get(JOB_ENV):
        return argv
    if not any(a in ("-m", "--multirun") for a in argv):
        return argv
    job = json.loads(env[JOB_ENV])
    kept = [a for a in argv if a.startswith(_LIGHTNING_RANK_ARGS) and "hydra.run.dir=" not in a]
    return [*job["overrides"], f"hydra.run.dir={job['output_dir']}", *kept]


@contextmanager
def isolated_job() -> Iterator[None]:
    """Run one sweep job so that the next job in this process can start DDP afresh.

    Lightning's launcher exports MASTER_PORT, LOCAL_RANK, WORLD_SIZE... into this process and
    leaves the process group up; the next job would then think its ranks were started
    externally, start none, and talk to the previous job's dead rank 1. Undo both, but only
    when this process launched the ranks (torchrun/SLURM set LOCAL_RANK before we start).
    """
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        if saved["LOCAL_RANK"] is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
