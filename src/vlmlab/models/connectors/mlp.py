"""LLaVA-1.5's connector: an MLP of `depth` linear layers with GELU between (mlp2x_gelu = depth 2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.connectors import init_arguments


class MLPConnector(nn.Module):
    def __init__(self, in_features: int, out_features: int, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError("connector.depth", f"must be >= 1, got {depth}.")
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features)]
        self.layers = nn.Sequential(*layers)

    @classmethod
    def expected_num_parameters(cls, in_features: int, out_features: int, **knobs: Any) -> int:
        """Dv*Dl + Dl + (depth-1)(Dl^2 + Dl): both biases of mlp2x_gelu count."""
        depth = init_arguments(cls, in_features, out_features, knobs)["depth"]
        dl = out_features
        return in_features * dl + dl + (depth - 1) * (dl * dl + dl)

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # (B, N, Dv) -> (B, N, Dl)
