"""MLflow tracking of single runs: names, tags, metrics, artifacts, lineage, failures, report.

Real tiny fits into a real SQLite store; failures come from a real exception raised inside a
Lightning fit by a callback registered through the user-facing `trainer.extra_callbacks`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient
from scipy import stats

from vlmlab.distributed import JOB_ENV, argv_for_rank
from vlmlab.errors import ConfigError
from vlmlab.tracking.mlflow import git_commit, run_name
from vlmlab.tracking.report import report
from vlmlab.train import train


class RaiseAtStep(L.Callback):
    """Raises `kind` when the fit reaches optimizer step `step` (a real mid-training failure)."""

    def __init__(self, step: int, kind: str = "RuntimeError") -> None:
        self.step = step
        self.kind = kind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            if self.kind == "KeyboardInterrupt":
                raise KeyboardInterrupt
            raise RuntimeError(f"shard went away at step {trainer.global_step}")


class RecordTargetTokens(L.Callback):
    """Target tokens of each optimizer step, summed over its micro-batches, from the batches
    themselves (one process): what `train/target_tokens` must say at that step."""

    seen: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        RecordTargetTokens.seen[step] = RecordTargetTokens.seen.get(step, 0) + int(
            batch.get("num_target_tokens", 0)
        )


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _only_run(root: Path, experiment: str = "vlmlab"):
    client = _client(root)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    return client, run


def _raise_at(step: int, kind: str = "RuntimeError") -> str:
    return (
        "trainer.extra_callbacks=[{_target_:tests.test_tracking.RaiseAtStep,"
        f"step:{step},kind:{kind}}}]"
    )


def test_run_records_identity_metrics_and_artifacts(compose_cfg, tmp_path: Path) -> None:
    # a tiny clip value: the logged grad norm must be the norm *before* clipping
    cfg = compose_cfg("stage=1", "connector=linear", "trainer.gradient_clip_val=0.0001")
    result = train(cfg)
    client, run = _only_run(tmp_path)
    tags = run.data.tags

    assert run.info.status == "FINISHED"
    assert run.info.run_name == "s1-linear"
    commit = git_commit()["git.commit"]
    assert tags["git.commit"] == commit and len(commit) == 40
    assert tags["git.dirty"] in ("true", "false")
    shard_dir = Path(cfg.data.root).resolve()
    manifests = list(shard_dir.glob("shapes-*/shards/align/manifest.json"))
    assert len(manifests) == 1
    assert tags["data.manifest_sha256"] == hashlib.sha256(manifests[0].read_bytes()).hexdigest()
    assert tags["choice.encoder"] == "tiny" and tags["stage"] == "1"

    norms = client.get_metric_history(run.info.run_id, "train/grad_norm")
    assert len(norms) >= 3  # one per optimizer step (log_every_n_steps=1)
    assert all(math.isfinite(m.value) and m.value > 0.0001 for m in norms)
    assert result["metrics"]["train/grad_norm"] > 0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "trainable_parameters.txt", "samples"} <= artifacts
    table = Path(
        client.download_artifacts(run.info.run_id, "trainable_parameters.txt", str(tmp_path))
    )
    assert "connector" in table.read_text()
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    pngs = sorted(p for p in samples if p.endswith(".png"))
    assert len(pngs) == 4 and "samples/samples.md" in samples
    page = Path(client.download_artifacts(run.info.run_id, "samples/samples.md", str(tmp_path)))
    text = page.read_text()
    assert text.count("![") == 4 and "What" in text  # each image next to its question


PER_STEP_METRICS = (
    "train/loss",
    "train/target_tokens",
    "train/grad_norm",
    "data/padding_fraction",
    "data/samples_per_row",
    "train/skipped_nonfinite",
    "train/skipped_empty",
)


@pytest.mark.parametrize("every", [2, 1000])
def test_per_step_metrics_are_written_on_lightnings_logging_steps_and_the_last(
    compose_cfg, tmp_path: Path, every: int
) -> None:
    """The module logs its per-step metrics only on the steps Lightning writes and on the last
    one (a `self.log` per metric per step cost about 1 % of a step): every metric must still
    reach MLflow at each written step, and the stage's summary must hold all of them, also when
    the run is shorter than `log_every_n_steps`."""
    RecordTargetTokens.seen = {}
    cfg = compose_cfg(
        "stage=2",  # instructions: target tokens differ from step to step
        "stage.init_from=null",
        "connector=linear",
        f"trainer.log_every_n_steps={every}",
        "trainer.extra_callbacks=[{_target_:tests.test_tracking.RecordTargetTokens}]",
    )
    result = train(cfg)
    client, run = _only_run(tmp_path)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in PER_STEP_METRICS}
    assert set(PER_STEP_METRICS) <= set(result["metrics"])
    last = max(RecordTargetTokens.seen)
    # the summary ends with the last step's values, not those of the last written step
    assert result["metrics"]["train/target_tokens"] == RecordTargetTokens.seen[last]
    if every == 2:
        written = [m.step for m in history["train/loss"]]
        assert len(written) >= 2 and all(s % 2 == 1 for s in written), written
        for key, metrics in history.items():
            assert [m.step for m in metrics] == written, key
        # fresh values at each written step (Lightning would write a stale one otherwise)
        tokens = {m.step: m.value for m in history["train/target_tokens"]}
        assert tokens == {s: RecordTargetTokens.seen[s] for s in written}


def test_failure_mid_training_ends_failed_with_error_and_metrics(
    compose_cfg, tmp_path: Path
) -> None:
    cfg = compose_cfg("stage=1", "connector=linear", _raise_at(3))
    with pytest.raises(RuntimeError, match="shard went away at step 3"):
        train(cfg)
    client, run = _only_run(tmp_path)
    assert run.info.status == "FAILED"
    error = run.data.tags["error"]
    assert error.startswith("RuntimeError: shard went away at step 3")
    assert "Traceback" in error and "on_train_batch_start" in error
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "tests/test_tracking.py" in text and "raise RuntimeError" in text  # full traceback
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [0, 1, 2]  # everything before the failure is kept


def test_ctrl_c_ends_killed(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("stage=1", "connector=linear", _raise_at(2, "KeyboardInterrupt"))
    # Lightning turns Ctrl-C into a graceful shutdown and `sys.exit(1)`
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        train(cfg)
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith("KeyboardInterrupt")


def test_bad_extra_callback_is_a_config_error_and_a_failed_run(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("stage=1", "trainer.extra_callbacks=[{_target_:vlmlab.no.Such}]")
    with pytest.raises(ConfigError, match=r"trainer.extra_callbacks\[0\]"):
        train(cfg)
    _, run = _only_run(tmp_path)
    assert run.info.status == "FAILED" and "ConfigError" in run.data.tags["error"]


def test_stage2_lineage_tag_is_a_valid_init_from(compose_cfg, tmp_path: Path) -> None:
    first = train(compose_cfg("stage=1", "connector=linear"))
    client = _client(tmp_path)
    stage1_run = next(
        r for r in client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    )
    second = train(compose_cfg("stage=2", "connector=linear", "trainer.max_steps=2"))
    runs = client.search_runs(
        [stage1_run.info.experiment_id], order_by=["attributes.start_time ASC"]
    )
    stage2_run = runs[-1]
    tag = stage2_run.data.tags["vlmlab.parent_stage_run"]
    assert tag == stage1_run.info.run_id
    assert tag in stage2_run.data.tags["mlflow.note.content"]  # the UI link in the description
    assert stage2_run.data.tags["init_from"] == first["checkpoint"]

    # the tag's value is what `stage.init_from` takes to start from the same checkpoint
    third = train(
        compose_cfg("stage=2", "connector=linear", "trainer.max_steps=2", f"stage.init_from={tag}")
    )
    last = client.search_runs(
        [stage1_run.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert last.data.tags["init_from"] == first["checkpoint"]
    assert last.data.tags["vlmlab.parent_stage_run"] == tag
    assert second["checkpoint"] != third["checkpoint"]


def test_run_name_is_readable() -> None:
    choices = {"encoder": "clip336", "connector": "mlp", "llm": "vicuna7b", "stage": "1"}
    sweep = ["connector=mlp", "encoder=clip336", "seed=1", "stage='1'", "trainer.max_steps=5"]
    assert run_name("1", choices, sweep) == "s1-mlp-clip336-seed1"
    assert run_name("2", choices, []) == "s2-clip336-mlp-vicuna7b"
    swept = ("connector", "encoder.config.image_size", "seed")
    job = ["connector=mlp", "encoder.config.image_size=48", "seed=3", "data.batch_size=8"]
    assert run_name("2", choices, job, swept) == "s2-mlp-image_size=48-seed3"


def test_git_commit_outside_a_checkout_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_ddp_rank_of_a_sweep_job_runs_only_its_job() -> None:
    sweep = ["-m", "connector=linear,mlp", "seed=1,2", "trainer.devices=2"]
    lightning_added = [
        'hydra.run.dir="/x/runs/hydra/now"',
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    job = '{"overrides": ["connector=mlp", "seed=2", "trainer.devices=2"], "output_dir": "/s/3"}'
    env = {"LOCAL_RANK": "1", JOB_ENV: job}
    assert argv_for_rank([*sweep, *lightning_added], env) == [
        "connector=mlp",
        "seed=2",
        "trainer.devices=2",
        "hydra.run.dir=/s/3",
        "hydra.job.name=train_ddp_process_1",
        "hydra.output_subdir=null",
    ]
    # rank 0, or a rank of a single run, keeps its command line
    assert argv_for_rank(sweep, {"LOCAL_RANK": "0", JOB_ENV: job}) == sweep
    assert argv_for_rank(["connector=mlp"], env) == ["connector=mlp"]


def test_launcher_presets_scale_with_the_trainer(compose_cfg) -> None:
    from hydra.utils import get_class

    slurm = compose_cfg(
        "hydra/launcher=slurm",
        "trainer.num_nodes=4",
        "trainer.devices=8",
        "hydra.launcher.partition=gpu",
    ).hydra.launcher
    assert (slurm.nodes, slurm.gpus_per_node, slurm.tasks_per_node) == (4, 8, 8)
    assert slurm.partition == "gpu" and slurm.timeout_min > 0
    assert slurm._target_.endswith("SlurmLauncher")
    local = compose_cfg("hydra/launcher=local", "trainer.devices=2").hydra.launcher
    assert (local.nodes, local.gpus_per_node, local.tasks_per_node) == (1, 2, 1)
    assert local._target_.endswith("LocalLauncher")
    get_class(local._target_)  # the plugin is installed and importable
    callbacks = compose_cfg().hydra.callbacks
    assert callbacks.mlflow_sweep._target_ == "vlmlab.tracking.sweep.MlflowSweepCallback"
    assert not compose_cfg("hydra/callbacks=none").hydra.callbacks


def test_report_means_stds_failed_runs_and_parent_artifacts(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("abl", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"vlmlab.sweep": "parent"}).info.run_id
    values = {"linear": [0.5, 0.7, 0.6], "mlp": [0.9, 0.8, 1.0]}
    for connector, accs in values.items():
        for seed, acc in enumerate(accs):
            run = client.create_run(
                exp, tags={"connector": connector, "mlflow.parentRunId": parent}
            ).info.run_id
            client.log_param(run, "seed", seed)
            client.log_metric(run, "eval/accuracy", acc)
            client.set_terminated(run, "FINISHED")
    broken = client.create_run(exp, tags={"connector": "mlp", "mlflow.parentRunId": parent})
    client.log_metric(broken.info.run_id, "eval/accuracy", 0.0)
    client.set_tag(broken.info.run_id, "error", "RuntimeError: boom\ntraceback")
    client.set_terminated(broken.info.run_id, "FAILED")

    summary = report("abl", ["connector"], ["eval/accuracy"], tmp_path / "out", uri, parent)
    text = (tmp_path / "out" / "report.md").read_text()
    # the 95 % interval is scipy's one-sample t interval of the mean
    for connector, mean in (("linear", "0.6000"), ("mlp", "0.9000")):  # the failed run: not in
        lo, hi = stats.ttest_1samp(values[connector], 0.0).confidence_interval(0.95)
        assert f"| {connector} | 3 | {mean} ± 0.1000 [{lo:.4f}, {hi:.4f}] (n=3) |" in text
    assert "RuntimeError: boom" in text and "FAILED" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["logged_to"] == parent
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.png"} <= logged
    with pytest.raises(ConfigError, match="no MLflow experiment"):
        report("nope", ["connector"], ["eval/accuracy"], tmp_path / "x", uri)


def test_report_pairs_arms_by_seed_with_scipys_paired_interval(tmp_path: Path) -> None:
    """A 2x2 ablation over seeds: every two arms that differ in one key are compared seed by
    seed on the seeds both ran; the interval is scipy's paired t interval, and the verdict
    says whether it excludes 0."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("abl2", artifact_location=(tmp_path / "art").as_uri())
    acc = {  # (connector, size) -> per seed; mlp is ahead by 0.05-0.07 on every seed at 48 px
        ("linear", "48"): {1: 0.50, 2: 0.62, 3: 0.55, 4: 0.70, 5: 0.58},
        ("mlp", "48"): {1: 0.56, 2: 0.68, 3: 0.61, 4: 0.75, 5: 0.65},
        ("linear", "64"): {1: 0.52, 2: 0.60, 3: 0.61, 4: 0.66, 5: 0.61},
        ("mlp", "64"): {1: 0.60, 2: 0.55, 3: 0.70, 4: 0.61, 5: 0.64},  # seed 6 only here, below
    }
    for (connector, size), per_seed in acc.items():
        for seed, value in per_seed.items():
            run = client.create_run(exp, tags={"connector": connector}).info.run_id
            client.log_param(run, "encoder.config.image_size", size)
            client.log_param(run, "seed", seed)
            client.log_metric(run, "eval/accuracy", value)
            client.set_terminated(run, "FINISHED")
    lone = client.create_run(exp, tags={"connector": "mlp"}).info.run_id  # seed 6: no partner
    client.log_param(lone, "encoder.config.image_size", "64")
    client.log_param(lone, "seed", 6)
    client.log_metric(lone, "eval/accuracy", 0.99)
    client.set_terminated(lone, "FINISHED")

    group_by = ["connector", "encoder.config.image_size"]
    summary = report("abl2", group_by, ["eval/accuracy"], tmp_path / "out", uri)
    text = (tmp_path / "out" / "report.md").read_text()
    found = {
        (p["key"], p["from"][group_by[1 - group_by.index(p["key"])]]): p for p in summary["paired"]
    }
    assert len(summary["paired"]) == 4  # connector at 48 and 64, size at linear and mlp
    for base, other, key, at in [
        (("linear", "48"), ("mlp", "48"), "connector", "48"),
        (("linear", "64"), ("mlp", "64"), "connector", "64"),
        (("linear", "48"), ("linear", "64"), "encoder.config.image_size", "linear"),
        (("mlp", "48"), ("mlp", "64"), "encoder.config.image_size", "mlp"),
    ]:
        pair = found[(key, at)]
        seeds = [1, 2, 3, 4, 5]  # seed 6 has no partner in any comparison
        assert pair["seeds"] == [str(s) for s in seeds]
        a, b = [acc[base][s] for s in seeds], [acc[other][s] for s in seeds]
        assert pair["diffs"] == pytest.approx([y - x for x, y in zip(a, b)])
        lo, hi = stats.ttest_rel(b, a).confidence_interval(0.95)
        assert pair["ci95"] == pytest.approx([lo, hi])
        assert pair["verdict"] == ("real" if lo > 0 or hi < 0 else "not resolved")
    assert found[("connector", "48")]["verdict"] == "real"
    assert found[("connector", "64")]["verdict"] == "not resolved"
    assert "## Paired comparisons (same seed)" in text and "## Per seed" in text
    assert "| connector: linear -> mlp / encoder.config.image_size=48 | eval/accuracy | 5 |" in text
    assert "| mlp | 64 | 6 | 0.9900 |" in text  # the per-seed table lists every finished run
    mlp64 = next(
        r for r in summary["rows"] if r["config"] == {"connector": "mlp", group_by[1]: "64"}
    )
    values = [*acc[("mlp", "64")].values(), 0.99]
    assert mlp64["ci95"]["eval/accuracy"] == pytest.approx(
        list(stats.ttest_1samp(values, 0.0).confidence_interval(0.95))
    )
