"""Numerical guards: an optimizer step with a non-finite loss or gradient norm is skipped.

Why: one NaN (a corrupt image, an overflow after unfreezing the vision tower) reaches every
weight through AdamW and the run trains on garbage until someone looks at the curve. Here a
bad step is skipped by every rank together (the decision is one all-reduced flag: a rank that
skipped alone would leave DDP replicas or FSDP shards out of step), counted
(`train/skipped_nonfinite`) and logged with the sample ids of the whole step; after
`trainer.fail_after_nonfinite_steps` bad steps in a row the run fails with those ids, and
since no bad step ever changed a weight, the newest resumable checkpoint is a good one.

A skipped step still consumes its batches and counts as a step (global step, LR schedule, data
position stay in lockstep, so a resume is exact); it changes no weight and no optimizer state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "trainer.fail_after_nonfinite_steps"


class NonFiniteError(RuntimeError):
    """The run met K non-finite optimizer steps in a row (or non-finite weights at a save)."""


def check_fail_after(value: Any) -> int:
    """`trainer.fail_after_nonfinite_steps` as a positive int (ConfigError naming the key)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            KEY,
            f"got {value!r}.",
            "give a positive integer: the number of non-finite optimizer steps in a row "
            "that fails the run (1: the first one).",
        )
    return value


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises NonFiniteError at the K-th bad step in a row."""

    fail_after: int
    total: int = 0  # skipped steps since the run began (kept in checkpoints)
    streak: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, sample ids)

    def record(self, step: int, bad: bool, ids: list[str]) -> None:
        """One optimizer step's verdict (the same on every rank)."""
        if not bad:
            self.streak = []
            return
        self.total += 1
        self.streak.append((step, ids))
        log.warning(
            "step %d skipped: non-finite loss or gradient norm (%d in a row, %d in this run); "
            "its samples: %s",
            step,
            len(self.streak),
            self.total,
            ", ".join(ids) or "(none)",
        )
        if len(self.streak) >= self.fail_after:
            raise NonFiniteError(self.failure_message())

    def failure_message(self) -> str:
        steps = ", ".join(str(step) for step, _ in self.streak)
        lines = "\n".join(
            f"  step {step}: {', '.join(ids) or '(none)'}" for step, ids in self.streak
        )
        return (
            f"{len(self.streak)} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(steps {steps}; {KEY}={self.fail_after}). None of them changed the weights; the "
            f"newest resumable checkpoint is the resume point (resume=auto). Sample ids by step:\n"
            f"{lines}\nCheck these samples, or lower stage.optim.lr / raise {KEY}."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "streak": [[s, list(ids)] for s, ids in self.streak]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("total", 0))
        self.streak = [(int(s), [str(i) for i in ids]) for s, ids in state.get("streak", [])]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2): no collective inside the check."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def step_gradients(
    optimizer: Any, params: Iterable[torch.Tensor], with_norm: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """This rank's gradients in the optimizer's order and, with `with_norm`, their L2 norm.

    Why: the guard needs the norm, `train/grad_norm` logs it and clipping scales by it; computed
    once here instead of three times (each a pass over every gradient). In the optimizer's order,
    as Lightning's clipping reads them (`Precision.main_params`), the norm is bit-identical to
    the one `clip_grad_norm_` would compute. `with_norm` only for plain gradients (one process,
    DDP), where this rank's norm is the global one; sharded ones (FSDP) get none here.
    """
    if optimizer is not None:
        params = (p for group in optimizer.param_groups for p in group["params"])
    grads = [p.grad for p in params if p.grad is not None]
    if not with_norm or not grads:
        return grads, None
    return grads, torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def nonfinite_flag(
    loss_sum: torch.Tensor | None,
    grads: Iterable[torch.Tensor],
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """1.0 where this rank's step loss or the norm of its (local) gradients is not finite
    (`norm`: that norm, already computed by `step_gradients`).

    A 0-dim fp32 tensor on the loss's device, never read on the host here: the caller
    all-reduces it with the other ranks' flags and reads the sum once per optimizer step.
    """
    local = [] if norm is not None else [_local(g) for g in grads]
    parts = []
    if loss_sum is not None:
        parts.append(~torch.isfinite(loss_sum.detach().float().sum()))
    if local:
        norm = torch.nn.utils.get_total_norm(local, norm_type=2.0)
    if norm is not None:
        parts.append(~torch.isfinite(norm).to(parts[0].device if parts else norm.device))
    if not parts:
        return torch.zeros(())
    return torch.stack(parts).any().float()


def nonfinite_weights(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 where any of these (local) weights is not finite: a save must not keep them."""
    local = [_local(p.detach()) for p in params]
    if not local:
        return torch.zeros(())
    # the max-abs norm: NaN or inf in, NaN or inf out, and no overflow of a sum of squares
    norm = torch.nn.utils.get_total_norm(local, norm_type=float("inf"))
    return (~torch.isfinite(norm)).float()
