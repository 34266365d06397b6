"""A remote MLflow server that goes away mid-run (issue 17 item 4): a real `mlflow server` on
loopback, SIGKILLed while `python train.py` logs to it, then restarted on the same port and
store (or never): training neither crashes nor stalls, the run ends FINISHED with every step's
loss, and what could not be sent is journaled for `vlmlab tracking sync`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from tests.conftest import REPO
from tests.test_scale import train_command

# Connector-only training, one step per batch: 6 steps per epoch of the 48-image tiny set.
STEPS_PER_EPOCH = 6
RUN = (
    "stage=1",
    "stage.evaluate=false",
    "data.batch_size=8",
    "stage.global_batch_size=8",
    "logger.samples=0",
    "checkpoint.every_n_steps=1000",
    "logger.retry_interval=0.5",
)


class PauseAtStep(L.Callback):
    """Holds the fit before optimizer step `step` until `folder/go` exists (at most 300 s), after
    creating `folder/paused`: the test kills the server at a known step, whatever the machine's
    speed (on a fast one the whole run used to end before the kill landed)."""

    def __init__(self, step: int, folder: str) -> None:
        self.step, self.folder, self.done = step, Path(folder), False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.done or trainer.global_step != self.step:
            return
        self.done = True
        (self.folder / "paused").touch()
        deadline = time.monotonic() + 300
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`mlflow server` on 127.0.0.1:<port> with a SQLite store; started in its own session so
    that SIGKILL reaches its workers too."""

    def __init__(self, store: Path, port: int) -> None:
        self.store, self.port = store, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        artifacts = self.store.parent / "server-artifacts"
        command = [sys.executable, "-m", "mlflow", "server", "-h", "127.0.0.1"]
        command += ["-p", str(self.port), "-w", "1", "--backend-store-uri"]
        command += [f"sqlite:///{self.store}", "--default-artifact-root", artifacts.as_uri()]
        log = open(self.store.parent / f"server-{time.time_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()  # no server left behind by a failed start
        raise RuntimeError(f"mlflow server on {self.uri} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def the_run(uri: str) -> Any:
    mlflow = client(uri)
    (experiment,) = [e for e in mlflow.search_experiments() if e.name == "vlmlab"]
    (run,) = mlflow.search_runs([experiment.experiment_id])
    return run


def losses(uri: str, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client(uri).get_metric_history(run_id, "train/loss")}


def wait_for_pause(server: Server, proc: subprocess.Popen[str], gate: Path) -> str:
    """Wait until training is held at PauseAtStep's step; returns the run's id."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (gate / "paused").exists():
            return str(the_run(server.uri).info.run_id)
        time.sleep(0.1)
    raise AssertionError("training did not reach its third step")


def wait_for_journal(root: Path, run_id: str, steps: int, proc: subprocess.Popen[str]) -> None:
    """Wait until training has logged `steps` losses (to its journal: the server is away)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(journal_losses(root, run_id)) >= steps:
                return
        except (OSError, ValueError):  # not written yet, or a line half written
            pass
        time.sleep(0.1)
    raise AssertionError(f"training did not log {steps} steps while the server was away")


def journal_losses(root: Path, run_id: str) -> dict[int, tuple[int, float]]:
    """step -> (timestamp ms, loss) as training logged them (the journal keeps every write)."""
    out = {}
    for line in (root / "tracking" / run_id / "journal.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["op"] == "log_batch":
            for key, value, stamp, step in entry["args"]["metrics"]:
                if key == "train/loss":
                    out[step] = (stamp, value)
    return out


def start_training(root: Path, data_root: Path, uri: str, *extra: str) -> subprocess.Popen[str]:
    """Training held before its 4th step until `root/gate/go` exists (PauseAtStep)."""
    gate = root / "gate"
    gate.mkdir(parents=True)
    pause = f"{{_target_:tests.test_tracking_outage.PauseAtStep,step:3,folder:'{gate}'}}"
    overrides = (*RUN, f"logger.tracking_uri={uri}", f"trainer.extra_callbacks=[{pause}]")
    command, env = train_command(root, data_root, *overrides, *extra)
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_server_restarted_mid_run(tmp_path: Path, data_root: Path) -> None:
    """Killed after 3 steps, restarted (same port and store) once 3 more were logged: exit 0,
    FINISHED, every step's loss on the server, equal to what training logged, training went on
    while the server was away, and from the kill on no two steps more than 10 s apart (3 median
    steps on a loaded machine). (MLflow's own client blocks each
    log call in retries with backoff until the server answers again, then goes on: a stall of
    the outage's length rounded up to its next retry; for good, it raises after minutes.)

    When training ends before the server is back, the end of the run waits for it
    (logger.flush_timeout): either way the backlog reaches the server.
    """
    epochs = 8  # 48 steps
    server = Server(tmp_path / "mlflow.db", free_port())
    server.start()
    root = tmp_path / "run"
    proc = start_training(
        root, data_root, server.uri, f"stage.epochs={epochs}", "logger.flush_timeout=120"
    )
    try:
        run_id = wait_for_pause(server, proc, root / "gate")
        server.kill()
        killed = time.time()
        (root / "gate" / "go").touch()
        wait_for_journal(root, run_id, 6, proc)  # 3 steps with the server away
        server.start()
        back = time.time()
        out, _ = proc.communicate(timeout=300)
        (tmp_path / "train.log").write_text(out)
        assert proc.returncode == 0, out[-4000:]
        run = client(server.uri).get_run(run_id)
        sent = losses(server.uri, run_id)
    finally:
        proc.kill()
        server.kill()
    logged = journal_losses(root, run_id)
    assert len(logged) == epochs * STEPS_PER_EPOCH
    assert run.info.status == "FINISHED"
    assert sent == {step: value for step, (_, value) in logged.items()}
    assert run.data.tags.get("checkpoint"), "the tag set after training did not arrive"
    stamps = sorted(stamp for stamp, _ in logged.values())
    during = [t for t in stamps if killed * 1000 <= t <= back * 1000]
    assert len(during) >= 2, "training did not go on while the server was away"
    # From the kill on (the pause before it is the test's own): no step waits for the server.
    gaps = [b - a for a, b in itertools.pairwise(t for t in stamps if t >= killed * 1000)]
    limit = max(10_000, 3 * statistics.median(gaps))  # a loaded machine's steps take seconds
    assert max(gaps) < limit, f"training stalled {max(gaps)} ms between two steps: {gaps}"
    assert "unreachable" in out and "is back after" in out
    print(  # measured: pytest -s shows it
        f"outage {back - killed:.1f} s, {len(during)} steps logged during it, "
        f"longest gap between steps {max(gaps) / 1000:.2f} s"
    )


@pytest.mark.slow
def test_server_gone_for_good_then_sync(tmp_path: Path, data_root: Path) -> None:
    """Killed after 3 steps and never back: training finishes (exit 0) within
    logger.flush_timeout, says where its metrics are; `vlmlab tracking sync` sends them to a
    server started later on the same store: FINISHED with every step's loss."""
    epochs = 4
    server = Server(tmp_path / "mlflow.db", free_port())
    server.start()
    root = tmp_path / "run"
    proc = start_training(
        root, data_root, server.uri, f"stage.epochs={epochs}", "logger.flush_timeout=3"
    )
    try:
        run_id = wait_for_pause(server, proc, root / "gate")
        server.kill()
        (root / "gate" / "go").touch()
        out, _ = proc.communicate(timeout=300)
        (tmp_path / "train.log").write_text(out)
    finally:
        proc.kill()
        server.kill()
    assert proc.returncode == 0, out[-4000:]
    folder = root / "tracking" / run_id
    assert str(folder) in out and "vlmlab tracking sync" in out, out[-3000:]
    logged = journal_losses(root, run_id)
    assert len(logged) == epochs * STEPS_PER_EPOCH

    server.port = free_port()  # the server may come back elsewhere: --tracking-uri says where
    server.start()
    try:
        assert client(server.uri).get_run(run_id).info.status == "RUNNING"
        env = {**os.environ, "VLMLAB_ROOT": str(root)}
        command = [sys.executable, "-m", "vlmlab", "tracking", "sync"]
        sync = subprocess.run(
            [*command, "--tracking-uri", server.uri],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sync.returncode == 0, sync.stderr[-3000:]
        run = client(server.uri).get_run(run_id)
        sent = losses(server.uri, run_id)
        again = subprocess.run(
            [*command, "--tracking-uri", server.uri],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.kill()
    assert run.info.status == "FINISHED"
    assert sent == {step: value for step, (_, value) in logged.items()}
    assert run.data.tags.get("checkpoint"), "the tag set after training was not synced"
    assert again.returncode == 0 and "nothing to send" in again.stderr  # sent once, not twice


def test_journal_keeps_what_an_absent_server_missed_and_sync_sends_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fast, no server: a client pointed at a closed loopback port (real connection refused)
    journals every write, `close` gives up after flush_timeout and says where the journal is and
    how to send it; `sync` replays it in order into a real store, and a second sync sends
    nothing. Consecutive metric batches coalesce; other operations keep their place."""
    from mlflow.entities import Metric

    from vlmlab.tracking import journal

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = client(store)
    experiment = real.create_experiment("outage", artifact_location=(tmp_path / "art").as_uri())
    run_id = real.create_run(experiment).info.run_id
    absent = f"http://127.0.0.1:{free_port()}"
    root = tmp_path / "root"
    journaled = journal.JournaledClient(
        client(absent), root, absent, journal.SendPolicy(retry_interval=0.1, flush_timeout=1.0)
    )
    for step in range(5):
        journaled.log_batch(run_id, metrics=[Metric("train/loss", 1.0 / (step + 1), 1000, step)])
    journaled.log_param(run_id, "p", 3)
    journaled.log_metric(run_id, "train/loss", 0.1, step=5)
    files = tmp_path / "samples"
    files.mkdir()
    (files / "a.txt").write_text("answer")
    journaled.log_artifacts(run_id, str(files), "samples")
    shutil.rmtree(files)  # the caller's temporary folder is gone before the server returns
    journaled.log_text(run_id, "x: 1\n", "config.yaml")
    journaled.set_tag(run_id, "checkpoint", "/ckpt")
    journaled.set_terminated(run_id, "FINISHED")
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        assert journaled.close() is False
    assert time.monotonic() - started < 10
    folder = root / "tracking" / run_id
    assert str(folder) in caplog.text and "vlmlab tracking sync" in caplog.text

    pending = journal.Journal.open(folder).pending()
    assert [len(journal.next_request(pending[i:])) for i in (0, 5, 6)] == [5, 1, 1]
    assert journal.sync(root, tracking_uri=store) == {run_id: 0}
    run = real.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "3"}
    assert run.data.tags["checkpoint"] == "/ckpt"
    history = real.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25), (4, 0.2), (5, 0.1)
    ]  # fmt: skip
    artifacts = {a.path for a in real.list_artifacts(run_id)}
    assert {"samples", "config.yaml"} <= artifacts
    assert journal.sync(root, tracking_uri=store) == {}  # everything was sent once


def test_an_unwritable_journal_does_not_stop_tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's disk is read-only (a real read-only tmpfs): the writes are sent from memory,
    one warning says so, nothing raises into training, nothing is written elsewhere."""
    from mlflow.entities import Metric

    from tests.test_disk_full import mount_tmpfs, unmount
    from vlmlab.tracking import journal

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = client(store)
    experiment = real.create_experiment("ro", artifact_location=(tmp_path / "art").as_uri())
    run_id = real.create_run(experiment).info.run_id
    root = tmp_path / "root"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    mount_tmpfs(root, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        journaled = journal.JournaledClient(real, root, store, journal.SendPolicy(0.1, 30.0))
        for step in range(3):
            journaled.log_batch(run_id, metrics=[Metric("train/loss", float(step), 1000, step)])
        journaled.set_terminated(run_id, "FINISHED")
        assert journaled.close() is True
    finally:
        unmount(root)
    assert real.get_run(run_id).info.status == "FINISHED"
    assert len(real.get_metric_history(run_id, "train/loss")) == 3
    assert not list(cwd.iterdir())


def test_an_unreachable_server_at_the_start_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server behind logger.tracking_uri when the run starts (a closed loopback port): the
    first write raises a ConfigError naming the key and the fixes within seconds, instead of
    MLflow's minutes of retries (7, backoff up to 2 min) and its raw exception."""
    from vlmlab.errors import ConfigError
    from vlmlab.schema import LoggerConfig
    from vlmlab.tracking.logger import RunIdentity, build_logger

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards: the logger sets them
    absent = f"http://127.0.0.1:{free_port()}"
    logger = build_logger(LoggerConfig(tracking_uri=absent), RunIdentity("1", tmp_path))
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"^logger\.tracking_uri: the MLflow server .*logger=none"
    ):
        logger.log_hyperparams({"a": 1})
    assert time.monotonic() - started < 15
