"""The VisionLanguageModel: embed -> encode -> project -> scatter -> decode.

The tokenizer has already expanded each `<image>` into M copies of the image token (the
transformers Llava convention), so scattering is a masked assignment with no index arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    num_target_tokens: int


class VisionLanguageModel(nn.Module):
    """Composition of a vision encoder, a connector and a causal LM."""

    encoder: Any  # VisionEncoder (an nn.Module)
    connector: Any  # Connector (an nn.Module)
    llm: Any  # transformers PreTrainedModel

    def __init__(self, encoder: Any, connector: Any, llm: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the LLM sees per image (M)."""
        return self.connector.num_tokens(self.encoder.num_tokens)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """A frozen encoder stays in eval mode (no dropout, fixed norms) whatever Lightning asks."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, H, W) -> (K, M, Dl) image embeddings for the LLM."""
        if self.encoder_frozen:
            with torch.no_grad():
                features = self.encoder(pixel_values)  # (K, N, Dv)
        else:
            features = self.encoder(pixel_values)
        return self.connector(features.to(self._connector_dtype()))  # (K, M, Dl)

    def _connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by projected image features."""
        is_image = input_ids == self.image_token_id  # (B, T)
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.get_input_embeddings()(text_ids)  # (B, T, Dl)
        num_slots = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if num_slots:
                raise ValueError(
                    f"input_ids hold {num_slots} image tokens but no pixel_values were given."
                )
            return embeds + self._vision_anchor(embeds)
        image_embeds = self.encode_images(pixel_values)  # (K, M, Dl)
        if num_slots != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"input_ids hold {num_slots} image tokens but {image_embeds.shape[0]} images x "
                f"{image_embeds.shape[1]} tokens were encoded: the tokenizer and the connector disagree on M."
            )
        scattered = embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return scattered

    def _vision_anchor(self, embeds: torch.Tensor) -> torch.Tensor | float:
        """0 x (one blank image through encoder and connector) on a text-only training batch.

        Why: a trainable connector that a batch never uses gets no gradient on this rank while
        other ranks have image batches; DDP (find_unused_parameters=False) then fails and FSDP's
        reduce-scatter never matches. Running the vision branch inside the forward gives every
        trainable vision parameter an exact zero gradient on every strategy.
        """
        if not (self.training and torch.is_grad_enabled()):
            return 0.0
        vision = [*self.connector.parameters(), *self.encoder.parameters()]
        if not any(p.requires_grad for p in vision):
            return 0.0
        size = int(self.encoder.image_size)
        blank = embeds.new_zeros((1, 3, size, size), dtype=next(self.encoder.parameters()).dtype)
        return self.encode_images(blank).sum().to(embeds.dtype) * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        logits = out.logits  # (B, T, V)
        if labels is None:
            return VLMOutput(loss=None, logits=logits, num_target_tokens=0)
        targets = labels[:, 1:]  # next-token prediction
        num_targets = int((targets != IGNORE_INDEX).sum())
        if num_targets == 0:
            raise ValueError(
                "batch has no target tokens: every label is -100 (check masking/template)."
            )
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return VLMOutput(loss=loss, logits=logits, num_target_tokens=num_targets)
