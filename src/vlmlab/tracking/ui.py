"""What a user sees first in the MLflow UI: the experiment's kind, a saved runs-table view,
and the URL that opens a stage's or a sweep's runs directly.

Why: MLflow 3.17's UI opens an experiment in the workflow of its sidebar switch ("GenAI apps &
agents" or "Model training"), read from the URL's `workflowType` (genai | machine_learning),
else from the browser's local storage (`mlflow.workflowType`, GenAI when never set); in 3.17
this switch decides the landing tab, and the experiment tag `mlflow.experimentKind` only
labels the experiment (older UIs and the experiment list read it). A first visit to
`#/experiments/<id>` therefore lands on Traces. The runs table shows Source / Models / Dataset
columns until a user adds metric columns by hand; a view saved in the experiment tag
`mlflow.sharedViewState.<key>` and opened with `viewStateShareKey=<key>` sets the columns, the
filter and the sort. So vlmlab tags the experiments it creates as model training, saves one
view per stage and per sweep, and prints the URL with `workflowType=machine_learning` and the
view's key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import urlencode

log = logging.getLogger(__name__)

KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
VIEW_TAG = "mlflow.sharedViewState."  # + key: a saved runs-table view (MLflow UI)
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` listen by default
# What a user compares, as runs-table columns (where a run logged them).
COMPARED_METRICS = ("eval/accuracy", "train/loss", "perf/samples_per_s", "perf/tokens_per_s")


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created as a model-training experiment when missing.

    An existing experiment without a kind gets the training kind too (vlmlab made it, or it
    was empty); a kind set by a user is left alone.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(
            client.create_experiment(
                name, artifact_location=artifact_location, tags={KIND_TAG: TRAINING_KIND}
            )
        )
    mark_training(client, found)
    return str(found.experiment_id)


def mark_training(client: Any, experiment: Any) -> None:
    """Give an existing experiment without a kind the training kind (a user's kind stays)."""
    if KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)


def column(kind: str, name: str) -> str:
    """A runs-table column key as the MLflow UI writes it: metrics.`eval/accuracy`."""
    return f"{kind}.`{name}`"


def save_view(
    client: Any,
    experiment_id: str,
    key: str,
    title: str,
    search_filter: str,
    params: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
) -> None:
    """Save (or replace) the runs-table view `key`: its filter, the compared metrics, the given
    params and tags as columns, every run shown (the envelope MLflow 3.17's saved views use)."""
    columns = [
        column("attributes", "Dataset"),
        *(column("metrics", m) for m in COMPARED_METRICS),
        *(column("params", p) for p in params),
        *(column("tags", t) for t in tags),
        column("attributes", "Source"),
        column("attributes", "Models"),
    ]
    state = {
        "searchFilter": search_filter,  # other facets keep the UI's defaults
        # sorted by a metric, the table lists a sweep's jobs as rows of their own instead of
        # folding them under the parent (MLflow nests children only in start-time order)
        "orderByKey": column("metrics", COMPARED_METRICS[0]),
        "orderByAsc": False,
        "selectedColumns": columns,
        "runsHiddenMode": "SHOW_ALL",
    }
    now = int(time.time() * 1000)
    envelope = {"name": title, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(envelope))


def ui_base(configured: str | None, tracking_uri: str) -> str:
    """The MLflow UI's address: `logger.ui_url`, else the server itself for an http(s) store,
    else where `mlflow ui` listens by default."""
    if configured:
        return configured.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI


def runs_url(base: str, experiment_id: str, view: str | None = None, chart: bool = False) -> str:
    """The experiment's runs table (or chart view) in the Model training workflow."""
    query: dict[str, str] = {"workflowType": "machine_learning"}
    if view:
        query["viewStateShareKey"] = view
    if chart:
        query["compareRunsMode"] = "CHART"
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def announce(what: str, url: str, tracking_uri: str) -> None:
    """Log where to look, with the command that serves a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        log.info("MLflow: %s: %s", what, url)
    else:
        log.info(
            "MLflow: %s: %s (serve the store with `mlflow ui --backend-store-uri %s`)",
            what,
            url,
            tracking_uri,
        )
