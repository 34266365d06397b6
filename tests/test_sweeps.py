"""Sweeps as users run them (subprocesses): MLflow parent/child runs with the basic, joblib and
submitit-local launchers, DDP inside a sweep, `vlmlab report`, a real `mlflow server`, and the
sweep's runs table opened in headless Chromium (issue 19 item 3, acceptance 1).

Each sweep is shortened (tiny data, `trainer.max_steps=2`, stage 1 from the base weights) but
otherwise the command of the issue; one sweep serves several assertions to keep CI short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, TINY_DATA

pytestmark = pytest.mark.slow

SHORT = ["stage.init_from=null", "trainer.max_steps=2"]


def _run(args: list[str], root: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _sweep(root: Path, data_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=demo",
        *TINY_DATA,
        *SHORT,
        *overrides,
        f"data.root={data_root}",
        f"hydra.sweep.dir={root / 'sweep'}",
    ]
    proc = _run(args, root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _parent_and_children(root: Path, experiment: str = "demo") -> tuple:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vlmlab.sweep") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    recorded = json.loads((root / "sweep" / "mlflow_parent.json").read_text())
    assert recorded["run_id"] == parent.info.run_id
    return client, parent, children


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep-data")


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str]:
    """The 4-job basic sweep, with its held-out eval on: the report and the browser test read it."""
    root = tmp_path_factory.mktemp("demo-sweep")
    proc = _sweep(
        root, shared_data, "connector=linear,mlp", "seed=1,2", "stage.evaluate=true",
        "eval.max_samples=4", "eval.max_new_tokens=4", "logger.samples=0",
    )  # fmt: skip
    return root, proc.stdout + proc.stderr


def test_basic_sweep_parent_children_and_report(demo_sweep: tuple[Path, str]) -> None:
    tmp_path = demo_sweep[0]
    client, parent, children = _parent_and_children(tmp_path)

    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.connector"] == "linear,mlp"
    assert parent.data.params["sweep.seed"] == "1,2"
    assert "connector=linear,mlp" in parent.data.tags["vlmlab.sweep_command"]
    assert parent.data.metrics["sweep/jobs_finished"] == 4
    assert sorted(r.info.run_name for r in children) == [
        "s1-linear-seed1",
        "s1-linear-seed2",
        "s1-mlp-seed1",
        "s1-mlp-seed2",
    ]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["connector"] == run.data.params["connector._target_"].split(".")[-2]
        assert run.data.tags["git.commit"] and run.data.tags["data.manifest_sha256"] != "unknown"
        assert "train/grad_norm" in run.data.metrics and "train/loss" in run.data.metrics
    assert sorted(r.data.params["seed"] for r in children) == ["1", "1", "2", "2"]

    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vlmlab = Path(sys.executable).parent / "vlmlab"
    proc = _run(
        [str(vlmlab), "report", "--experiment", "demo", "--group-by", "connector",
         "--metrics", "train/loss,train/grad_norm", "--out", str(out), "--tracking-uri", uri],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "report.md").read_text()
    for connector in ("linear", "mlp"):
        losses = [
            r.data.metrics["train/loss"] for r in children if r.data.tags["connector"] == connector
        ]
        mean = sum(losses) / 2
        assert f"| {connector} | 2 | {mean:.4f} ± " in table
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.png"} <= artifacts  # all runs share this parent


def test_joblib_sweep_parent_and_children(tmp_path: Path, shared_data: Path) -> None:
    _sweep(tmp_path, shared_data, "connector=linear,mlp", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2")  # fmt: skip
    _, parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["hydra.launcher"] == "joblib"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.info.run_name for r in children) == ["s1-linear", "s1-mlp"]


def test_ddp_inside_a_sweep_runs_each_job_once(tmp_path: Path, shared_data: Path) -> None:
    _sweep(
        tmp_path,
        shared_data,
        "connector=linear,mlp",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "stage.global_batch_size=16",
    )
    _, parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2, [r.info.run_name for r in children]
    assert sorted(r.data.tags["connector"] for r in children) == ["linear", "mlp"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["trainer.world_size"] == "2"
        # rank 1 reported the same job key as rank 0 (all_gather across the 2 processes)
        assert run.data.params["distributed.ranks_joined"] == "2"
    for job in ("0", "1"):  # each job's rank 1 ran in that job's own output folder
        assert (tmp_path / "sweep" / job / "train_ddp_process_1.log").is_file()
    assert not (tmp_path / "sweep" / "2").exists()


def test_submitit_local_sweep(tmp_path: Path, shared_data: Path) -> None:
    _sweep(tmp_path, shared_data, "connector=linear", "hydra/launcher=local")
    _, parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["hydra.launcher"] == "local"
    (child,) = children  # one job is enough to show the submitit process gets the parent
    assert child.info.status == "FINISHED" and child.data.tags["connector"] == "linear"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runs_through_an_mlflow_server(compose_cfg, tmp_path: Path) -> None:
    from vlmlab.train import train

    server, uri = _start_server(f"sqlite:///{tmp_path / 'server.db'}", timeout=300)
    try:
        train(compose_cfg("stage=1", "connector=linear", f"logger.tracking_uri={uri}"))
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.tags["connector"] == "linear"
        assert run.data.params["stage.name"] == "1"
        assert len(client.get_metric_history(run.info.run_id, "train/grad_norm")) >= 3
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default local store
    finally:
        _stop(server)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
URL_LINE = re.compile(r"MLflow: the sweep's runs: (http\S+)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=2400,1200",
        "--virtual-time-budget=20000",  # let the app fetch and render the runs
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _start_server(store: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, once it answers /health."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout  # slow to start on a loaded 2-core machine
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return server, base
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            _stop(server)
            raise AssertionError("mlflow server exited or did not answer /health")
        time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install -y chromium; .ci/run does); CI must run it",
)
def test_sweep_runs_table_in_a_real_browser(demo_sweep: tuple[Path, str]) -> None:
    """The URL `python train.py -m` logged, opened in headless Chromium on a real `mlflow
    server`: the runs table shows the parent with its 4 jobs, their dataset and `eval/accuracy`,
    not MLflow 3's GenAI overview. The screenshot is copied to $VLMLAB_TEST_ARTIFACTS (default:
    /tmp/vlmlab-test-artifacts)."""
    tmp_path, output = demo_sweep
    (logged,) = set(URL_LINE.findall(output))  # at its start and end
    assert logged.startswith("http://127.0.0.1:5000/#/experiments/")
    assert "workflowType=machine_learning" in logged and "viewStateShareKey=" in logged
    _, parent, children = _parent_and_children(tmp_path)
    assert parent.info.run_name == "sweep-stage1-connector-seed"
    assert len(children) == 4
    accuracies = {r.data.metrics["eval/accuracy"] for r in children}

    server, base = _start_server(f"sqlite:///{tmp_path / 'mlflow.db'}", timeout=300)
    try:
        url = logged.replace("http://127.0.0.1:5000", base)
        dom = _chromium("--dump-dom", url).stdout
        (tmp_path / "runs_table.html").write_text(dom)
        shot = tmp_path / "runs_table.png"
        _chromium(f"--screenshot={shot}", url)
    finally:
        _stop(server)
    keep = Path(os.environ.get("VLMLAB_TEST_ARTIFACTS", "/tmp/vlmlab-test-artifacts"))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "mlflow_runs_table.png")
    shutil.copy(tmp_path / "runs_table.html", keep / "mlflow_runs_table.html")

    assert shot.read_bytes()[:4] == b"\x89PNG"
    assert "Detect issues" not in dom  # not the GenAI overview
    assert parent.info.run_name in dom
    for child in children:
        assert child.info.run_name in dom, child.info.run_name
    assert "align" in dom  # the Dataset column: the stage's shard set
    assert "eval/accuracy" in dom
    assert any(f"{value:g}"[:4] in dom for value in accuracies)
