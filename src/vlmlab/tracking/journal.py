"""Tracking that outlives its server: every write to a remote MLflow run is journaled on local
disk first and sent by a background thread; `vlmlab tracking sync` sends what is left.

Why: MLflow's HTTP client retries a request with exponential backoff for minutes
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_TIMEOUT`), inside the training loop,
and then raises: a tracking server that restarts stalled or killed the job. Here the training
thread only appends a JSON line to `<paths.root>/tracking/<run id>/journal.jsonl`; the sender
thread replays the lines in order and records the last one the server took (`sent`). While
the server is away the sender retries with a capped backoff; when it returns the backlog is
sent (metrics coalesced into batches) and the run ends with its real status. At the end a run
waits at most `logger.flush_timeout` seconds for an absent server, then says where its
metrics are and how to send them (`vlmlab tracking sync`). A SIGKILLed run leaves its journal
too: a resumed run (same MLflow run) sends the backlog first, or `sync` does.

Reads (get_run, search ...) and the run's creation stay synchronous: they need an answer.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_ROOT = "tracking"  # under paths.root: one folder per MLflow run
OPS = "journal.jsonl"
SENT = "sent"  # the seq of the last operation the server took
RUN = "run.json"  # run id and tracking URI of the journal
FILES = "files"  # copies of logged artifact files, one folder per operation
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# MlflowException codes that mean "the server is away or overloaded", not "the request is wrong".
TRANSIENT_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "ENDPOINT_NOT_FOUND",  # a proxy in front of a server that is still starting
    }
)


def journal_root(root: Path) -> Path:
    return Path(root) / JOURNAL_ROOT


def is_remote(uri: str) -> bool:
    """A tracking server reached over HTTP (what can go away mid-run)."""
    return uri.startswith(("http://", "https://"))


def configure_http(timeout_s: int, retries: int) -> None:
    """MLflow's per-request timeout and retries for this process (its settings are env vars).

    Why: with a journal the training thread never waits on HTTP, but MLflow's defaults (120 s
    timeout, 7 retries with backoff up to 2 min) would make the sender notice a returned
    server minutes late and make the end-of-run flush overrun `logger.flush_timeout`.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(retries))


def is_transient(error: BaseException) -> bool:
    """Worth retrying later: a connection or server-side failure, not a rejected request."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return str(error.error_code) in TRANSIENT_CODES
    return (
        isinstance(error, OSError | ConnectionError | TimeoutError)
        or "requests" in type(error).__module__
    )


class Journal:
    """The append-only operation log of one MLflow run, and how far the server has taken it."""

    def __init__(self, folder: Path, run_id: str, tracking_uri: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / RUN
        if not info.is_file():
            info.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
        self._lock = threading.Lock()
        entries = self.entries()
        self._seq = entries[-1]["seq"] if entries else 0

    @classmethod
    def open(cls, folder: Path) -> Journal:
        info = json.loads((Path(folder) / RUN).read_text())
        return cls(folder, info["run_id"], info["tracking_uri"])

    @property
    def tracking_uri(self) -> str:
        return str(json.loads((self.folder / RUN).read_text())["tracking_uri"])

    def append(self, op: str, args: dict[str, Any], files: Path | None = None) -> dict[str, Any]:
        """Record one operation (its artifact files copied in: the caller may delete them)."""
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, "op": op, "args": args}
            if files is not None:
                target = self.folder / FILES / str(self._seq)
                if files.is_dir():
                    shutil.copytree(files, target, dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(files, target / files.name)
                entry["files"] = str(target.relative_to(self.folder))
            with open(self.folder / OPS, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every complete line (a kill mid-append leaves a torn last line: ignored)."""
        path = self.folder / OPS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def sent(self) -> int:
        path = self.folder / SENT
        return int(path.read_text().strip() or 0) if path.is_file() else 0

    def mark_sent(self, seq: int) -> None:
        tmp = self.folder / (SENT + ".tmp")
        tmp.write_text(str(seq))
        os.replace(tmp, self.folder / SENT)

    def pending(self) -> list[dict[str, Any]]:
        done = self.sent()
        return [e for e in self.entries() if e["seq"] > done]


class _MemoryJournal(Journal):
    """Stands in for a journal that cannot be written: nothing on disk, nothing pending."""

    def __init__(self, run_id: str) -> None:  # no folder: the disk is what failed
        self.folder = Path("<not journaled: the disk could not be written>")
        self.run_id = run_id
        self._lock = threading.Lock()
        self._seq = 0

    def append(self, op: str, args: dict[str, Any], files: Path | None = None) -> dict[str, Any]:
        if files is not None:
            raise OSError("no journal to copy artifact files into")
        return {"seq": 0, "op": op, "args": args}  # seq 0: never marked sent

    def pending(self) -> list[dict[str, Any]]:
        return []

    def mark_sent(self, seq: int) -> None:
        pass


def _metrics_only(entry: dict[str, Any]) -> bool:
    args = entry["args"]
    return entry["op"] == "log_batch" and not args.get("params") and not args.get("tags")


def next_request(pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries one request sends: consecutive metric-only batches coalesce (catch-up speed)."""
    group = [pending[0]]
    if not _metrics_only(pending[0]):
        return group
    count = len(pending[0]["args"]["metrics"])
    for entry in pending[1:]:
        if (
            not _metrics_only(entry)
            or count + len(entry["args"]["metrics"]) > MAX_METRICS_PER_BATCH
        ):
            break
        size = len(entry["args"]["metrics"])
        group.append(entry)
        count += size
    return group


def send(client: Any, journal: Journal, group: list[dict[str, Any]]) -> None:
    """Replay entries on the server (an MlflowClient); raises what the client raised."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = journal.run_id
    head = group[0]
    op, args = head["op"], head["args"]
    if op == "log_batch":
        metrics = [Metric(k, v, t, s) for e in group for k, v, t, s in e["args"]["metrics"]]
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, v) for k, v in args.get("params", [])],
            tags=[RunTag(k, v) for k, v in args.get("tags", [])],
        )
    elif op == "log_param":
        client.log_param(run_id, args["key"], args["value"])
    elif op == "set_tag":
        client.set_tag(run_id, args["key"], args["value"])
    elif op == "log_text":
        client.log_text(run_id, args["text"], args["artifact_file"])
    elif op == "log_artifacts":
        client.log_artifacts(run_id, str(journal.folder / head["files"]), args["artifact_path"])
    elif op == "log_artifact":
        folder = journal.folder / head["files"]
        (path,) = list(folder.iterdir())
        client.log_artifact(run_id, str(path), args["artifact_path"])
    elif op == "set_terminated":
        client.set_terminated(run_id, args["status"], args["end_time"])
    else:
        raise ValueError(f"unknown journal operation {op!r} in {journal.folder}")


@dataclass(frozen=True)
class SendPolicy:
    """How the sender retries (`logger.retry_interval`) and how long a run's end waits."""

    retry_interval: float = 5.0  # the longest pause between tries while the server is away
    flush_timeout: float = 30.0  # the end of a run waits this long for an absent server


class JournaledClient:
    """An MlflowClient whose writes to a run go through that run's journal and a sender thread.

    Anything not journaled (reads, run creation) goes straight to the wrapped client.
    """

    def __init__(self, client: Any, root: Path, uri: str, policy: SendPolicy) -> None:
        self._client = client
        self._root = Path(root)
        self._uri = uri
        self._policy = policy
        self._journals: dict[str, Journal] = {}
        self._queue: deque[tuple[Journal, dict[str, Any]]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._away_since: float | None = None  # when the server stopped answering
        self._journal_failed = False  # the journal could not be written (full disk ...)
        self.outage_seconds = 0.0  # total time the server was away (measured by the sender)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    # ---- journaled writes (the MlflowClient signatures vlmlab and Lightning use) ---------------
    def log_batch(
        self,
        run_id: str,
        metrics: Any = (),
        params: Any = (),
        tags: Any = (),
        synchronous: bool | None = None,
    ) -> None:
        self._record(
            run_id,
            "log_batch",
            {
                "metrics": [[m.key, float(m.value), m.timestamp, m.step] for m in metrics],
                "params": [[p.key, str(p.value)] for p in params],
                "tags": [[t.key, str(t.value)] for t in tags],
            },
        )

    def log_metric(
        self,
        run_id: str,
        key: str,
        value: float,
        timestamp: int | None = None,
        step: int | None = None,
        **_: Any,
    ) -> None:
        stamp = timestamp if timestamp is not None else int(time.time() * 1000)
        self._record(
            run_id,
            "log_batch",
            {"metrics": [[key, float(value), stamp, step or 0]], "params": [], "tags": []},
        )

    def log_param(self, run_id: str, key: str, value: Any, **_: Any) -> Any:
        self._record(run_id, "log_param", {"key": key, "value": str(value)})
        return value

    def set_tag(self, run_id: str, key: str, value: Any, **_: Any) -> None:
        self._record(run_id, "set_tag", {"key": key, "value": str(value)})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._record(run_id, "log_text", {"text": text, "artifact_file": artifact_file})

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._record(run_id, "log_artifacts", {"artifact_path": artifact_path}, Path(local_dir))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._record(run_id, "log_artifact", {"artifact_path": artifact_path}, Path(local_path))

    def set_terminated(
        self, run_id: str, status: str | None = None, end_time: int | None = None
    ) -> None:
        end = end_time if end_time is not None else int(time.time() * 1000)
        self._record(run_id, "set_terminated", {"status": status or "FINISHED", "end_time": end})

    # ---- the sender -----------------------------------------------------------------------------
    def journal(self, run_id: str) -> Journal:
        """This run's journal; opening it queues what an earlier process left unsent."""
        if run_id not in self._journals:
            journal = Journal(journal_root(self._root) / run_id, run_id, self._uri)
            self._journals[run_id] = journal
            backlog = journal.pending()
            if backlog:
                log.info("MLflow run %s: %d operations left unsent earlier", run_id, len(backlog))
                self._enqueue(journal, backlog)
        return self._journals[run_id]

    def _record(
        self, run_id: str, op: str, args: dict[str, Any], files: Path | None = None
    ) -> None:
        try:
            journal = self.journal(run_id)
            entry = journal.append(op, args, files)
        except OSError as err:  # the run's disk is full or read-only: tracking must not crash it
            if not self._journal_failed:
                log.warning(
                    "cannot journal MLflow writes under %s (%s): sending them from memory, "
                    "nothing is kept if the server is away too",
                    journal_root(self._root),
                    err,
                )
                self._journal_failed = True
            if files is not None:
                return  # an artifact whose copy failed: the caller's files may be gone soon
            journal = self._journals[run_id] = _MemoryJournal(run_id)  # from now on
            entry = journal.append(op, args)
        self._enqueue(journal, [entry])

    def _enqueue(self, journal: Journal, entries: list[dict[str, Any]]) -> None:
        with self._cv:
            self._queue.extend((journal, e) for e in entries)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="vlmlab-mlflow-sender", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                journal = self._queue[0][0]
                pending = [e for j, e in self._queue if j is journal]
            group = next_request(pending)
            try:
                send(self._client, journal, group)
            except Exception as err:  # classified below; the sender must not die
                if not is_transient(err):
                    log.error(
                        "MLflow rejected %s of run %s (skipped; the entry stays in %s): %s",
                        group[0]["op"],
                        journal.run_id,
                        journal.folder,
                        err,
                    )
                else:
                    failures += 1
                    if self._away_since is None:
                        self._away_since = time.monotonic()
                        log.warning(
                            "MLflow server %s is unreachable (%s); training goes on, its "
                            "tracking is journaled in %s and sent when the server returns",
                            self._uri,
                            str(err).splitlines()[0][:200],
                            journal.folder,
                        )
                    pause = min(self._policy.retry_interval, 0.25 * 2 ** min(failures, 10))
                    with self._cv:
                        self._cv.wait(pause)
                    continue
            if self._away_since is not None:
                away = time.monotonic() - self._away_since
                self.outage_seconds += away
                log.warning(
                    "MLflow server %s is back after %.1f s; sending the journaled backlog",
                    self._uri,
                    away,
                )
                self._away_since = None
            failures = 0
            if group[-1]["seq"]:  # 0: an entry only in memory (the journal was unwritable)
                with contextlib.suppress(OSError):
                    journal.mark_sent(group[-1]["seq"])
            with self._cv:
                for entry in group:  # close() may have emptied the queue meanwhile
                    if self._queue and self._queue[0][1] is entry:
                        self._queue.popleft()
                self._cv.notify_all()

    def _sender_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float | None = None) -> bool:
        """Wait (at most `timeout`, default the policy's) for the journal to reach the server.

        Returns True when everything was sent; otherwise says where the rest is and how to
        send it. The sender stops either way (what is left stays in the journal).
        """
        limit = self._policy.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._cv:
            while self._queue and time.monotonic() < deadline and self._sender_alive():
                self._cv.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            left = list(self._queue)
            self._closing = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._closing = False
        if not left:
            return True
        for folder in sorted({str(j.folder) for j, _ in left}):
            count = sum(1 for j, _ in left if str(j.folder) == folder)
            log.warning(
                "MLflow server %s did not answer within logger.flush_timeout=%ss: %d tracking "
                "operations (metrics, final status) are kept in %s; send them once the server "
                "is up with `vlmlab tracking sync --root %s`",
                self._uri,
                limit,
                count,
                folder,
                self._root,
            )
        return False


@functools.cache
def _logger_class() -> type:
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    from vlmlab.errors import ConfigError

    class JournaledMLFlowLogger(MLFlowLogger):
        """Lightning's MLFlowLogger whose client journals its writes (see JournaledClient)."""

        def __init__(self, journal_dir: Path, policy: SendPolicy, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.journal = JournaledClient(
                self._mlflow_client, journal_dir, str(kwargs["tracking_uri"]), policy
            )
            self._mlflow_client = self.journal  # type: ignore[assignment]

        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            """The journaled client; the run is created (or found) on the server first, so an
            unreachable server at the start is a clear error, not a stack of HTTP retries."""
            try:
                return super().experiment
            except Exception as err:
                if self._initialized or not is_transient(err):
                    raise
                raise ConfigError(
                    "logger.tracking_uri",
                    f"the MLflow server {self._tracking_uri} is unreachable at the start of the "
                    f"run ({str(err).splitlines()[0][:200]}).",
                    "start it (or wait for it), point logger.tracking_uri at a reachable server "
                    "or sqlite:///<path>/mlflow.db, or train with logger=none.",
                ) from err

        def finalize(self, status: str = "success") -> None:
            """Queue the final status (Lightning's asks the server for the run first)."""
            if not self._initialized:
                return
            names = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}
            self.journal.set_terminated(str(self.run_id), names.get(status, status))

        def close(self) -> bool:
            return self.journal.close()

    return JournaledMLFlowLogger


def journaled_logger(root: Path, policy: SendPolicy, **kwargs: Any) -> Any:
    """An MLFlowLogger (same arguments) that journals under `<root>/tracking` and sends in the
    background; `close()` at the end of the run waits for the server (`policy.flush_timeout`)."""
    return _logger_class()(root, policy, **kwargs)


def close_logger(logger: Any) -> bool:
    """End of a run: flush a journaled logger (True when everything reached the server)."""
    journal = getattr(logger, "journal", None)
    return journal.close() if isinstance(journal, JournaledClient) else True


# ---- `vlmlab tracking` ------------------------------------------------------------------------


def sync(root: Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Send every journal's unsent operations under `<root>/tracking`; run id -> count left.

    Synchronous, with MLflow's own retries: a sync runs when the server is known to be up.
    """
    from mlflow import MlflowClient

    left: dict[str, int] = {}
    folder = journal_root(root)
    for info in sorted(folder.glob(f"*/{RUN}")) if folder.is_dir() else []:
        journal = Journal.open(info.parent)
        pending = journal.pending()
        if not pending:
            continue
        uri = tracking_uri or journal.tracking_uri
        client = MlflowClient(uri)
        log.info("run %s: sending %d operations to %s", journal.run_id, len(pending), uri)
        while pending:
            group = next_request(pending)
            try:
                send(client, journal, group)
            except Exception as err:  # report and go on with the next run
                log.error("run %s: %s failed: %s", journal.run_id, group[0]["op"], err)
                break
            journal.mark_sent(group[-1]["seq"])
            pending = pending[len(group) :]
        left[journal.run_id] = len(pending)
    return left


def main(argv: list[str]) -> int:
    """`vlmlab tracking sync [--root DIR] [--tracking-uri URI]`: 0 when nothing is left unsent."""
    parser = argparse.ArgumentParser(
        prog="vlmlab tracking", description="send journaled MLflow operations to the server"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="send what runs could not send (server was away)")
    sync_parser.add_argument(
        "--root", default=os.environ.get("VLMLAB_ROOT", "runs"), help="paths.root of the runs"
    )
    sync_parser.add_argument(
        "--tracking-uri", default=None, help="send to this server instead of the recorded one"
    )
    args = parser.parse_args(argv)
    from vlmlab.logs import setup_logging

    setup_logging()
    left = sync(Path(args.root), args.tracking_uri)
    for run_id, count in left.items():
        log.info("run %s: %s", run_id, f"{count} operations left" if count else "all sent")
    if not left:
        log.info("nothing to send under %s", journal_root(Path(args.root)))
    return 1 if any(left.values()) else 0
