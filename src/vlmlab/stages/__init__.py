"""Stages are data: a YAML policy says what trains; `apply` enforces it on the model."""

from vlmlab.stages.policy import (
    StagePlan,
    apply,
    check_before_build,
    checkpointed_components,
    config_problems,
    parameter_table,
    sharding_problem,
)

__all__ = [
    "StagePlan",
    "apply",
    "check_before_build",
    "checkpointed_components",
    "config_problems",
    "parameter_table",
    "sharding_problem",
]
