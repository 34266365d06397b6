"""Vision encoders: pixels -> patch features (B, N, D) from a chosen hidden layer.

LLaVA reads the penultimate layer (`select_layer=-2`) and drops the CLS token. SigLIP has no
CLS token, so `has_cls` is a property of the encoder family and no real patch is ever dropped.

Two backends implement the same contract from one preset YAML (`encoder.backend`):
`transformers` (CLIPVisionModel / SiglipVisionModel, the default) and `timm`
(`vlmlab.models.timm_encoder.TimmVisionEncoder`). `select_layer` indexes the hidden states as
transformers does in both: 0 = embeddings (after CLIP's pre-norm), k = output of block k,
-1 = last block, -2 = penultimate.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import VisionEncoder
from vlmlab.models.image_transform import ImageTransform
from vlmlab.models.llm import check_attn_implementation, enable_hf_checkpointing
from vlmlab.models.vision import (
    check_family,
    check_select_feature,
    hf_classes,
    hidden_state_index,
    num_feature_tokens,
    torch_dtype,
)

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "timm")

# keys of an encoder preset that only one backend reads
_TIMM_ONLY = ("timm_name", "timm_kwargs", "timm_checkpoint")
_HF_ONLY = ("name_or_path",)
# keys of an encoder preset that the VLM reads (its image strategy: `build_vlm`), not a tower
VLM_KEYS = ("image", "anyres")


class HFVisionEncoder(nn.Module, VisionEncoder):
    """A transformers CLIP/SigLIP vision tower behind the VisionEncoder contract."""

    def __init__(
        self,
        family: str,
        transform: dict[str, Any],
        name_or_path: str | None = None,
        pretrained: bool = False,
        config: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        init_seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.has_cls = check_family(family)
        check_select_feature(select_feature)
        weights_dtype = torch_dtype(dtype)
        attn = check_attn_implementation(attn_implementation, "encoder.attn_implementation")
        attn_kwargs: dict[str, Any] = {"attn_implementation": attn} if attn else {}
        import transformers

        config_cls_name, model_cls_name = hf_classes(family)
        model_cls = getattr(transformers, model_cls_name)
        if pretrained:
            if not name_or_path:
                raise ConfigError(
                    "encoder.name_or_path", "pretrained=true needs a model id or folder."
                )
            # transformers 5 would otherwise keep the checkpoint's dtype (often float16)
            self.vision = model_cls.from_pretrained(
                name_or_path, dtype=weights_dtype, **attn_kwargs
            )
        else:
            if not config:
                raise ConfigError(
                    "encoder.config", "random init (pretrained=false) needs architecture numbers."
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(
                    init_seed
                )  # random-init weights are a function of the config alone
                vision_config = getattr(transformers, config_cls_name)(**config, **attn_kwargs)
                self.vision = model_cls(vision_config)
            self.vision.to(weights_dtype)
        vcfg = self.vision.config
        if pretrained and config:
            differ = {
                k: (v, getattr(vcfg, k))
                for k, v in config.items()
                if hasattr(vcfg, k) and getattr(vcfg, k) != v
            }
            if differ:  # offline shape checks trusted these numbers
                log.warning(
                    "encoder.config disagrees with the loaded %s (preset vs loaded): %s",
                    name_or_path,
                    differ,
                )
        num_layers = vcfg.num_hidden_layers
        hidden_state_index(select_layer, num_layers)
        self.family = family
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.hidden_size: int = vcfg.hidden_size
        self.image_size: int = vcfg.image_size
        self.num_patches: int = (vcfg.image_size // vcfg.patch_size) ** 2
        self.image_transform = ImageTransform(size=vcfg.image_size, **transform)

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image handed to the connector."""
        return num_feature_tokens(self.num_patches, self.has_cls, self.select_feature)

    def _inner(self) -> Any:
        return getattr(self.vision, "vision_model", self.vision)

    def blocks(self) -> list[nn.Module]:
        """The tower's transformer layers (CLIPEncoderLayer / SiglipEncoderLayer), in order."""
        return list(self._inner().encoder.layers)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters after `select_layer` (later blocks, post-norm, pooling head).

        The forward never reaches them, so a stage must not train them (no gradient; DDP
        would also fail on them).
        """
        inner, layers = self._inner(), self.blocks()
        used = hidden_state_index(self.select_layer, len(layers))
        unused = [layers[i] for i in range(used, len(layers))]
        unused += [
            m
            for m in (getattr(inner, "post_layernorm", None), getattr(inner, "head", None))
            if isinstance(m, nn.Module)
        ]
        return [p for module in unused for p in module.parameters()]

    def enable_activation_checkpointing(self) -> None:
        """Non-reentrant checkpointing of each layer (transformers' own per-layer wrapper)."""
        enable_hf_checkpointing(self.vision)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) features of `select_layer`."""
        pixel_values = pixel_values.to(self.vision.dtype)
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.select_layer]  # (B, [1+]P, D)
        if self.has_cls and self.select_feature == "patch":
            features = features[:, 1:]
        return features


def build_encoder(backend: str = "transformers", **kwargs: Any) -> nn.Module:
    """The `_target_` of every encoder preset: one YAML, either backend (`encoder.backend`).

    Keys only the other backend reads (`timm_*` for transformers, `name_or_path` for timm) are
    dropped here, so a preset carries both without either class growing unused arguments; so
    are `image` and `anyres`, which `build_vlm` reads (how images become tiles and tokens).
    """
    for key in VLM_KEYS:
        kwargs.pop(key, None)
    if backend == "transformers":
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        return HFVisionEncoder(**kwargs)
    if backend == "timm":
        from vlmlab.models.timm_encoder import TimmVisionEncoder

        for key in _HF_ONLY:
            kwargs.pop(key, None)
        return TimmVisionEncoder(**kwargs)
    raise ConfigError(
        "encoder.backend", f"unknown backend {backend!r}.", f"use one of {list(BACKENDS)}."
    )
