"""Run references resolved through the tracking store, and the run state a resume continues.

`stage.init_from=runs:/<id>` and `vlmlab eval <run id>` name a checkpoint by the MLflow run
that wrote it; the run's `checkpoint` tag (set by `log_checkpoint`) is the folder. Only this
package talks to MLflow: checkpoints stay path-based (`checkpoints.references` is syntax only).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmlab.checkpoints.lightning_io import write_error
from vlmlab.checkpoints.references import run_id_of
from vlmlab.errors import ConfigError

RUN_STATE = "run.json"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the store `vlmlab train` writes: sqlite:///$VLMLAB_ROOT/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(os.environ.get("VLMLAB_ROOT", "runs")).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def checkpoint_of_run(reference: str, tracking_uri: str | None, key: str) -> Path:
    """`runs:/<run_id>` or a bare run id -> the checkpoint folder that run recorded.

    `key` is the config key or argument that named the run, for the error message.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or default_tracking_uri()
    run_id = run_id_of(reference)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(key, f"MLflow run {run_id!r} not found in {uri}.") from err
    path = run.data.tags.get("checkpoint")
    if not path:
        raise ConfigError(key, f"MLflow run {run_id} has no checkpoint tag (did it finish?).")
    return Path(path)


@dataclass(frozen=True)
class RunState:
    """`<resume dir>/run.json`: what a resumed run continues (its start, its MLflow run, and
    the final checkpoint folder it names before writing it: a run killed after that write
    resumes into the same folder, so one run has one final checkpoint)."""

    init: str | None = None  # the checkpoint the stage started from
    hf_base: str | None = None  # the HF Llava folder it started from
    mlflow_run_id: str | None = None
    final: str | None = None  # the stage checkpoint folder of this run, once named
    # the data layout the run started with (`split.Layout`): a resume at another world size
    # replays its batches (data.elastic=exact) and sizes the LR schedule as it did
    layout: dict[str, int] | None = None

    @classmethod
    def read(cls, folder: Path) -> RunState:
        path = Path(folder) / RUN_STATE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            **{k: data.get(k) for k in ("init", "hf_base", "mlflow_run_id", "final", "layout")}
        )

    def write(self, folder: Path) -> None:
        """Atomically (a kill mid-write leaves the previous state, never a torn file)."""
        tmp = Path(folder) / (RUN_STATE + ".tmp")
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(self)))
            os.replace(tmp, Path(folder) / RUN_STATE)
        except OSError as err:  # disk full, read-only: say where and what to do
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise write_error(Path(folder) / RUN_STATE, err, None, "the run state") from err
