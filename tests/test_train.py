"""End-to-end fits on tiny real models and data: Lightning, MLflow (SQLite), stage chaining."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vlmlab import checkpoints
from vlmlab.errors import ConfigError
from vlmlab.train import train


def _runs(root: Path, experiment: str = "vlmlab") -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {root}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def test_stage1_fit_logs_to_mlflow(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("stage=1", "connector=linear")
    result = train(cfg)

    assert math.isfinite(result["metrics"]["train/loss"])
    ckpt = Path(result["checkpoint"])
    meta = checkpoints.read_meta(ckpt)
    assert meta.stage == "1" and meta.parent is None
    # stage 1 trains only the connector: the checkpoint holds exactly its tensors
    assert meta.num_params == sum(p.numel() for p in _connector_params(cfg))

    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["encoder"], tags["connector"], tags["llm"], tags["stage"]) == (
        "tiny",
        "linear",
        "tiny",
        "1",
    )
    assert run.data.params["stage.optim.lr"] == str(cfg.stage.optim.lr)
    assert run.data.params["params.connector.trainable"] == str(meta.num_params)
    assert "train/loss" in run.data.metrics
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "trainable_parameters.txt", "overrides.txt"} <= artifacts


def _connector_params(cfg):
    from vlmlab.models import build_vlm

    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    return list(model.connector.parameters())


def test_stage2_without_stage1_says_what_to_run(compose_cfg) -> None:
    cfg = compose_cfg("stage=2", "connector=mlp", "logger=none")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "stage.init_from" in message
    assert "python train.py stage=1" in message and "connector=mlp" in message


def test_stage_chain_lm_then_1_then_2(compose_cfg, tmp_path: Path) -> None:
    """The demo chain on tiny data: each stage finds its predecessor without any path."""
    demo = (
        "experiment=demo",
        "logger=none",
        "stage.epochs=1",
    )
    lm = train(compose_cfg(*demo, "stage=lm"))
    align = train(compose_cfg(*demo, "stage=1"))
    instruct = train(compose_cfg(*demo, "stage=2"))

    assert checkpoints.read_meta(Path(align["checkpoint"])).parent == lm["checkpoint"]
    assert checkpoints.read_meta(Path(instruct["checkpoint"])).parent == align["checkpoint"]
    assert "eval/accuracy" in instruct["metrics"]  # its level: the slow demo test (>= 0.8)

    # stage 1 of another connector must not pick up this connector's checkpoint
    with pytest.raises(ConfigError, match="no finished stage-1 run"):
        train(compose_cfg(*demo, "stage=2", "connector=linear"))


def test_init_from_checkpoint_of_other_composition_is_rejected(compose_cfg) -> None:
    first = train(compose_cfg("stage=1", "connector=linear", "logger=none"))
    cfg = compose_cfg(
        "stage=2", "connector=mlp", "logger=none", f"stage.init_from={first['checkpoint']}"
    )
    with pytest.raises(ConfigError, match="another component config: connector"):
        train(cfg)
