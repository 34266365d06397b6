"""Label-side helpers on tensors: which positions the loss reads."""

from __future__ import annotations

import torch

from vlmlab.text import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices b*T + p of the hidden positions whose next label is a target.

    The target id of index i is `labels.view(-1)[i + 1]` (p <= T - 2, so i + 1 stays in row b).
    `nonzero` synchronises with the device: `collate` computes this on the CPU instead.
    """
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols
