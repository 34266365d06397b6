"""The MLflow UI as a user opens it (issue 19 item 3, acceptance 1): a finished 4-job sweep,
`mlflow server` on loopback, the URL `python train.py -m` logged, opened in headless Chromium.

The runs table must show the sweep's parent with its 4 jobs, their dataset and an
`eval/accuracy` value, not MLflow 3's GenAI overview. A screenshot is saved next to the test's
files and copied to $VLMLAB_TEST_ARTIFACTS (default: /tmp/vlmlab-test-artifacts).
"""

from __future__ import annotations

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

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
URL_LINE = re.compile(r"MLflow: the sweep's runs: (http\S+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install -y chromium; .ci/run does); CI must run it",
)
def test_sweep_runs_table_in_a_real_browser(tmp_path: Path, data_root: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMLAB_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    sweep = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=demo", *TINY_DATA,
         "stage.init_from=null", "trainer.max_steps=2", "stage.evaluate=true",
         "eval.max_samples=4", "eval.max_new_tokens=4", "logger.samples=0",
         "connector=linear,mlp", "seed=1,2", f"data.root={data_root}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    (logged,) = set(URL_LINE.findall(sweep.stdout + sweep.stderr))  # at its start and end
    assert logged.startswith("http://127.0.0.1:5000/#/experiments/")
    assert "workflowType=machine_learning" in logged and "viewStateShareKey=" in logged

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("vlmlab.sweep") == "parent"]
    children = [r for r in runs if r is not parent]
    assert parent.info.run_name == "sweep-stage1-connector-seed"
    assert len(children) == 4
    accuracies = {r.data.metrics["eval/accuracy"] for r in children}

    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # slow to start on a loaded 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        url = logged.replace("http://127.0.0.1:5000", base)
        dom = _chromium("--dump-dom", url).stdout
        (tmp_path / "runs_table.html").write_text(dom)
        shot = tmp_path / "runs_table.png"
        _chromium(f"--screenshot={shot}", url)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    keep = Path(os.environ.get("VLMLAB_TEST_ARTIFACTS", "/tmp/vlmlab-test-artifacts"))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "mlflow_runs_table.png")
    shutil.copy(tmp_path / "runs_table.html", keep / "mlflow_runs_table.html")
    print(f"screenshot: {keep / 'mlflow_runs_table.png'}")

    assert shot.read_bytes()[:4] == b"\x89PNG"
    assert "Detect issues" not in dom  # not the GenAI overview
    assert parent.info.run_name in dom
    for child in children:
        assert child.info.run_name in dom, child.info.run_name
    assert "align" in dom  # the Dataset column: the stage's shard set
    assert "eval/accuracy" in dom
    assert any(f"{value:g}"[:4] in dom for value in accuracies)
