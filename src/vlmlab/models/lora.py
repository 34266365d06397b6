"""LoRA adapters on a component of the VLM (peft), with the models they modify.

The stage policy decides where LoRA goes (`stage.lora`); checkpoints re-apply a recorded
LoRA config when loading and merge it for export. Both call these functions.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def default_lora_targets(module: nn.Module) -> list[str]:
    """Every linear layer of the component except the output head (the LLaVA LoRA recipe)."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


def lora_config(spec: dict[str, Any], component: nn.Module) -> dict[str, Any]:
    """Resolved LoRA settings (peft LoraConfig fields), as recorded in checkpoints."""
    targets = spec.get("target_modules") or default_lora_targets(component)
    return {
        "target": spec.get("target", "llm"),
        "r": int(spec.get("r", 8)),
        "alpha": int(spec.get("alpha", 16)),
        "dropout": float(spec.get("dropout", 0.0)),
        "target_modules": list(targets),
        "exclude_modules": list(spec.get("exclude_modules") or ["lm_head"]),
        "bias": spec.get("bias", "none"),
        "use_rslora": bool(spec.get("use_rslora", False)),
        "use_dora": bool(spec.get("use_dora", False)),
    }


def wrap_lora(model: nn.Module, resolved: dict[str, Any]) -> None:
    """Replace `model.<target>` by a peft model carrying LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    component = getattr(model, resolved["target"])
    config = LoraConfig(
        r=resolved["r"],
        lora_alpha=resolved["alpha"],
        lora_dropout=resolved["dropout"],
        target_modules=resolved["target_modules"],
        exclude_modules=resolved["exclude_modules"],
        bias=resolved["bias"],
        use_rslora=resolved["use_rslora"],
        use_dora=resolved["use_dora"],
    )
    # on a meta model (`vlmlab plan`) the adapters are created there too: peft would otherwise
    # allocate and initialise them in memory first (GBs at r=128 on a 13B LLM)
    on_meta = any(p.is_meta for p in component.parameters())
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        setattr(model, resolved["target"], get_peft_model(component, config))


def merge_lora(model: nn.Module, target: str) -> None:
    """Fold LoRA adapters into the base weights and unwrap the component."""
    component = getattr(model, target)
    if hasattr(component, "merge_and_unload"):
        setattr(model, target, component.merge_and_unload())
