"""The timm backend of the vision encoder, and weight mapping between transformers and timm.

`TimmVisionEncoder` honours the same contract and the same preset keys as `HFVisionEncoder`:
`select_layer` indexes hidden states as transformers does (0 = embeddings after CLIP's pre-norm,
k = output of block k, -1 = last block), and only the blocks up to the selected one run.

The mapping functions convert CLIP / SigLIP vision-tower state dicts between the two layouts
(separate q/k/v projections vs timm's fused qkv, SigLIP's MAP head vs timm's attention pool),
so the same weights can be used, and compared, in either backend. OpenAI CLIP needs QuickGELU
(`*_clip_quickgelu_*` timm models); SigLIP was trained with tanh-approximated GELU, which
timm's SigLIP models replace by exact GELU unless `timm_kwargs.act_layer=gelu_tanh` (our presets
set it, so both backends give the same features).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import VisionEncoder
from vlmlab.models.image_transform import ImageTransform
from vlmlab.models.llm import ATTN_IMPLEMENTATIONS, check_attn_implementation
from vlmlab.models.vision import (
    check_family,
    check_select_feature,
    hf_classes,
    hidden_state_index,
    num_feature_tokens,
    torch_dtype,
)

log = logging.getLogger(__name__)

# transformers defaults of the vision configs, for keys a preset leaves out
_HF_DEFAULTS = {
    "clip": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
}
# transformers `hidden_act` -> the activation a timm block must use to compute the same thing
_ACT_EQUIV = {
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


class TimmVisionEncoder(nn.Module, VisionEncoder):
    """A timm ViT (CLIP or SigLIP tower) behind the VisionEncoder contract."""

    def __init__(
        self,
        family: str,
        transform: dict[str, Any],
        timm_name: str,
        pretrained: bool = False,
        timm_kwargs: dict[str, Any] | None = None,
        timm_checkpoint: str | None = None,
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
        fused = timm_fused_attn(attn_implementation)
        import timm

        _check_timm_name(timm_name)
        kwargs = dict(timm_kwargs or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)  # random-init weights are a function of the config alone
            self.vision = timm.create_model(
                timm_name,
                pretrained=bool(pretrained and not timm_checkpoint),
                num_classes=0,
                **kwargs,
            )
        if pretrained and timm_checkpoint:
            _load_checkpoint(self.vision, family, timm_checkpoint)
        self.vision.to(weights_dtype)
        if fused is not None:
            for module in self.vision.modules():
                if hasattr(module, "fused_attn"):
                    setattr(module, "fused_attn", fused)  # noqa: B010 (typed as a Final)
        vit: Any = self.vision
        if not all(hasattr(vit, a) for a in ("patch_embed", "blocks", "norm_pre", "_pos_embed")):
            raise ConfigError(
                "encoder.timm_name",
                f"{timm_name!r} is a {type(vit).__name__}, not a timm VisionTransformer.",
                "use a ViT such as vit_large_patch14_clip_quickgelu_336.openai.",
            )
        has_cls_token = getattr(vit, "cls_token", None) is not None
        if vit.num_prefix_tokens != int(self.has_cls) or has_cls_token != self.has_cls:
            raise ConfigError(
                "encoder.timm_name",
                f"{timm_name!r} has {vit.num_prefix_tokens} prefix token(s); encoder.family="
                f"{family} expects {'one CLS token' if self.has_cls else 'none'}.",
                "pick a timm model of the same family.",
            )
        self.num_layers = len(vit.blocks)
        self._index = hidden_state_index(select_layer, self.num_layers)
        if config:
            _check_matches_config(vit, family, config, timm_name)
        img_h, img_w = vit.patch_embed.img_size
        if img_h != img_w:
            raise ConfigError(
                "encoder.timm_kwargs", f"img_size must be square, got {img_h}x{img_w}."
            )
        self.family = family
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.hidden_size: int = int(vit.embed_dim)
        self.image_size: int = int(img_h)
        self.num_patches: int = int(vit.patch_embed.num_patches)
        self.image_transform = ImageTransform(size=self.image_size, **transform)

    @property
    def num_tokens(self) -> int:
        """Feature tokens per image handed to the connector."""
        return num_feature_tokens(self.num_patches, self.has_cls, self.select_feature)

    def blocks(self) -> list[nn.Module]:
        """The ViT's transformer blocks, in order."""
        vit: Any = self.vision
        return list(vit.blocks)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Blocks after `select_layer`, the final norms and the pooling head: never run here."""
        vit: Any = self.vision
        unused = list(vit.blocks[self._index :])
        for attr in ("norm", "fc_norm", "attn_pool", "head"):
            module = getattr(vit, attr, None)
            if isinstance(module, nn.Module):
                unused.append(module)
        return [p for module in unused for p in module.parameters()]

    def enable_activation_checkpointing(self) -> None:
        """timm's flag, which `forward` reads: each block runs under non-reentrant checkpoint."""
        vit: Any = self.vision
        vit.set_grad_checkpointing(True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) features of `select_layer`; later blocks never run."""
        vit: Any = self.vision
        x = vit.patch_embed(pixel_values.to(vit.patch_embed.proj.weight.dtype))
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)  # hidden state 0 (CLIP's pre-norm; identity for SigLIP)
        checkpointing = bool(getattr(vit, "grad_checkpointing", False)) and self.training
        for block in vit.blocks[: self._index]:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.has_cls and self.select_feature == "patch":
            x = x[:, 1:]
        return x


# ----------------------------------------------------------------------------- checks

TIMM_ATTN = ("sdpa", "eager")


def timm_fused_attn(attn_implementation: str | None) -> bool | None:
    """`encoder.attn_implementation` for timm: sdpa -> fused_attn on, eager -> off, null -> timm's
    default (fused unless TIMM_FUSED_ATTN=0).

    timm has no flash-attn or flex path: its fused attention is torch's
    scaled_dot_product_attention, which on a CUDA GPU in bf16/fp16 picks the FlashAttention-2
    kernel itself (ViT attention has no mask).
    """
    value = attn_implementation
    if value is not None and value not in TIMM_ATTN:
        if value not in ATTN_IMPLEMENTATIONS:
            check_attn_implementation(value, "encoder.attn_implementation")  # names the choices
        raise ConfigError(
            "encoder.attn_implementation",
            f"{value} is not available in the timm backend (it runs eager attention or torch "
            "SDPA, which uses the FlashAttention-2 kernel on CUDA in bf16/fp16).",
            "use sdpa, eager or null with encoder.backend=timm, or encoder.backend=transformers "
            f"for {value}.",
        )
    return None if value is None else value == "sdpa"


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        arch = name.split(".", 1)[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            "encoder.timm_name",
            f"timm has no model {name!r}.{hint}",
            "list names with timm.list_models('*clip*') / timm.list_pretrained('*siglip*').",
        )
    if "." in name and name not in timm.list_pretrained(name):  # timm rejects unknown tags
        tags = timm.list_pretrained(name.split(".", 1)[0] + "*")
        raise ConfigError(
            "encoder.timm_name",
            f"timm has no pretrained tag {name!r}.",
            f"use one of {tags}, or the name without a tag.",
        )


def _act_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or (name == "GELU" and getattr(module, "approximate", "") == "tanh"):
        return "gelu_tanh"
    if name == "GELU":
        return "gelu"
    return name


def _check_matches_config(vit: Any, family: str, config: Mapping[str, Any], timm_name: str) -> None:
    """The timm model must be the architecture `encoder.config` describes (one preset, two
    backends): width, depth, heads, MLP width, image and patch size, norm eps, activation."""
    cfg = {**_HF_DEFAULTS[family], **config}
    block = vit.blocks[0]
    got: dict[str, Any] = {
        "hidden_size": int(vit.embed_dim),
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": int(block.attn.num_heads),
        "intermediate_size": int(block.mlp.fc1.out_features),
        "image_size": int(vit.patch_embed.img_size[0]),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "layer_norm_eps": float(block.norm1.eps),
        "hidden_act": _act_kind(block.mlp.act),
    }
    want = dict(cfg)
    want["hidden_act"] = _ACT_EQUIV.get(str(cfg["hidden_act"]), str(cfg["hidden_act"]))
    wrong = []
    for key, value in got.items():
        if key not in want:
            continue
        expected = want[key]
        same = (
            abs(value - float(expected)) <= 1e-12 if key == "layer_norm_eps" else value == expected
        )
        if not same:
            wrong.append(f"{key}: timm {value!r} vs encoder.config {expected!r}")
    if wrong:
        raise ConfigError(
            "encoder.timm_name",
            f"timm model {timm_name!r} (with encoder.timm_kwargs) is not the architecture "
            f"encoder.config describes: {'; '.join(wrong)}.",
            "make encoder.timm_name / encoder.timm_kwargs and encoder.config agree (OpenAI CLIP "
            "needs a *_clip_quickgelu_* model; SigLIP needs timm_kwargs.act_layer=gelu_tanh).",
        )


def _load_checkpoint(vit: nn.Module, family: str, path: str) -> None:
    """Load local weights: a transformers folder (mapped to timm) or a timm state-dict file."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").exists():
        import transformers

        model_cls = getattr(transformers, hf_classes(family)[1])
        hf_state = model_cls.from_pretrained(str(folder)).state_dict()
        state = hf_to_timm_state_dict(family, hf_state)
    elif folder.is_file():
        import timm.models

        state = timm.models.load_state_dict(str(folder))
    else:
        raise ConfigError(
            "encoder.timm_checkpoint",
            f"{path!r} is neither a weights file nor a transformers model folder.",
            "point it at a .safetensors/.pth state dict of the timm model or a save_pretrained "
            "folder, or set it to null to load timm's own weights.",
        )
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "encoder.timm_checkpoint",
            f"weights in {path!r} do not fit the model: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}.",
            "check encoder.timm_name / encoder.timm_kwargs against the checkpoint.",
        )


# ----------------------------------------------------------------------------- weight mapping

_HF_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "vision_model.")


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


_BLOCK = {  # per-layer tensors that only change their name: transformers -> timm
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_SIGLIP_HEAD = {  # transformers SigLIP MAP head -> timm AttentionPoolLatent
    "head.attention.out_proj": "attn_pool.proj",
    "head.layernorm": "attn_pool.norm",
    "head.mlp.fc1": "attn_pool.mlp.fc1",
    "head.mlp.fc2": "attn_pool.mlp.fc2",
}


def _num_layers(keys: Any, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def hf_to_timm_state_dict(
    family: str, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModel / SiglipVisionModel weights -> timm VisionTransformer.

    Accepts the bare vision-model layout or one prefixed by `vision_model.` (a full CLIP/SigLIP
    checkpoint's keys, filtered to the vision tower). Text-tower keys must be removed first.
    """
    check_family(family)
    hf = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    emb = "embeddings."
    out["patch_embed.proj.weight"] = hf[emb + "patch_embedding.weight"]
    if emb + "patch_embedding.bias" in hf:
        out["patch_embed.proj.bias"] = hf[emb + "patch_embedding.bias"]
    out["pos_embed"] = hf[emb + "position_embedding.weight"].unsqueeze(0)
    if family == "clip":
        out["cls_token"] = hf[emb + "class_embedding"].reshape(1, 1, -1)
        out["norm_pre.weight"] = hf["pre_layrnorm.weight"]
        out["norm_pre.bias"] = hf["pre_layrnorm.bias"]
    for i in range(_num_layers(hf, "encoder.layers.")):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            for a, b in _BLOCK.items():
                out[f"{dst}{b}.{kind}"] = hf[f"{src}{a}.{kind}"]
    out["norm.weight"] = hf["post_layernorm.weight"]
    out["norm.bias"] = hf["post_layernorm.bias"]
    if family == "siglip" and "head.probe" in hf:
        out["attn_pool.latent"] = hf["head.probe"]
        q, kv = _split_rows(hf["head.attention.in_proj_weight"], 1)
        qb, kvb = _split_rows(hf["head.attention.in_proj_bias"], 1)
        out.update({"attn_pool.q.weight": q, "attn_pool.q.bias": qb})
        out.update({"attn_pool.kv.weight": kv, "attn_pool.kv.bias": kvb})
        for a, b in _SIGLIP_HEAD.items():
            for kind in ("weight", "bias"):
                out[f"{b}.{kind}"] = hf[f"{a}.{kind}"]
    return out


def timm_to_hf_state_dict(
    family: str, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """timm VisionTransformer weights -> transformers CLIPVisionModel / SiglipVisionModel.

    The inverse of `hf_to_timm_state_dict` (e.g. to export a timm-trained tower to a
    transformers Llava checkpoint). The returned keys are the bare vision-model layout.
    """
    check_family(family)
    t = dict(state)
    out: dict[str, torch.Tensor] = {}
    emb = "embeddings."
    out[emb + "patch_embedding.weight"] = t["patch_embed.proj.weight"]
    if "patch_embed.proj.bias" in t:
        out[emb + "patch_embedding.bias"] = t["patch_embed.proj.bias"]
    out[emb + "position_embedding.weight"] = t["pos_embed"].squeeze(0)
    if family == "clip":
        out[emb + "class_embedding"] = t["cls_token"].reshape(-1)
        out["pre_layrnorm.weight"] = t["norm_pre.weight"]
        out["pre_layrnorm.bias"] = t["norm_pre.bias"]
    for i in range(_num_layers(t, "blocks.")):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = t[f"{src}attn.qkv.{kind}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            for a, b in _BLOCK.items():
                out[f"{dst}{a}.{kind}"] = t[f"{src}{b}.{kind}"]
    out["post_layernorm.weight"] = t["norm.weight"]
    out["post_layernorm.bias"] = t["norm.bias"]
    if family == "siglip" and "attn_pool.latent" in t:
        out["head.probe"] = t["attn_pool.latent"]
        out["head.attention.in_proj_weight"] = torch.cat(
            [t["attn_pool.q.weight"], t["attn_pool.kv.weight"]]
        )
        out["head.attention.in_proj_bias"] = torch.cat(
            [t["attn_pool.q.bias"], t["attn_pool.kv.bias"]]
        )
        for a, b in _SIGLIP_HEAD.items():
            for kind in ("weight", "bias"):
                out[f"{a}.{kind}"] = t[f"{b}.{kind}"]
    return out


def _split_rows(tensor: torch.Tensor, parts_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked [q; k; v] tensor into its first `parts_first` thirds and the rest."""
    third = tensor.shape[0] // 3
    return tensor[: third * parts_first], tensor[third * parts_first :]
