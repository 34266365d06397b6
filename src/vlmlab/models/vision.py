"""What both vision-encoder backends share: families, feature selection, layer indexing, dtypes.

`encoder.py` (transformers) and `timm_encoder.py` (timm) both import from here and never from
each other, so the two backends form no import cycle.
"""

from __future__ import annotations

import torch

from vlmlab.errors import ConfigError

# family: (transformers config class, transformers model class, has CLS token)
FAMILIES: dict[str, tuple[str, str, bool]] = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False),
}
SELECT_FEATURES = ("patch", "cls_patch")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_family(family: str) -> bool:
    """Validate `encoder.family`; returns whether the family has a CLS token."""
    if family not in FAMILIES:
        raise ConfigError(
            "encoder.family", f"unknown family {family!r}.", f"use one of {sorted(FAMILIES)}."
        )
    return FAMILIES[family][2]


def hf_classes(family: str) -> tuple[str, str]:
    """(config class, model class) names in transformers of a validated `encoder.family`."""
    check_family(family)
    config_cls, model_cls, _ = FAMILIES[family]
    return config_cls, model_cls


def check_select_feature(select_feature: str) -> None:
    if select_feature not in SELECT_FEATURES:
        raise ConfigError(
            "encoder.select_feature", f"got {select_feature!r}.", "use patch or cls_patch."
        )


def torch_dtype(dtype: str, key: str = "encoder.dtype") -> torch.dtype:
    """A preset's `dtype` as a torch dtype (weights load in it, not in the checkpoint's dtype)."""
    if dtype not in DTYPES:
        raise ConfigError(key, f"got {dtype!r}.", f"use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """`select_layer` as a non-negative index into the L+1 hidden states (0 = embeddings)."""
    if not (-num_layers - 1 <= select_layer <= num_layers):
        raise ConfigError(
            "encoder.select_layer",
            f"{select_layer} is out of range for a {num_layers}-layer encoder.",
            f"use a value in [{-num_layers - 1}, {num_layers}] (LLaVA uses -2).",
        )
    return select_layer % (num_layers + 1)


def num_feature_tokens(num_patches: int, has_cls: bool, select_feature: str) -> int:
    """Feature tokens per image handed to the connector (CLS kept only by `cls_patch`)."""
    return num_patches + int(has_cls and select_feature == "cls_patch")
