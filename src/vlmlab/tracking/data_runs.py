"""`vlmlab curate` and `vlmlab generate` as MLflow runs: their settings as params, the count of
each reason as metrics, report / summary as artifacts, and the sha256 of the data they wrote as
a tag (`vlmlab.data.output_sha256`), the same digest as the dataset output they log.

Why: a model should trace back to the curation of its data; the curated JSON's checksum is
what joins a data run to the shards made from it. Read from the verb's own output folder
(`summary.json`), so `curate` and `generate` stay free of MLflow (they sit below tracking).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlmlab.data.shards import sha256_file
from vlmlab.tracking.datasets import log_dataset_inputs
from vlmlab.tracking.mlflow import git_commit
from vlmlab.tracking.ui import ensure_experiment

log = logging.getLogger(__name__)

OUTPUTS = {"curate": "kept.json", "generate": "llava.json"}  # the data each verb writes
ARTIFACTS = ("summary.json", "report.md", "report.png", "rejected.jsonl", "bad_input.jsonl")
RUN_FILE = "mlflow_run.json"  # in the output folder: the run that logged it


def _flat(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, into)
    else:
        into[prefix] = json.dumps(value) if isinstance(value, list) else str(value)


def log_data_run(verb: str, out: Path, argv: list[str], tracking_uri: str, experiment: str) -> str:
    """One FINISHED run for a finished `vlmlab <verb>` writing to `out`; returns its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    summary = json.loads((out / "summary.json").read_text())
    data = out / OUTPUTS[verb]
    sha = sha256_file(data) if data.is_file() else "unknown"
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment)
    run = client.create_run(
        experiment_id,
        run_name=f"{verb}-{out.name}",
        tags={"vlmlab.verb": verb, "vlmlab.data.output_sha256": sha, **git_commit()},
    )
    run_id = run.info.run_id
    params: dict[str, str] = {}
    _flat("", {k: v for k, v in summary.items() if k not in ("counts",)}, params)
    now = run.info.start_time
    metrics = [
        Metric(f"{verb}/{reason.replace(':', '/')}", float(count), now, 0)
        for reason, count in summary["counts"].items()
    ]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k[:250], v[:6000]) for k, v in params.items()],
        tags=[RunTag("vlmlab.command", " ".join(["vlmlab", verb, *argv])[:5000])],
    )
    if data.is_file():  # the data it wrote, as the run's output dataset
        dataset = Dataset(
            name=f"{verb}-{out.name}",
            digest=sha[:36],
            source_type="local",
            source=json.dumps({"uri": str(data.resolve())}),
            schema=json.dumps({"sha256": sha}),
            profile=json.dumps({"num_samples": summary.get("kept")}),
        )
        output = DatasetInput(dataset, [InputTag("mlflow.data.context", "output")])
        log_dataset_inputs(client, run_id, [output])
    for name in ARTIFACTS:
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id, "FINISHED")
    (out / RUN_FILE).write_text(
        json.dumps({"run_id": run_id, "tracking_uri": tracking_uri, "output_sha256": sha})
    )
    log.info("MLflow run %s logged %s's report and counts (%s)", run_id, verb, tracking_uri)
    return str(run_id)
