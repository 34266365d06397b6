"""BLIP-2 style Q-Former: learnable queries that self-attend, cross-attend to the patches, and
pass a feed-forward block, in a stack of BERT-like (post-norm) layers; a linear map to the LLM.

BLIP-2 (Li et al. 2023) uses 32 queries in a BERT-base stack (width 768, 12 layers, 12 heads,
FFN 3072) with cross-attention in every other layer (`cross_attention_freq: 2`) and a LayerNorm
on the ViT output; its `language_projection` is the final linear layer. Here only the query
branch exists (no text branch, so every parameter is trained), the image LayerNorm belongs to
the connector, and `cross_attention_freq` defaults to 1: every layer sees the image.

Like any cross-attention over patches without a position encoding, the output depends on the
set of patches, not on their order: the encoder's own position embeddings carry the layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.connectors import attention_parameters, init_arguments


class QFormerLayer(nn.Module):
    """x = LN(x + SelfAttn(x)); [x = LN(x + CrossAttn(x, image))]; x = LN(x + FFN(x))."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        image_width: int,
        cross_attention: bool,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.ln_self = nn.LayerNorm(hidden_size)
        self.cross_attn: nn.MultiheadAttention | None = None
        self.ln_cross: nn.LayerNorm | None = None
        if cross_attention:
            self.cross_attn = nn.MultiheadAttention(
                hidden_size, num_heads, kdim=image_width, vdim=image_width, batch_first=True
            )
            self.ln_cross = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size),
            nn.GELU(),
            nn.Linear(intermediate_size, hidden_size),
        )
        self.ln_ffn = nn.LayerNorm(hidden_size)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        attended, _ = self.self_attn(queries, queries, queries, need_weights=False)
        queries = self.ln_self(queries + attended)  # (B, Q, H)
        if self.cross_attn is not None and self.ln_cross is not None:
            attended, _ = self.cross_attn(queries, image, image, need_weights=False)
            queries = self.ln_cross(queries + attended)
        return self.ln_ffn(queries + self.ffn(queries))


class QFormerConnector(nn.Module):
    """(B, N, Dv) patches -> (B, num_queries, Dl).

    Parameters (H = hidden_size, I = intermediate_size, Q = num_queries, L = depth, C = layers
    with cross-attention = ceil(L / cross_attention_freq)):
    2Dv + Q*H + 2H + L*(4H^2 + 4H + 2H + 2HI + I + H + 2H) + C*(2H^2 + 2H*Dv + 4H + 2H)
    + H*Dl + Dl.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_queries: int = 32,
        depth: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 1,
    ) -> None:
        super().__init__()
        for key, value in (
            ("num_queries", num_queries),
            ("depth", depth),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("cross_attention_freq", cross_attention_freq),
        ):
            if value < 1:
                raise ConfigError(f"connector.{key}", f"must be >= 1, got {value}.")
        if num_heads < 1 or hidden_size % num_heads:
            raise ConfigError(
                "connector.num_heads",
                f"{num_heads} heads do not divide connector.hidden_size={hidden_size}.",
            )
        self.num_queries = num_queries
        self.ln_vision = nn.LayerNorm(in_features)
        self.queries = nn.Parameter(torch.empty(num_queries, hidden_size))
        nn.init.normal_(self.queries, std=0.02)  # BLIP-2: initializer_range 0.02
        self.ln_queries = nn.LayerNorm(hidden_size)
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                image_width=in_features,
                cross_attention=i % cross_attention_freq == 0,
            )
            for i in range(depth)
        )
        self.proj = nn.Linear(hidden_size, out_features)

    @classmethod
    def expected_num_parameters(cls, in_features: int, out_features: int, **knobs: Any) -> int:
        """The class docstring's formula (the number of heads adds nothing)."""
        a = init_arguments(cls, in_features, out_features, knobs)
        h, inter, dv = a["hidden_size"], a["intermediate_size"], in_features
        num_queries, depth = a["num_queries"], a["depth"]
        cross_attention_freq = a["cross_attention_freq"]
        per_layer = attention_parameters(h) + 2 * h + (h * inter + inter + inter * h + h) + 2 * h
        cross = attention_parameters(h, dv) + 2 * h
        crossing = len(range(0, depth, cross_attention_freq))
        return (
            2 * dv  # ln_vision
            + num_queries * h
            + 2 * h  # ln_queries
            + depth * per_layer
            + crossing * cross
            + h * out_features
            + out_features
        )

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.ln_vision(features)  # (B, N, Dv)
        queries = self.ln_queries(self.queries).unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, image)  # (B, Q, H)
        return self.proj(queries)  # (B, Q, Dl)
