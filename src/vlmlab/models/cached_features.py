"""`CachedFeatures`: the encoder slot of a model that trains on a feature cache.

Why: a stage whose encoder is frozen reads the encoder's outputs from a cache
(`vlmlab.data.features`), so the vision tower is never built or loaded (its weights, its
forward and its memory are saved). This module stands where the tower would be: it has no
parameters, states the widths the connector and the token counter need, and passes the cached
features (K, N, Dv) through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import nn


class CachedFeatures(nn.Module):
    """The VisionEncoder contract without a tower: `forward` takes features, not pixels."""

    cached = True  # the model's vision input is the cached features (`VisionLanguageModel`)

    def __init__(
        self,
        hidden_size: int,
        num_tokens: int,
        image_size: int,
        num_patches: int,
        has_cls: bool,
        image_transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self._num_tokens = num_tokens
        self.image_size = image_size
        self.num_patches = num_patches
        self.has_cls = has_cls
        self.image_transform = image_transform

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def blocks(self) -> list[nn.Module]:
        return []

    def unused_parameters(self) -> list[nn.Parameter]:
        return []

    def enable_activation_checkpointing(self) -> None:
        """Nothing runs here, so there is nothing to checkpoint."""

    def blank(self, like: torch.Tensor) -> torch.Tensor:
        """Features of one blank image for the vision anchor (its value is multiplied by 0)."""
        return like.new_zeros((1, self._num_tokens, self.hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(K, N, Dv) cached features -> the same tensor; pixels here are a wiring error."""
        expected = (self._num_tokens, self.hidden_size)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"a model built on cached features takes (K, {expected[0]}, {expected[1]}) "
                f"features, got {tuple(features.shape)}: were the batches made from pixels? "
                "(data.features decides; the DataModule and the model must agree)"
            )
        return features
