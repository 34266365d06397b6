"""LLaVA v1's connector: one linear map per patch."""

from __future__ import annotations

import torch
from torch import nn


class LinearConnector(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    @classmethod
    def expected_num_parameters(cls, in_features: int, out_features: int) -> int:
        """Dv*Dl + Dl."""
        return in_features * out_features + out_features

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # (B, N, Dv) -> (B, N, Dl)
