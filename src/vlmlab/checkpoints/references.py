"""Run references: `runs:/<run_id>[/...]` or a bare 32-hex MLflow run id, told from paths.

Only the syntax lives here; which checkpoint a run recorded is the tracking store's answer
(`vlmlab.tracking.runs.checkpoint_of_run`), so this package stays path-based and MLflow-free.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdef")


def is_run_reference(value: str) -> bool:
    return value.startswith("runs:/") or (len(value) == 32 and set(value) <= _HEX)


def run_id_of(reference: str) -> str:
    """The run id a reference names (`runs:/<id>/artifacts` -> `<id>`)."""
    return reference.removeprefix("runs:/").strip("/").split("/")[0]
