"""Sweeps as users run them (subprocesses): MLflow parent/child runs with the basic, joblib and
submitit-local launchers, DDP inside a sweep, `vlmlab report`, and a real `mlflow server`.

Each sweep is shortened (tiny data, `trainer.max_steps=2`, stage 1 from the base weights) but
otherwise the command of the issue; one sweep serves several assertions to keep CI short.
"""

from __future__ import annotations

import json
import os
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


def test_basic_sweep_parent_children_and_report(tmp_path: Path, shared_data: Path) -> None:
    _sweep(tmp_path, shared_data, "connector=linear,mlp", "seed=1,2")
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
    _sweep(
        tmp_path,
        shared_data,
        "connector=linear,mlp",
        "seed=1,2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    _, parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["hydra.launcher"] == "joblib"
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.info.run_name for r in children}) == 4


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

    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        train(compose_cfg("stage=1", "connector=linear", f"logger.tracking_uri={uri}"))
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.tags["connector"] == "linear"
        assert run.data.params["stage.name"] == "1"
        assert len(client.get_metric_history(run.info.run_id, "train/grad_norm")) >= 3
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default local store
    finally:
        server.terminate()
        server.wait(timeout=30)
