"""The VisionLanguageModel: embed -> encode -> project -> scatter -> decode.

The tokenizer has already expanded each `<image>` into M copies of the image token (the
transformers Llava convention), so scattering is a masked assignment with no index arithmetic.

Training (labels given) never builds the (B, T, V) logits: the decoder's hidden states of the
target positions go through the output head and the fp32 cross-entropy in checkpointed chunks,
so only one chunk's logits exist at a time, in forward and in backward (`chunked_token_loss`).
At a 128k vocabulary the full logits of a 16 x 2048 micro-batch and their fp32 copies would
take 60-70 GB. Without labels (eval, generation, logit-equality tests) the full logits come back
as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Causal LMs whose `forward` is exactly `lm_head(decoder(...).last_hidden_state)` (plus Gemma's
# final logit soft-capping, applied here), checked against transformers 5.23. Any other LLM
# takes the full-logits path: its head may scale the logits (Cohere, Granite) or do more.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "starcoder2",
        "stablelm",
    }
)
DEFAULT_LOSS_CHUNK_SIZE = 1024  # target tokens per chunk: 0.5 GB of fp32 logits at V = 128k


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the loss was computed from target positions only
    num_target_tokens: int


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices b*T + p of the hidden positions whose next label is a target.

    The target id of index i is `labels.view(-1)[i + 1]` (p <= T - 2, so i + 1 stays in row b).
    `nonzero` synchronises with the device: `collate` computes this on the CPU instead.
    """
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols


def _token_loss_sum(
    head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_token_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum over rows of CE(head(hidden).float(), targets), `chunk_size` rows at a time.

    Under autograd each chunk is checkpointed (non-reentrant): its logits are freed after the
    forward and recomputed in the backward, so one chunk's logits live at a time.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_token_loss_sum, head, softcap, h, t, use_reentrant=False)
        else:
            part = _token_loss_sum(head, softcap, h, t)
        total = total + part
    return total


def target_token_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    target_index: torch.Tensor,
    num_target_tokens: int,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean next-token CE over the target tokens, from the (B, T, D) hidden states.

    Equals `F.cross_entropy(head(hidden)[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
    ignore_index=-100)` without building the (B, T, V) logits: only the target positions go
    through the head, `chunk_size` at a time.
    """
    targets = labels.reshape(-1).index_select(0, target_index + 1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)  # (N, D)
    return chunked_token_loss(head, rows, targets, chunk_size, softcap) / num_target_tokens


class VisionLanguageModel(nn.Module):
    """Composition of a vision encoder, a connector and a causal LM."""

    encoder: Any  # VisionEncoder (an nn.Module)
    connector: Any  # Connector (an nn.Module)
    llm: Any  # transformers PreTrainedModel (or a peft model wrapping one)

    def __init__(
        self,
        encoder: Any,
        connector: Any,
        llm: nn.Module,
        image_token_id: int,
        loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.loss_chunk_size = loss_chunk_size
        # Set by the trainer when parameters are sharded (FSDP, ZeRO-3): every training forward
        # then runs the whole vision branch, frozen or not, because sharded units all-gather
        # collectively and a rank that skips them hangs the others.
        self.sharded = False

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

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by projected image features.

        `image_index` (flat b*T + p of the image tokens, from `collate`) avoids the two host
        syncs of counting the image tokens and of masked_scatter's backward (masked_select).
        """
        is_image = input_ids == self.image_token_id  # (B, T)
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.get_input_embeddings()(text_ids)  # (B, T, Dl)
        num_slots = int(is_image.sum()) if image_index is None else image_index.numel()
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
        image_embeds = image_embeds.to(embeds.dtype)
        if image_index is None:
            return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds)
        flat = embeds.reshape(-1, embeds.shape[-1])
        flat = flat.index_copy(0, image_index, image_embeds.reshape(-1, embeds.shape[-1]))
        return flat.view_as(embeds)

    def _vision_anchor(self, embeds: torch.Tensor) -> torch.Tensor | float:
        """0 x (one blank image through encoder and connector) on a text-only training batch.

        Why: a trainable connector that a batch never uses gets no gradient on this rank while
        other ranks have image batches; DDP (find_unused_parameters=False) then fails and FSDP's
        reduce-scatter never matches. Running the vision branch inside the forward gives every
        trainable vision parameter an exact zero gradient on every strategy. With sharded
        parameters (`sharded`) it runs even when nothing in vision trains (a frozen encoder then
        runs under no_grad): the all-gathers of its sharded units are collective.
        """
        if not self.training:
            return 0.0
        if not self.sharded:
            vision = [*self.connector.parameters(), *self.encoder.parameters()]
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in vision)):
                return 0.0
        size = int(self.encoder.image_size)
        blank = embeds.new_zeros((1, 3, size, size), dtype=next(self.encoder.parameters()).dtype)
        return self.encode_images(blank).sum().to(embeds.dtype) * 0.0

    def _loss_head(self) -> tuple[nn.Module, nn.Module, float | None] | None:
        """(decoder, output head, soft-cap) of the LLM when its logits are just head(hidden).

        Looks through a peft LoRA wrapper (its adapters live inside the decoder and head
        modules). None means: compute the full logits through `self.llm` instead.
        """
        llm = self.llm
        peft_config = getattr(llm, "active_peft_config", None)
        if peft_config is not None:
            if getattr(peft_config, "is_prompt_learning", False):
                return None  # virtual tokens are added by PeftModel.forward
            llm = llm.get_base_model()
        config = getattr(llm, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in PLAIN_HEAD_MODEL_TYPES:
            if not getattr(self, "_logged_full_logits", False):
                self._logged_full_logits = True
                log.info(
                    "LLM model_type %r is not known to have a plain output head: the training "
                    "loss uses its full logits (more memory).",
                    model_type,
                )
            return None
        head = llm.get_output_embeddings()
        decoder = llm.get_decoder()
        if head is None or decoder is llm:
            return None
        softcap = getattr(config, "final_logit_softcapping", None)
        return decoder, head, float(softcap) if softcap is not None else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        num_target_tokens: int | None = None,
        image_index: torch.Tensor | None = None,
        **_: Any,
    ) -> VLMOutput:
        """Logits without labels; with labels, the mean next-token CE over the target tokens.

        `target_index`, `num_target_tokens` and `image_index` come with batches from `collate`
        (computed on the CPU): given, the training forward needs no host sync of its own.
        """
        embeds = self.embed(input_ids, pixel_values, image_index)
        if labels is None:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            return VLMOutput(loss=None, logits=out.logits, num_target_tokens=0)
        if target_index is None:
            target_index = target_positions(labels)
            num_target_tokens = target_index.numel()
        elif num_target_tokens is None:
            num_target_tokens = target_index.numel()
        if num_target_tokens == 0:
            raise ValueError(
                "batch has no target tokens: every label is -100 (check masking/template)."
            )
        parts = self._loss_head()
        if parts is None:  # an LLM whose logits are more than head(hidden): full logits
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            loss = target_token_loss(
                nn.Identity(),
                out.logits,
                labels,
                target_index,
                num_target_tokens,
                self.loss_chunk_size,
            )
            return VLMOutput(loss=loss, logits=out.logits, num_target_tokens=num_target_tokens)
        decoder, head, softcap = parts
        out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        loss = target_token_loss(
            head,
            out.last_hidden_state,
            labels,
            target_index,
            num_target_tokens,
            self.loss_chunk_size,
            softcap,
        )
        return VLMOutput(loss=loss, logits=None, num_target_tokens=num_target_tokens)
