"""Apply a stage policy: module-path globs that train, everything else frozen.

Every problem with a policy is collected and raised together before any training starts,
each naming its config key.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")


@dataclass
class StagePlan:
    """What `apply` decided: trainable parameter names and per-group optimizer settings."""

    trainable: list[str]
    groups: list[dict[str, Any]] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


def _matches(name: str, pattern: str) -> bool:
    # `connector` matches the module and everything under it; globs work on dotted paths.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def apply(policy: Any, model: nn.Module) -> StagePlan:
    """Freeze/unfreeze `model` per `policy` (stage config); return the plan and its table."""
    train_globs = list(policy.get("train") or [])
    freeze_globs = list(policy.get("freeze") or [])
    names = [name for name, _ in model.named_parameters()]
    problems = []
    for key, globs in (("stage.train", train_globs), ("stage.freeze", freeze_globs)):
        for pattern in globs:
            if not any(_matches(n, pattern) for n in names):
                problems.append(
                    f"{key}: glob {pattern!r} matches no parameter (components: {', '.join(COMPONENTS)})."
                )
    trainable = [
        n
        for n in names
        if any(_matches(n, g) for g in train_globs)
        and not any(_matches(n, g) for g in freeze_globs)
    ]
    if not trainable and not problems:
        problems.append(
            "stage.train: nothing would train. Name at least one module, e.g. train: [connector]."
        )
    if problems:
        raise ConfigError("stage", "invalid stage policy:\n  " + "\n  ".join(problems))
    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    model.train()  # re-evaluates frozen-encoder eval mode
    table = parameter_table(model)
    return StagePlan(trainable=trainable, table=table)


def parameter_table(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable/frozen parameter counts per top-level component."""
    rows = []
    for component, module in model.named_children():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append(
            {
                "component": component,
                "trainable": trainable,
                "frozen": total - trainable,
                "total": total,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The `[TRAINABLE]` / `[Frozen]` table printed at the start of every stage."""
    lines = [f"{'component':<12}{'state':<13}{'trainable':>14}{'frozen':>14}{'total':>14}"]
    for row in rows:
        state = (
            "[Frozen]"
            if row["trainable"] == 0
            else ("[TRAINABLE]" if row["frozen"] == 0 else "[partial]")
        )
        lines.append(
            f"{row['component']:<12}{state:<13}{row['trainable']:>14,}{row['frozen']:>14,}{row['total']:>14,}"
        )
    total_t = sum(r["trainable"] for r in rows)
    total = sum(r["total"] for r in rows)
    lines.append(f"{'all':<12}{'':<13}{total_t:>14,}{total - total_t:>14,}{total:>14,}")
    return "\n".join(lines)
