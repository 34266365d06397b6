"""The contracts between parts (Protocols, no implementation inheritance)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class VisionEncoder(Protocol):
    """pixels (B, 3, H, W) -> features (B, N, D) of the selected layer."""

    hidden_size: int
    image_size: int
    num_patches: int
    has_cls: bool
    image_transform: Callable[[Image.Image], torch.Tensor]

    @property
    def num_tokens(self) -> int: ...

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Connector(Protocol):
    """features (B, N, Dv) -> LLM embeddings (B, M, Dl)."""

    def num_tokens(self, num_input_tokens: int) -> int: ...

    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...
