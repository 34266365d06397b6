"""The run's logger, chosen by `logger.kind` from a registry, and what a run logs at its start
and end (config, parameters, lineage tags, the checkpoint it wrote, evaluation results).

`conf/logger/<name>.yaml` sets `kind`: a registered name (`mlflow`, `none`) or the dotted path
of a factory `(LoggerConfig, RunIdentity) -> Lightning logger | None`, so a new logger is one
function plus one YAML. Only `vlmlab.tracking` calls MLflow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmlab.checkpoints.meta import CheckpointMeta, read_meta
from vlmlab.errors import ConfigError
from vlmlab.schema import LoggerConfig
from vlmlab.tracking import journal
from vlmlab.tracking.datasets import DataInput, link_data_runs, log_inputs
from vlmlab.tracking.mlflow import flatten, git_commit, run_link, run_name, tracking_uri
from vlmlab.tracking.models import register_checkpoint
from vlmlab.tracking.sweep_job import SWEEP_ID_TAG, parent_run_id, swept_keys, swept_values
from vlmlab.tracking.ui import announce, mark_training, runs_url, save_view, ui_base

log = logging.getLogger(__name__)

# Hydra groups that become plain tags next to `choice.<group>` (MLflow UI columns).
_TAGGED_GROUPS = ("encoder", "connector", "llm", "stage", "data", "experiment")


@dataclass(frozen=True)
class RunIdentity:
    """What names and tags a run: its stage, Hydra choices and overrides, where it writes."""

    stage: str
    root: Path  # paths.root: the default MLflow store and artifact folder live here
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    resume_run_id: str | None = None  # a resumed run continues its MLflow run
    tags: dict[str, str] = field(default_factory=dict)  # more tags (data checksum ...)


@dataclass(frozen=True)
class LoggerKind:
    """A registered logger: its factory and whether it writes to the MLflow store."""

    create: Callable[[LoggerConfig, RunIdentity], Any]
    mlflow: bool = False


def _mlflow_logger(settings: LoggerConfig, run: RunIdentity) -> Any:
    tags = {f"choice.{k}": v for k, v in run.choices.items()}
    tags.update({k: v for k, v in run.choices.items() if k in _TAGGED_GROUPS})
    tags["stage"] = run.stage
    tags.update(git_commit())
    tags.update(run.tags)
    parent = parent_run_id()
    if parent and run.resume_run_id is None:  # a sweep job: child of the sweep's parent run
        tags["mlflow.parentRunId"] = parent
        tags[SWEEP_ID_TAG] = parent  # the sweep's view filters on it (the parent has it too)
    name = settings.run_name or run_name(
        str(run.choices.get("stage", run.stage)), run.choices, run.overrides, swept_keys()
    )
    uri = tracking_uri(settings.tracking_uri, run.root)
    artifacts = str((run.root / "mlartifacts").resolve().as_uri())
    arguments: dict[str, Any] = {
        "experiment_name": settings.experiment_name,
        "run_name": name,
        "tracking_uri": uri,
        "tags": tags,
        "artifact_location": artifacts,
        "run_id": run.resume_run_id,
    }
    if not journal.is_remote(uri):  # a local store does not go away mid-run
        return coalescing_mlflow_logger()(**arguments)
    # a server may: writes are journaled under paths.root/tracking and sent in the background
    journal.configure_http(settings.http_timeout, settings.http_retries)
    policy = journal.SendPolicy(settings.retry_interval, settings.flush_timeout)
    return journal.journaled_logger(run.root, policy, **arguments)


def coalescing_mlflow_logger() -> type:
    """Lightning's MLFlowLogger that writes each step's metrics in one `log_batch`.

    Why: on a logging step three writers call the logger for the same step (LearningRateMonitor,
    the throughput callback, Lightning's own metrics), and each call was one synchronous SQLite
    transaction: about 2 % of a 0.25 s CPU step (benchmarks/step_overhead.py). Here the calls
    of one step are merged and written when Lightning saves the logger (right after it logs its
    own metrics), when another step's metrics arrive, or when the run ends: nothing waits longer
    than its step, and a failing run still writes what it logged (finalize flushes first).
    MLflow's async logging was tried instead: its thread cost more than it saved on CPU.
    """
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class CoalescingMLFlowLogger(MLFlowLogger):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pending: dict[str, float] = {}
            self._pending_step: int | None = None

        @rank_zero_only
        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            if self._pending and step != self._pending_step:
                self.flush()
            self._pending.update(metrics)
            self._pending_step = step

        def flush(self) -> None:
            """Write what this step logged so far (one log_batch)."""
            if not self._pending:
                return
            metrics, step = self._pending, self._pending_step
            self._pending, self._pending_step = {}, None
            MLFlowLogger.log_metrics(self, metrics, step)

        @rank_zero_only
        def save(self) -> None:
            self.flush()
            super().save()

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            self.flush()
            super().finalize(status)

    return CoalescingMLFlowLogger


def _no_logger(settings: LoggerConfig, run: RunIdentity) -> None:
    return None


LOGGERS: dict[str, LoggerKind] = {
    "mlflow": LoggerKind(_mlflow_logger, mlflow=True),
    "none": LoggerKind(_no_logger),
}


def register_logger(kind: str, create: Callable[..., Any], mlflow: bool = False) -> None:
    """Add a logger kind (`logger.kind: <kind>`)."""
    LOGGERS[kind] = LoggerKind(create, mlflow)


def logger_kind(settings: LoggerConfig) -> LoggerKind:
    """The registry entry `logger.kind` names (a dotted path imports a factory)."""
    kind = settings.kind
    if kind in LOGGERS:
        return LOGGERS[kind]
    if "." in kind:
        from hydra.utils import get_object

        try:
            return LoggerKind(get_object(kind))
        except Exception as err:  # any import failure is a config problem here
            raise ConfigError("logger.kind", f"cannot import {kind!r} ({err}).") from err
    raise ConfigError(
        "logger.kind",
        f"got {kind!r}.",
        f"use one of {sorted(LOGGERS)} or the dotted path of a logger factory.",
    )


def logger_settings(node: DictConfig) -> LoggerConfig:
    """The validated `logger` group as its typed settings."""
    data = OmegaConf.to_container(node, resolve=True)
    assert isinstance(data, dict)
    return LoggerConfig(**{str(k): v for k, v in data.items()})


def store_uri(settings: LoggerConfig, root: Path) -> str | None:
    """The MLflow store this run writes to, or None when the logger does not use MLflow."""
    return tracking_uri(settings.tracking_uri, root) if logger_kind(settings).mlflow else None


def build_logger(settings: LoggerConfig, run: RunIdentity) -> Any:
    """The Lightning logger of this run, or None (`logger=none`)."""
    return logger_kind(settings).create(settings, run)


@dataclass(frozen=True)
class RunStart:
    """What a run records before it trains (rank zero, fresh runs only)."""

    config: DictConfig  # the composed config without `hydra`
    overrides: list[str]
    stage: str
    table: str  # trainable-parameter table
    trainable: dict[str, int]  # component -> trainable parameters
    lrs: dict[str, float]  # optimizer group -> learning rate
    world_size: int
    accumulation: int
    init: Path | None = None  # the checkpoint the stage starts from
    inputs: list[DataInput] = field(default_factory=list)  # the data, as MLflow dataset inputs


def log_run_start(logger: Any, start: RunStart) -> None:
    """Config params for any logger; overrides, parameter table, dataset inputs, the stage's
    runs-table view and lineage for MLflow."""
    logger.log_hyperparams(flatten(start.config))
    run_id = getattr(logger, "run_id", None)
    client: Any = getattr(logger, "experiment", None) if run_id else None
    if client is None or run_id is None or not hasattr(client, "log_text"):
        return
    # Lightning created the experiment lazily, at the first write (an absent server is a clear
    # error there: tracking/journal.py); it becomes a model-training one here (tracking/ui.py)
    mark_training(client, client.get_experiment(logger.experiment_id))
    log_inputs(client, run_id, start.inputs)
    link_data_runs(client, run_id, start.inputs)
    swept = swept_values(start.overrides)
    for key, value in swept.items():
        client.log_param(run_id, key, value)
    if not swept:  # a sweep's jobs share the sweep's view (tracking/sweep.py)
        stage_view(client, logger.experiment_id, start)
    client.log_text(run_id, OmegaConf.to_yaml(start.config, resolve=True), "config.yaml")
    client.log_text(run_id, "\n".join(start.overrides) + "\n", "overrides.txt")
    client.log_text(run_id, start.table + "\n", "trainable_parameters.txt")
    for component, count in start.trainable.items():
        client.log_param(run_id, f"params.{component}.trainable", count)
    client.log_param(run_id, "trainer.world_size", start.world_size)
    client.log_param(run_id, "trainer.accumulate_grad_batches", start.accumulation)
    for group, lr in start.lrs.items():
        client.log_param(run_id, f"optim.group.{group}.lr", lr)
    if start.init is None:
        return
    client.set_tag(run_id, "init_from", str(start.init))
    parent_run = read_meta(start.init).mlflow_run_id
    if parent_run:  # lineage: `stage.init_from=<this tag's value>` reproduces the start
        client.set_tag(run_id, "vlmlab.parent_stage_run", parent_run)
        client.set_tag(run_id, "parent_stage_run", parent_run)  # older name, kept for readers
        client.set_tag(
            run_id,
            "mlflow.note.content",
            f"Stage {start.stage} started from run {run_link(client, parent_run)} "
            f"(checkpoint `{start.init}`).",
        )


def stage_view(client: Any, experiment_id: str, start: RunStart) -> None:
    """Save the view of this stage's runs and log the URL that opens it."""
    settings = logger_settings(start.config.logger)
    uri = tracking_uri(settings.tracking_uri, Path(str(start.config.paths.root)).resolve())
    key = f"vlmlab-stage-{start.stage}"
    save_view(
        client,
        experiment_id,
        key,
        f"Stage {start.stage} runs",
        f"tags.stage = '{start.stage}'",
        tags=tuple(g for g in _TAGGED_GROUPS if g in ("encoder", "connector", "llm", "data")),
    )
    announce(
        f"stage {start.stage} runs",
        runs_url(ui_base(settings.ui_url, uri), experiment_id, key),
        uri,
    )


def log_checkpoint(
    logger: Any, path: Path, meta: CheckpointMeta, register_as: str | None = None
) -> None:
    """Tag the run with the checkpoint it wrote (what `runs:/<id>` resolves to) and its meta;
    `register_as`: also log it as the run's MLflow model, registered under that name."""
    run_id = getattr(logger, "run_id", None)
    client: Any = getattr(logger, "experiment", None) if run_id else None
    if client is None or run_id is None or not hasattr(client, "set_tag"):
        return
    client.set_tag(run_id, "checkpoint", str(path))
    client.log_text(run_id, json.dumps(meta.to_dict(), indent=1), "checkpoint_meta.json")
    if register_as is None:
        return
    params = {f"choice.{k}": str(v) for k, v in meta.choices.items()}
    params["stage"] = meta.stage
    try:
        register_checkpoint(
            client, run_id, path, register_as, meta.metrics, meta.global_step, params
        )
    except Exception as err:  # a server away at the very end: the checkpoint and its tag stand
        log.warning(
            "the checkpoint %s was not registered as an MLflow model (%s: %s); it is still "
            "reachable as runs:/%s",
            path,
            type(err).__name__,
            err,
            run_id,
        )
