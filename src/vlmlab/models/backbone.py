"""`backbone_of`: the Backbone contract of a component, whatever wraps it.

Stage policy (train_last, unused parameters, activation checkpointing), FSDP's shard units and
the planner ask this function, never the module tree, what a component's blocks are.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import Backbone, LanguageModel
from vlmlab.models.llm import HFCausalLM


def backbone_of(module: nn.Module, key: str = "model") -> Backbone:
    """The component's Backbone: itself (our encoders), or its adapter (a transformers LLM).

    A peft (LoRA) wrapper is looked through: the adapters sit inside the same blocks.
    `key` names the component in the error.
    """
    inner: Any = module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if isinstance(inner, Backbone):
        return inner
    if isinstance(inner, LanguageModel):
        return HFCausalLM(cast(LanguageModel, module))
    raise ConfigError(
        key,
        f"{type(inner).__name__} implements neither Backbone nor LanguageModel "
        "(vlmlab.models.contracts).",
        "give it blocks(), unused_parameters(), enable_activation_checkpointing() and hidden_size.",
    )


def block_names(component: nn.Module, key: str = "model") -> list[str]:
    """Dotted names (under `component`) of the Backbone's blocks, found by module identity."""
    names = {id(m): name for name, m in component.named_modules()}
    return [names[id(block)] for block in backbone_of(component, key).blocks()]
