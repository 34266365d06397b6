"""Vision encoders: pixels -> patch features (B, N, D) from a chosen hidden layer.

LLaVA reads the penultimate layer (`select_layer=-2`) and drops the CLS token. SigLIP has no
CLS token, so `has_cls` is a property of the encoder family and no real patch is ever dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.image_transform import ImageTransform

log = logging.getLogger(__name__)

_FAMILIES = {
    # family: (config class, model class, has CLS token)
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False),
}


class HFVisionEncoder(nn.Module):
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
    ) -> None:
        super().__init__()
        if family not in _FAMILIES:
            raise ConfigError(
                "encoder.family", f"unknown family {family!r}.", f"use one of {sorted(_FAMILIES)}."
            )
        if select_feature not in ("patch", "cls_patch"):
            raise ConfigError(
                "encoder.select_feature", f"got {select_feature!r}.", "use patch or cls_patch."
            )
        import transformers

        config_cls_name, model_cls_name, self.has_cls = _FAMILIES[family]
        model_cls = getattr(transformers, model_cls_name)
        if pretrained:
            if not name_or_path:
                raise ConfigError(
                    "encoder.name_or_path", "pretrained=true needs a model id or folder."
                )
            self.vision = model_cls.from_pretrained(name_or_path)
        else:
            if not config:
                raise ConfigError(
                    "encoder.config", "random init (pretrained=false) needs architecture numbers."
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(
                    init_seed
                )  # random-init weights are a function of the config alone
                self.vision = model_cls(getattr(transformers, config_cls_name)(**config))
        vcfg = self.vision.config
        num_layers = vcfg.num_hidden_layers
        if not (-num_layers - 1 <= select_layer <= num_layers):
            raise ConfigError(
                "encoder.select_layer",
                f"{select_layer} is out of range for a {num_layers}-layer encoder.",
                f"use a value in [{-num_layers - 1}, {num_layers}] (LLaVA uses -2).",
            )
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
        keep_cls = self.has_cls and self.select_feature == "cls_patch"
        return self.num_patches + int(keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) features of `select_layer`."""
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.select_layer]  # (B, [1+]P, D)
        if self.has_cls and self.select_feature == "patch":
            features = features[:, 1:]
        return features
