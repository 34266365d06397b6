"""What a sweep job knows about its sweep: the parent run and the swept keys.

The sweep callback (tracking/sweep.py) sets two environment variables before Hydra launches the
jobs; a job's logger reads them here. Kept apart from the callback so the logger registry and
the callback can both use it without importing each other.
"""

from __future__ import annotations

import json
import os

PARENT_ENV = "VLMLAB_MLFLOW_PARENT_RUN_ID"
KEYS_ENV = "VLMLAB_SWEEP_KEYS"
SWEEP_ID_TAG = "vlmlab.sweep_id"  # the parent's run id, on the parent and every job's run


def parent_run_id() -> str | None:
    """The sweep's parent run id for the job running now, or None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return os.environ.get(PARENT_ENV) or None


def swept_keys() -> tuple[str, ...]:
    """Keys the running sweep varies (`connector=linear,mlp` -> connector); () outside a sweep."""
    return tuple(json.loads(os.environ.get(KEYS_ENV, "[]"))) if parent_run_id() else ()


def swept_values(overrides: list[str]) -> dict[str, str]:
    """This job's value of each swept key, as `sweep.<key>` params: the parent logs the same
    keys with every value, so the chart view's "Group by" groups the jobs by them."""
    keys = swept_keys()
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    return {f"sweep.{k}": given[k] for k in keys if k in given}
