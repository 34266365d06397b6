"""The contracts between parts: what the VLM, stage policy, FSDP and the planner rely on.

Protocols, with no implementation to inherit. The adapters name the contract they implement
(`HFVisionEncoder(nn.Module, VisionEncoder)`, `TimmVisionEncoder`, `llm.HFCausalLM`), so mypy
checks them against it; anything else that fits the shape works too (runtime_checkable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


@runtime_checkable
class ModulePart(Protocol):
    """What the VLM uses of every part as an nn.Module (each part is one)."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Backbone(Protocol):
    """A component made of repeated transformer blocks (the encoder, the LLM).

    Declares what stage policy, FSDP and activation checkpointing rely on, so none of them
    guesses from the module tree: its width, its blocks (FSDP's shard units, `train_last`,
    the planner's layer count) and the parameters its forward never reaches (no gradient ever:
    training them would be a silent no-op, and DDP fails on them).
    """

    hidden_size: int

    def blocks(self) -> list[nn.Module]: ...

    def unused_parameters(self) -> list[nn.Parameter]: ...

    def enable_activation_checkpointing(self) -> None: ...


@runtime_checkable
class VisionEncoder(ModulePart, Backbone, Protocol):
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
class Connector(ModulePart, Protocol):
    """features (B, N, Dv) -> LLM embeddings (B, M, Dl)."""

    def num_tokens(self, num_input_tokens: int) -> int: ...

    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LanguageModel(ModulePart, Protocol):
    """The causal LM inside the VLM: a transformers causal LM (or peft wrapping one).

    The VLM embeds text with `get_input_embeddings`, runs `get_decoder` and applies
    `get_output_embeddings` itself (chunked loss), or calls the model for full logits.
    """

    config: Any
    dtype: torch.dtype

    def get_input_embeddings(self) -> nn.Embedding: ...

    def get_output_embeddings(self) -> nn.Module | None: ...

    def get_decoder(self) -> nn.Module: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class LLMBackbone(Backbone, Protocol):
    """The Backbone view of a LanguageModel (`vlmlab.models.backbone.backbone_of` gives it)."""

    model: LanguageModel
