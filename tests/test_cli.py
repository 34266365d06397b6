"""The commands users type, run as subprocesses: sweeps, errors, and the whole demo (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, TINY_DATA

pytestmark = pytest.mark.slow


def _run(args: list[str], root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _runs(root: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client.search_runs([found.experiment_id])


def test_sweep_over_connectors_gives_one_mlflow_run_each(tmp_path: Path) -> None:
    """The README's sweep, each stage-1 job chained to the warm-up (init_from=auto; only a
    complete stage is a parent, so the warm-up runs whole); 2 steps a job: what is checked is
    one finished MLflow run per connector, not what they learn."""
    tiny = [*TINY_DATA, f"data.root={tmp_path / 'data'}"]
    warmup = _run([sys.executable, "train.py", "experiment=demo", "stage=lm", *tiny], tmp_path)
    assert warmup.returncode == 0, warmup.stderr[-3000:]

    sweep = _run(
        [
            sys.executable,
            "train.py",
            "-m",
            "connector=linear,mlp",
            "stage=1",
            "experiment=demo",
            "trainer.max_steps=2",
            *tiny,
        ],
        tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    runs = [r for r in _runs(tmp_path, "demo") if r.data.tags.get("stage") == "1"]
    assert sorted(r.data.tags["connector"] for r in runs) == ["linear", "mlp"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "hydra-multirun").is_dir(), "sweep outputs must stay under paths.root"


def test_stage2_first_fails_with_the_command_to_run(tmp_path: Path) -> None:
    proc = _run([sys.executable, "train.py", "stage=2", "connector=linear", *TINY_DATA], tmp_path)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert "python train.py stage=1 connector=linear" in output
    assert "Traceback" not in output


def test_typo_in_group_choice_lists_valid_options(tmp_path: Path) -> None:
    proc = _run([sys.executable, "train.py", "connector=mpl"], tmp_path)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "mpl" in output and "linear" in output and "mlp" in output


@pytest.mark.timeout(1500)
def test_demo_reaches_target_accuracy(tmp_path: Path) -> None:
    vlmlab = Path(sys.executable).parent / "vlmlab"
    proc = _run([str(vlmlab), "demo", "trainer.enable_progress_bar=false"], tmp_path, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r.data.tags["stage"]: r for r in _runs(tmp_path, "demo")}
    assert set(runs) == {"lm", "1", "2"}
    accuracy = runs["2"].data.metrics["eval/accuracy"]
    assert runs["2"].data.metrics["eval/shapes_colour/accuracy"] == accuracy

    # `vlmlab eval` on the final model (by its MLflow run id) scores the synthetic colour
    # benchmark exactly as the run did at its end
    bench = tmp_path / "bench"
    made = _run([str(vlmlab), "eval", "--make-synthetic", str(bench), "experiment=demo"], tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    out = tmp_path / "eval"
    args = ["--bench", str(bench / "shapes_colour.jsonl"), "--out", str(out)]
    args += ["--max-new-tokens", "6"]  # the demo's data.heldout.max_new_tokens
    scored = _run([str(vlmlab), "eval", runs["2"].info.run_id, *args], tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    summary = json.loads((out / "shapes_colour" / "summary.json").read_text())
    assert summary["num_samples"] == 200 and summary["num_rejected"] == 0
    assert summary["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert "shapes_colour" in scored.stdout

    # `vlmlab chat --prompt` answers from the demo's checkpoint: a right answer of the eval
    rows = [json.loads(line) for line in (out / "shapes_colour" / "predictions.jsonl").open()]
    right = next(r for r in rows if r["score"] == 1.0)
    image = bench / next(
        json.loads(line)["image"]
        for line in (bench / "shapes_colour.jsonl").open()
        if json.loads(line)["id"] == right["id"]
    )
    ckpt = runs["2"].data.tags["checkpoint"]
    chat_args = [str(vlmlab), "chat", ckpt, str(image), "--max-new-tokens", "6"]
    chat = _run([*chat_args, "--prompt", "What colour is the shape?"], tmp_path)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout == right["prediction"] + "\n"
    assert right["answers"][0] in chat.stdout

    assert accuracy >= 0.8, f"held-out colour accuracy {accuracy:.3f} < 0.8"
