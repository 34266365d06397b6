"""Sweep tracking: one MLflow parent run per Hydra multirun, and the keys the sweep varies.

Parent/child: `MlflowSweepCallback.on_multirun_start` (main process, before any job) creates
the parent run, records the sweep command and overrides, writes `mlflow_parent.json` into the
sweep dir and exports `VLMLAB_MLFLOW_PARENT_RUN_ID`, which every launcher hands to its jobs
(same process for `basic`, inherited environment for `joblib` workers and submitit jobs).
Each job's run gets the `mlflow.parentRunId` tag (`sweep_job.parent_run_id`). `on_multirun_end`
counts the children and ends the parent; if a job fails Hydra raises before
`on_multirun_end`, so an exit hook ends the parent FAILED instead of leaving it RUNNING.

DDP ranks of a sweep job (each rank runs only its job) are launch code: `vlmlab.distributed`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vlmlab.tracking.sweep_job import KEYS_ENV, PARENT_ENV, SWEEP_ID_TAG
from vlmlab.tracking.ui import announce, ensure_experiment, runs_url, save_view, ui_base

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
SWEEP_TAG = "vlmlab.sweep"


def sweep_keys(overrides: list[str]) -> list[str]:
    """Keys of the overrides that are sweeps (`a,b`, `range(...)`, `choice(...)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def parent_name(stage: str, swept: list[str]) -> str:
    """`sweep-stage1-connector-seed`: what the sweep varies (by the keys' last parts)."""
    keys = [k.split(".")[-1] for k in swept]
    return "-".join(["sweep", *([] if "stage" in swept else [f"stage{stage}"]), *keys])


def sweep_view(
    client: Any, experiment_id: str, run_id: str, swept: list[str], config: DictConfig, uri: str
) -> str:
    """Save the view of the sweep's runs (the parent and its jobs, the swept keys as columns)
    and log the URL that opens it."""
    key = f"vlmlab-sweep-{run_id[:12]}"
    save_view(
        client,
        experiment_id,
        key,
        parent_name(str(config.stage.name), swept),
        f"tags.`{SWEEP_ID_TAG}` = '{run_id}'",
        params=tuple(f"sweep.{k}" for k in swept),
    )
    url = runs_url(ui_base(OmegaConf.select(config, "logger.ui_url"), uri), experiment_id, key)
    announce("the sweep's runs", url, uri)
    return url


class MlflowSweepCallback(Callback):
    """Hydra callback: one MLflow parent run for a multirun, children tagged with its id."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.url: str | None = None  # the sweep's runs table in the MLflow UI

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vlmlab.tracking.logger import logger_settings, store_uri

        root = Path(config.paths.root).resolve()
        uri = store_uri(logger_settings(config.logger), root)
        if uri is None:  # a logger kind without an MLflow store: no runs to nest
            return
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        name = str(config.logger.experiment_name)
        artifacts = (root / "mlartifacts").resolve().as_uri()
        experiment_id = ensure_experiment(client, name, artifacts)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(config.hydra.overrides.task)
        hydra_overrides = list(config.hydra.overrides.hydra)
        command = shlex.join([Path(sys.argv[0]).name, "-m", *overrides, *hydra_overrides])
        from vlmlab.tracking.mlflow import git_commit

        swept = sweep_keys(overrides)
        run = client.create_run(
            experiment_id,
            run_name=parent_name(str(config.stage.name), swept),
            tags={
                SWEEP_TAG: "parent",
                "vlmlab.sweep_dir": str(sweep_dir),
                "vlmlab.sweep_command": command[:5000],
                "mlflow.note.content": f"Sweep parent: `{command}`"[:5000],
                "hydra.launcher": str(
                    OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher") or "basic"
                ),
                **git_commit(),
            },
        )
        self.client, self.run_id = client, run.info.run_id
        client.set_tag(self.run_id, SWEEP_ID_TAG, self.run_id)
        params: dict[str, str] = {}  # a key given twice: the last value wins, as in Hydra
        for item in overrides:
            key, _, value = item.partition("=")
            params[f"sweep.{key.lstrip('+~')}"[:250]] = value[:6000]
        for key, value in params.items():
            client.log_param(self.run_id, key, value)
        client.log_text(self.run_id, command + "\n", "sweep_command.txt")
        client.log_text(self.run_id, "\n".join(overrides) + "\n", "overrides.txt")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(
            json.dumps({"run_id": self.run_id, "tracking_uri": uri, "experiment_id": experiment_id})
        )
        os.environ[PARENT_ENV] = self.run_id
        os.environ[KEYS_ENV] = json.dumps(swept)
        atexit.register(self._end, None)
        log.info("MLflow sweep parent run %s (%s)", self.run_id, command)
        self.url = sweep_view(client, experiment_id, self.run_id, swept, config, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    def _end(self, status: str | None) -> None:
        """End the parent once: FAILED if a child failed or Hydra never reached the end."""
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(KEYS_ENV, None)
        try:
            children = self.client.search_runs(
                [self.client.get_run(run_id).info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                max_results=10000,
            )
            counts: dict[str, int] = {}
            for child in children:
                counts[child.info.status] = counts.get(child.info.status, 0) + 1
            for state, count in counts.items():
                self.client.log_metric(run_id, f"sweep/jobs_{state.lower()}", count)
            failed = any(s != "FINISHED" for s in counts)
            final = "FAILED" if status is None or failed else status
            if status is None:
                self.client.set_tag(run_id, "error", "the sweep stopped before all jobs ended")
            self.client.set_terminated(run_id, final)
            if self.url:
                log.info("MLflow: the sweep's runs: %s", self.url)
        except Exception:  # never hide the sweep's own outcome behind a tracking error
            log.exception("could not end the MLflow sweep parent run %s", run_id)
