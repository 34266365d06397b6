"""Stages are data: a YAML policy says what trains; `apply` enforces it on the model."""

from vlmlab.stages.policy import StagePlan, apply, parameter_table

__all__ = ["StagePlan", "apply", "parameter_table"]
