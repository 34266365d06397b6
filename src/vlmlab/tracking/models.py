"""A stage's final checkpoint as an MLflow logged model, registered, and `models:/` resolved.

Why: MLflow 3's Models tab and registry list logged models, not tags; a registered version
gives a stable name (`models:/demo-stage2/3`) that `vlmlab eval` and `stage.init_from` accept.
The weights stay where the stage wrote them (`paths.root/checkpoints/...`), for a local and a
remote store alike: the logged model records the folder (tag `checkpoint`, the model
version's source `file://...`) and copies only `meta.json` as its artifact, so a 7B stage is
not uploaded twice. A remote registry therefore names a folder on the training machine's disk
(or shared file system).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint"
MODEL_ID_TAG = "vlmlab.model_id"  # on a model version: the logged model it registers


def model_name(configured: str | None, experiment: str, stage: str) -> str:
    """`logger.model_name`, else `<experiment>-stage<stage>`: one registered model per stage,
    one version per run."""
    return configured or f"{experiment}-stage{stage}"


def register_checkpoint(
    client: Any,
    run_id: str,
    path: Path,
    name: str,
    metrics: dict[str, float],
    step: int,
    params: dict[str, str],
) -> tuple[str, str]:
    """Log `path` as the run's model, link its eval metrics, register a version of `name`.

    Returns (model id, version).
    """
    from mlflow.entities import Metric

    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=params,
        tags={CHECKPOINT_TAG: str(path)},
        model_type="vlmlab-checkpoint",
    )
    model_id = model.model_id
    meta = path / "meta.json"
    if meta.is_file():
        client.log_model_artifact(model_id, str(meta))
    now = model.creation_timestamp
    linked = [
        Metric(key, float(value), now, step, model_id=model_id)
        for key, value in metrics.items()
        if key.startswith("eval/")
    ]
    if linked:  # the model's metrics (and the run's again, the same values)
        client.log_batch(run_id, metrics=linked)
    client.finalize_logged_model(model_id, "READY")
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:  # an earlier run registered it: add a version
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=path.resolve().as_uri(),
        run_id=run_id,
        tags={CHECKPOINT_TAG: str(path), MODEL_ID_TAG: model_id},
        model_id=model_id,  # a SQL registry does not keep it: MODEL_ID_TAG does
    )
    # the logged model lists its registered versions, as mlflow.register_model records them
    client.set_logged_model_tags(
        model_id,
        {"mlflow.modelVersions": json.dumps([{"name": name, "version": version.version}])},
    )
    log.info("registered the stage checkpoint as models:/%s/%s", name, version.version)
    return model_id, str(version.version)


def checkpoint_of_model(reference: str, tracking_uri: str, key: str) -> Path:
    """`models:/<name>/<version>` (or `models:/<model id>`) -> the checkpoint folder it names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    parts = reference.removeprefix("models:/").strip("/").split("/")
    try:
        if len(parts) == 2:
            version = client.get_model_version(parts[0], parts[1])
            tags = version.tags
        else:
            tags = client.get_logged_model(parts[0]).tags
    except MlflowException as err:
        raise ConfigError(
            key,
            f"{reference} not found in {tracking_uri} ({err.message}).",
            "give models:/<registered name>/<version> as `mlflow models` lists it, and the "
            "store with --tracking-uri or MLFLOW_TRACKING_URI.",
        ) from err
    path = tags.get(CHECKPOINT_TAG)
    if not path:
        raise ConfigError(key, f"{reference} has no `{CHECKPOINT_TAG}` tag: not a vlmlab model.")
    return Path(path)
