"""A stage's data as MLflow dataset inputs: one per shard set (one per mixture source) in the
`training` context, the held-out set in the `eval` context.

Why: MLflow's Dataset column and dataset filter read a run's inputs, not its tags; the digest
is the manifest's sha256 (what `data.manifest_sha256` tags), so runs on the same data share a
dataset row and a changed shard set shows as a new digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONTEXT_TAG = "mlflow.data.context"  # what the UI shows next to a dataset: training / eval


@dataclass(frozen=True)
class DataInput:
    """One dataset a run reads: what the Dataset column and the dataset filter show."""

    name: str
    digest: str  # the manifest's sha256 (or of the held-out file)
    source: str  # where it lives (a folder, URL or file)
    context: str  # training | eval
    profile: dict[str, Any]  # counts: samples, shards, with/without image, weight or count


def _shard_set_input(name: str, location: Path | str, context: str) -> DataInput:
    from vlmlab.data.shards import manifest_bytes

    raw = manifest_bytes(location)
    if raw is None:  # shards without a manifest: named, not counted
        return DataInput(name, "unknown", str(location), context, {})
    manifest = json.loads(raw)
    profile = {
        k: manifest[k]
        for k in ("num_samples", "num_with_image", "num_text_only", "num_tokens")
        if k in manifest
    }
    profile["num_shards"] = len(manifest.get("shards", []))
    lengths = manifest.get("token_lengths") or {}  # `vlmlab shards` data: tokens per sample
    profile.update(
        {f"tokens_{k}": lengths[k] for k in ("mean", "p50", "p95", "max") if k in lengths}
    )
    converted = (manifest.get("converter") or {}).get("args") or {}
    if converted.get("input_sha256"):  # the LLaVA JSON `vlmlab shards` read (curated data)
        profile["source_sha256"] = converted["input_sha256"]
    return DataInput(name, hashlib.sha256(raw).hexdigest(), str(location), context, profile)


def stage_inputs(dataset: Any, stage_dataset: str) -> list[DataInput]:
    """The inputs of a resolved dataset (`data.prepare.ResolvedDataset`): its shard set (named
    after `stage.dataset`) or each mixture source, and its held-out records."""
    inputs: list[DataInput] = []
    if dataset["shard_dir"] is not None:
        inputs.append(_shard_set_input(stage_dataset, dataset["shard_dir"], "training"))
    for source in dataset["sources"] or []:
        entry = _shard_set_input(source.name, source.shard_dir, "training")
        share = {"weight": source.weight} if source.weight is not None else {}
        if source.count is not None:
            share = {"count": source.count}
        inputs.append(
            DataInput(
                entry.name, entry.digest, entry.source, "training", {**entry.profile, **share}
            )
        )
    heldout = dataset["heldout"]
    if heldout is not None and Path(heldout).is_file():
        raw = Path(heldout).read_bytes()
        count = len(json.loads(raw)) if raw.lstrip()[:1] == b"[" else raw.count(b"\n")
        inputs.append(
            DataInput(
                f"{stage_dataset}-heldout",
                hashlib.sha256(raw).hexdigest(),
                str(heldout),
                "eval",
                {"num_samples": count},
            )
        )
    return inputs


def log_inputs(client: Any, run_id: str, inputs: list[DataInput]) -> None:
    """Log the inputs to the run (MLflow keeps one dataset row per name + digest)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entries = [
        DatasetInput(
            Dataset(
                name=item.name,
                digest=item.digest[:36],  # MLflow's digest column holds 36 characters
                source_type="local" if "://" not in item.source else "http",
                source=json.dumps({"uri": item.source}),
                schema=json.dumps({"manifest_sha256": item.digest}),
                profile=json.dumps(item.profile),
            ),
            [InputTag(CONTEXT_TAG, item.context)],
        )
        for item in inputs
    ]
    if entries:
        log_dataset_inputs(client, run_id, entries)


def log_dataset_inputs(client: Any, run_id: str, entries: list[Any]) -> None:
    """`client.log_inputs`, safe when parallel jobs log the same dataset (see below)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=entries)
            return
        except MlflowException as error:
            # Parallel jobs (joblib, a SLURM array) log the same dataset to one experiment: MLflow
            # looks the row up, then inserts it, so a job that lost the race to insert gets the
            # store's unique-constraint error. Retried, it finds the other job's row and links it.
            raced = any(word in str(error).lower() for word in ("unique", "duplicate"))
            if attempt == 2 or not raced:
                raise
            log.info("dataset inputs raced another job's (%s): retrying", type(error).__name__)
            time.sleep(0.2 * (attempt + 1))


def link_data_runs(client: Any, run_id: str, inputs: list[DataInput]) -> None:
    """Tag the run with the sha256 of the JSON each training shard set was made from and, when a
    `vlmlab curate` / `generate` run wrote that JSON, that run's id (`vlmlab.data_run`): a model
    traces back to its curation."""
    sources = {
        i.name: str(i.profile["source_sha256"])
        for i in inputs
        if i.context == "training" and i.profile.get("source_sha256")
    }
    if not sources:
        return
    experiments = [e.experiment_id for e in client.search_experiments()]
    for name, sha in sources.items():
        suffix = "" if len(sources) == 1 else f".{name}"
        client.set_tag(run_id, f"data.source_sha256{suffix}", sha)
        found = client.search_runs(
            experiments,
            filter_string=f"tags.`vlmlab.data.output_sha256` = '{sha}'",
            max_results=1,
        )
        if found:
            client.set_tag(run_id, f"vlmlab.data_run{suffix}", found[0].info.run_id)
