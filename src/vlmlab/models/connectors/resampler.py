"""Perceiver / Qwen-VL resampler: learnable queries cross-attend to the image patches.

Qwen-VL (Bai et al. 2023, `Resampler` in its visual.py) compresses the ViT grid to 256 tokens
with one cross-attention layer: the keys get a fixed 2D sin-cos encoding of the patch grid, the
queries, keys and output are layer-normed, and a final projection maps to the LLM width. The
Perceiver resampler (Flamingo) stacks such layers with a feed-forward block after each
(`mlp_ratio`). Either way the LLM sees `num_queries` image tokens whatever the number of
patches N, so the sequence no longer grows with the image resolution.

Without a position encoding, cross-attention is a function of the *set* of patches: permuting
them leaves the output unchanged. `pos_embed: sincos2d` is what tells the queries where a
patch is, which is why Qwen-VL adds it to the keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.connectors import attention_parameters, init_arguments

POS_EMBEDS = ("sincos2d", "none")


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim): [sin(p w_i), cos(p w_i)], w_i = 10000^(-2i/dim) (Transformer)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2))
    angles = positions.float()[:, None] * omega.to(positions.device)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos encoding of a grid x grid patch grid in row-major (ViT) order: (grid^2, dim).

    Half of the channels encode the row, half the column (MAE / Qwen-VL `get_2d_sincos_pos_embed`).
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij"
    )
    return torch.cat(
        [sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1
    )


def grid_side(num_input_tokens: int) -> int:
    """Side g of a square patch grid N = g*g; a ConfigError naming `connector.pos_embed` otherwise."""
    side = math.isqrt(num_input_tokens) if num_input_tokens > 0 else 0
    if side * side != num_input_tokens or side == 0:
        raise ConfigError(
            "connector.pos_embed",
            f"sincos2d needs a square patch grid (N = g*g tokens), got N={num_input_tokens}. "
            "An encoder that keeps its CLS token (encoder.select_feature=cls_patch) gives g*g+1.",
            "use encoder.select_feature=patch, or connector.pos_embed=none.",
        )
    return side


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention of the latents to the patches, plus an optional feed-forward."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp: nn.Module | None = None
        if mlp_ratio > 0:
            self.mlp = nn.Sequential(
                nn.LayerNorm(hidden_size),
                nn.Linear(hidden_size, mlp_ratio * hidden_size),
                nn.GELU(),
                nn.Linear(mlp_ratio * hidden_size, hidden_size),
            )

    def forward(
        self, latents: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        attended, _ = self.attn(self.ln_q(latents), keys, values, need_weights=False)
        latents = latents + attended  # (B, Q, H)
        if self.mlp is not None:
            latents = latents + self.mlp(latents)
        return latents


class ResamplerConnector(nn.Module):
    """(B, N, Dv) patches -> (B, num_queries, Dl) via learnable queries and cross-attention.

    `hidden_size` is the attention width (null: the LLM width, as in Qwen-VL, where the
    resampler works at 4096). Parameters (H = hidden, Q = num_queries, L = depth, r = mlp_ratio):
    Q*H + (Dv*H + H) + 2H + L*(2H + 4H^2 + 4H [+ 2H + 2rH^2 + rH + H]) + 2H + (H*Dl + Dl);
    the sin-cos encoding has none.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_queries: int = 64,
        depth: int = 1,
        hidden_size: int | None = None,
        num_heads: int = 32,
        pos_embed: str = "sincos2d",
        mlp_ratio: int = 0,
    ) -> None:
        super().__init__()
        hidden = hidden_size or out_features
        if pos_embed not in POS_EMBEDS:
            raise ConfigError(
                "connector.pos_embed", f"unknown {pos_embed!r}.", f"use one of {list(POS_EMBEDS)}."
            )
        for key, value in (("num_queries", num_queries), ("depth", depth)):
            if value < 1:
                raise ConfigError(f"connector.{key}", f"must be >= 1, got {value}.")
        if mlp_ratio < 0:
            raise ConfigError("connector.mlp_ratio", f"must be >= 0, got {mlp_ratio}.")
        if num_heads < 1 or hidden % num_heads:
            raise ConfigError(
                "connector.num_heads",
                f"{num_heads} heads do not divide the attention width {hidden}.",
                "pick a divisor of connector.hidden_size (or of the LLM width when it is null).",
            )
        if pos_embed == "sincos2d" and hidden % 4:
            raise ConfigError(
                "connector.hidden_size",
                f"sincos2d needs a width divisible by 4, got {hidden}.",
                "change connector.hidden_size or set connector.pos_embed=none.",
            )
        self.num_queries = num_queries
        self.hidden_size = hidden
        self.pos_embed = pos_embed
        self.queries = nn.Parameter(torch.empty(num_queries, hidden))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.kv_proj = nn.Linear(in_features, hidden)
        self.ln_kv = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(
            ResamplerLayer(hidden, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.ln_post = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_features)

    @classmethod
    def expected_num_parameters(cls, in_features: int, out_features: int, **knobs: Any) -> int:
        """The class docstring's formula (heads and the sin-cos encoding add nothing)."""
        a = init_arguments(cls, in_features, out_features, knobs)
        h = a["hidden_size"] or out_features
        num_queries, depth, mlp_ratio = a["num_queries"], a["depth"], a["mlp_ratio"]
        layer = 2 * h + attention_parameters(h)
        if mlp_ratio:
            r = mlp_ratio * h
            layer += 2 * h + h * r + r + r * h + h
        queries, kv_proj, ln_kv, ln_post = num_queries * h, in_features * h + h, 2 * h, 2 * h
        return queries + kv_proj + ln_kv + depth * layer + ln_post + h * out_features + out_features

    def num_tokens(self, num_input_tokens: int) -> int:
        """Always `num_queries`; with sincos2d, N must also be a square grid (checked here, early)."""
        if self.pos_embed == "sincos2d":
            grid_side(num_input_tokens)
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_patches, _ = features.shape  # (B, N, Dv)
        values = self.ln_kv(self.kv_proj(features))  # (B, N, H)
        keys = values
        if self.pos_embed == "sincos2d":
            pos = sincos_2d(self.hidden_size, grid_side(num_patches), features.device)
            keys = values + pos.to(values.dtype)  # position goes into the keys only (Qwen-VL)
        latents = self.queries.unsqueeze(0).expand(batch, -1, -1)  # (B, Q, H)
        for layer in self.layers:
            latents = layer(latents, keys, values)
        return self.proj(self.ln_post(latents))  # (B, Q, Dl)
