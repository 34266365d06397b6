"""How a run ends in MLflow: FAILED with the error attached, KILLED on Ctrl-C.

Lightning's MLFlowLogger marks every exception "FAILED" (Ctrl-C included, then it calls
`sys.exit(1)`) and records nothing about the error; a run that fails before `fit` (data,
config) stays RUNNING forever. `track_outcome` wraps the whole run: on any exception it sets
the status from the *original* exception (seen by `ExceptionRecorder.on_exception`), puts
type, message and traceback into the `error` tag (truncated) and `error.txt`, and re-raises.
Metrics logged before the failure stay: the logger writes them synchronously.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 5000  # MLflow accepts 8000; leave room for multi-byte characters


class ExceptionRecorder(L.Callback):
    """Remembers the exception Lightning saw, before it turns Ctrl-C into `SystemExit(1)`."""

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.exception = exception


def status_for(exception: BaseException) -> str:
    """KILLED for an interrupt (Ctrl-C, SIGTERM), FAILED for everything else."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return "KILLED" if isinstance(exception, KeyboardInterrupt | SIGTERMException) else "FAILED"


def error_text(exception: BaseException) -> str:
    """`Type: message` then the traceback."""
    head = f"{type(exception).__name__}: {exception}"
    return head + "\n\n" + "".join(traceback.format_exception(exception))


def truncate_middle(text: str, limit: int = MAX_TAG_LENGTH) -> str:
    """Keep the start (type, message) and the end (innermost frames) of a long error."""
    if len(text) <= limit:
        return text
    keep = (limit - 20) // 2
    return text[:keep] + "\n... [truncated] ...\n" + text[-keep:]


def end_run(client: Any, run_id: str, exception: BaseException) -> str:
    """Attach the error to the run and terminate it; returns the status set."""
    status = status_for(exception)
    text = error_text(exception)
    try:
        client.set_tag(run_id, "error", truncate_middle(text))
        client.log_text(run_id, text, "error.txt")
        client.set_terminated(run_id, status)
    except Exception:  # the store itself may be what failed: keep the original error visible
        log.exception("could not record the failure of MLflow run %s", run_id)
    return status


@contextmanager
def track_outcome(logger: Any, recorder: ExceptionRecorder | None = None) -> Iterator[None]:
    """Around a run: on an exception, end the MLflow run as FAILED/KILLED with the error."""
    try:
        yield
    except BaseException as raised:
        run_id = getattr(logger, "_run_id", None) if logger is not None else None
        if run_id:  # only the rank that created the run has an id
            original = recorder.exception if recorder and recorder.exception else raised
            status = end_run(logger.experiment, run_id, original)
            log.error("MLflow run %s ended %s: %s", run_id, status, type(original).__name__)
        raise
