"""A stage as MLflow 3 means it (issue 19 item 1): a model-training experiment, the data as
dataset inputs, the final checkpoint as a registered logged model that `vlmlab eval
models:/<name>/<version>` evaluates (acceptance 2), the runs-table view and its URL."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from vlmlab import cli
from vlmlab.train import train


def _verb(args: list[str]) -> int:
    with pytest.raises(SystemExit) as code:
        cli.main(args)
    return int(code.value.code)


def test_stage_is_a_registered_model_with_its_data(
    compose_cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    cfg = compose_cfg(
        "stage=1",
        "connector=linear",
        "stage.init_from=null",
        "stage.evaluate=true",
        "eval=tiny",
        "logger.system_metrics=true",
        "logger.system_metrics_interval=0.2",  # training may take 1 s: sample often
    )
    with caplog.at_level(logging.INFO, logger="vlmlab"):
        result = train(cfg)
    assert result["complete"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("vlmlab")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id

    # dataset inputs: the shard set (digest = its manifest's sha256) for training, held-out for eval
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    train_input = inputs["align"]
    assert train_input.dataset.digest == run.data.tags["data.manifest_sha256"][:36]
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "training"
    profile = json.loads(train_input.dataset.profile)
    assert profile["num_samples"] == 48 and profile["num_shards"] == 3
    assert json.loads(train_input.dataset.source)["uri"].endswith("align")
    eval_input = inputs["align-heldout"]
    assert {t.key: t.value for t in eval_input.tags}["mlflow.data.context"] == "eval"

    # system metrics while it trained (CPU here; GPU keys need a GPU and nvidia-ml-py)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    # the GPU keys come from MLflow's NVML monitor: its binding (nvidia-ml-py) is a dependency,
    # so the monitor starts on a GPU machine; without a GPU it stops at the missing NVML library
    # (without the binding it would raise ImportError and GPU runs would log no GPU metrics)
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    if torch.cuda.is_available():
        GPUMonitor()
    else:
        with pytest.raises(RuntimeError, match="NVML"):
            GPUMonitor()

    # the final checkpoint: a logged model of the run with its eval metrics, registered
    (version,) = client.search_model_versions("name = 'vlmlab-stage1'")
    assert version.run_id == run_id and version.tags["checkpoint"] == result["checkpoint"]
    model = client.get_logged_model(version.tags["vlmlab.model_id"])
    assert model.source_run_id == run_id
    assert model.tags["checkpoint"] == result["checkpoint"]
    linked = {m.key: m.value for m in model.metrics or []}
    assert linked["eval/accuracy"] == run.data.metrics["eval/accuracy"]

    # the view of the stage's runs, and the URL that opens it in the Model training workflow
    view = json.loads(experiment.tags["mlflow.sharedViewState.vlmlab-stage-1"])
    state = json.loads(view["state"])
    assert "metrics.`eval/accuracy`" in state["selectedColumns"]
    assert state["searchFilter"] == "tags.stage = '1'"
    url = (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?"
        "workflowType=machine_learning&viewStateShareKey=vlmlab-stage-1"
    )
    assert url in caplog.text

    # acceptance 2: `vlmlab eval models:/<name>/<version>` evaluates the registered checkpoint
    monkeypatch.setenv("VLMLAB_ROOT", str(tmp_path))
    bench = Path(cfg.data.root)
    (colour,) = bench.glob("shapes-*/benchmarks/shapes_colour.jsonl")
    out = tmp_path / "out"
    args = ["eval", f"models:/vlmlab-stage1/{version.version}", f"--bench={colour}"]
    args += [
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
        "--max-samples",
        "12",
        "--batch-size",
        "12",
    ]
    assert _verb(args) == 0
    summary = json.loads((out / "shapes_colour" / "summary.json").read_text())
    assert summary["metrics"]["accuracy"] == pytest.approx(run.data.metrics["eval/accuracy"])
    assert _verb([*args[:1], "models:/vlmlab-stage1/7", *args[2:]]) == 2  # no such version


def test_curation_is_a_run_that_training_data_traces_back_to(tmp_path: Path) -> None:
    """Issue 18 item 3: `vlmlab curate` logs its counts, thresholds and report; the shards made
    from its kept.json carry that file's sha256, which links a training run to the curate run."""
    from PIL import Image

    from vlmlab.tracking.datasets import _shard_set_input, link_data_runs

    (tmp_path / "img").mkdir()
    entries = []
    for i in range(4):
        Image.new("RGB", (64, 48), (60 * i, 90, 200 - 40 * i)).save(tmp_path / "img" / f"{i}.png")
        answer = f"A coloured square, number {i}, fills the frame."
        entries.append(
            {
                "id": f"e{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    entries.append({**entries[0], "id": "dup"})  # an exact duplicate: rejected
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "curated"
    args = ["curate", str(data), "--image-root", str(tmp_path / "img"), "--out", str(out)]
    args += ["--preset", "tiny", "dedup.semantic.enabled=false", "--tracking-uri", uri]
    assert _verb(args) == 0

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vlmlab-data")
    (curated,) = client.search_runs([experiment.experiment_id])
    summary = json.loads((out / "summary.json").read_text())
    assert curated.info.status == "FINISHED"
    assert curated.data.metrics["curate/kept"] == summary["kept"] == 4
    assert curated.data.metrics["curate/exact_duplicate"] == 1
    assert "thresholds.semantic" in curated.data.params
    artifacts = {a.path for a in client.list_artifacts(curated.info.run_id)}
    assert {"report.md", "report.png", "summary.json"} <= artifacts
    sha = curated.data.tags["vlmlab.data.output_sha256"]

    shards = tmp_path / "shards"
    assert _verb(["shards", str(out / "kept.json"), "--image-root", str(tmp_path / "img"),
                  "--out", str(shards)]) == 0  # fmt: skip
    item = _shard_set_input("curated", shards, "training")
    assert item.profile["source_sha256"] == sha and item.profile["num_samples"] == 4
    manifest = json.loads((shards / "manifest.json").read_text())  # token counts, as converted
    assert item.profile["num_tokens"] == manifest["num_tokens"] > 4 * 16
    assert item.profile["tokens_max"] == manifest["token_lengths"]["max"]
    train_run = client.create_run(experiment.experiment_id)
    link_data_runs(client, train_run.info.run_id, [item])
    tags = client.get_run(train_run.info.run_id).data.tags
    assert tags["data.source_sha256"] == sha
    assert tags["vlmlab.data_run"] == curated.info.run_id


def _log_the_same_datasets(uri: str, rounds: int, barrier: Any, out: Any) -> None:
    """One of several parallel jobs: each round, a new run logs the round's dataset at the same
    moment as the other jobs (a barrier), as joblib sweep jobs do at their start."""
    from vlmlab.tracking.datasets import DataInput, log_inputs

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("race").experiment_id
    errors = []
    for round_ in range(rounds):
        run_id = client.create_run(experiment).info.run_id
        item = DataInput("align", f"{round_:064x}", "/data/align", "training", {})
        barrier.wait()
        try:
            log_inputs(client, run_id, [item])
        except Exception as error:  # what made a sweep job FAILED before the retry
            errors.append(f"{type(error).__name__}: {str(error)[:200]}")
    out.put(errors)


def test_parallel_jobs_logging_one_dataset_all_succeed(tmp_path: Path) -> None:
    """Seen in CI: of two joblib jobs, the one that lost MLflow's lookup-then-insert race for
    the shared dataset row failed its whole run (UNIQUE constraint). Three processes log the
    same new dataset at once, 6 times: every run gets its input, no job fails."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("race")
    context = multiprocessing.get_context("spawn")
    jobs, rounds = 3, 6
    barrier, out = context.Barrier(jobs), context.Queue()
    processes = [
        context.Process(target=_log_the_same_datasets, args=(uri, rounds, barrier, out))
        for _ in range(jobs)
    ]
    for process in processes:
        process.start()
    errors = [error for _ in processes for error in out.get(timeout=300)]
    for process in processes:
        process.join(timeout=60)
    assert errors == []
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == jobs * rounds
    assert all(len(run.inputs.dataset_inputs) == 1 for run in runs)
