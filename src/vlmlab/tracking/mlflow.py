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


def git_commit() -> dict[str, str]:
    """Commit and dirty flag of the working tree, when there is one."""
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return {
            "git.commit": commit.stdout.strip(),
            "git.dirty": str(bool(dirty.stdout.strip())).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}
