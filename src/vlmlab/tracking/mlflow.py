"""MLflow setup: a SQLite store by default (MLflow 3 rejects the file store), tags from Hydra.

Lightning's MLFlowLogger does the run lifecycle; this module only decides where it points
and what identifies a run: every config-group choice becomes a tag, the resolved config is
flattened into params and the composed YAML is logged as an artifact.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000


_OURS: set[str] = set()  # URIs vlmlab handed to MLflow (mlflow.set_tracking_uri exports them)


def tracking_uri(configured: str | None, root: Path) -> str:
    """Config value, else the user's MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db.

    mlflow.set_tracking_uri copies the URI into os.environ, so an earlier run in the same
    process (a sweep, the demo, tests) would otherwise redirect every later run to its store.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    user_env = env if env and env not in _OURS else None
    uri = configured or user_env or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            "logger.tracking_uri",
            f"{uri!r} is a file store, which MLflow 3 keeps in maintenance mode.",
            "use sqlite:///path/mlflow.db or an http(s) server URI.",
        )
    if uri != user_env:
        _OURS.add(uri)
    return uri


def flatten(config: DictConfig) -> dict[str, Any]:
    """Resolved config as dotted params; values longer than MLflow's limit are truncated."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            text = str(node)
            flat[prefix] = (
                text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
            )

    walk(OmegaConf.to_container(config, resolve=True), "")
    return flat


def git_commit(path: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the vlmlab source checkout; "unknown" without git or a checkout.

    Why: a run must say which code produced it, and a pip-installed vlmlab has no checkout.
    """
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    unknown = {"git.commit": "unknown", "git.dirty": "unknown"}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return unknown
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {
            "git.commit": commit.stdout.strip(),
            "git.dirty": str(bool(dirty.stdout.strip())).lower()
            if dirty.returncode == 0
            else "unknown",
        }
    except (OSError, subprocess.SubprocessError):
        return unknown


# Groups that say where/how a run executes, not what it computes: left out of run names.
_NOT_IN_NAME = ("stage", "experiment", "trainer", "logger", "paths")
_COMPONENTS = ("encoder", "connector", "llm")


def run_name(
    stage: str, choices: dict[str, str], overrides: list[str], swept: tuple[str, ...] = ()
) -> str:
    """Short name that tells arms apart in the MLflow runs table: `s1-mlp-clip336-seed1`.

    In a sweep, the values of the keys it varies (`swept`); otherwise the groups chosen on the
    command line (without any: the encoder/connector/llm choices). A group shows its choice
    (`mlp`), another key `name=value` by its last name part (`image_size=48`); the seed comes
    last. The full choices are tags and params.
    """
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    if swept:
        keys = [k for k in swept if k in given and k != "seed" and k not in _NOT_IN_NAME]
    else:
        keys = sorted(k for k in choices if k in given and k not in _NOT_IN_NAME and "/" not in k)
        if not keys:
            keys = [c for c in _COMPONENTS if c in choices]
    parts = [f"s{stage}"]
    for key in keys:
        parts.append(choices[key] if key in choices else f"{key.split('.')[-1]}={given[key]}")
    if "seed" in given:
        parts.append(f"seed{given['seed']}")
    return "-".join(parts)


def run_link(client: Any, run_id: str) -> str:
    """Markdown link to a run in the MLflow UI (relative, so it works on any server)."""
    try:
        run = client.get_run(run_id)
    except Exception:  # a run of another store: still give the id
        return f"`{run_id}`"
    return f"[{run.info.run_name or run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id})"
