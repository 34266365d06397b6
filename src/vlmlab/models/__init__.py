"""Model zoo: `build_vlm`, the one assembly of encoder, connector and LLM from their config groups.

Training, `vlmlab plan` (meta device, architecture numbers only) and the HF Llava import all
build through it; the parts' contracts are in `vlmlab.models.contracts`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import Connector, LanguageModel, VisionEncoder
from vlmlab.models.llm import build_tokenizer, check_attn_implementation
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IMAGE_TOKEN

__all__ = ["VisionLanguageModel", "build_tokenizer", "build_vlm"]


def instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a ConfigError raised by the target surfaces unwrapped."""
    try:
        return _hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def as_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Resolved plain dict of a config node (a plain mapping is copied)."""
    if not OmegaConf.is_config(cfg):
        return {str(k): v for k, v in dict(cfg).items()}
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


# The LLM builder a preset uses when it names none (`llm._target_`): any transformers causal LM.
DEFAULT_LLM_BUILDER = "vlmlab.models.llm.build_llm"
# llm preset keys read by others (tokenizer, templates, the stage chain), not by the builder
_LLM_OWN_KEYS = ("_target_", "tokenizer", "template", "warmup_stage")
WEIGHTS = ("preset", "none")
LOAD = "load"  # `tokenizer=LOAD`: build llm.tokenizer


def llm_builder(target: str | None) -> Callable[..., Any]:
    """The callable `llm._target_` names (default: transformers' AutoModelForCausalLM path)."""
    from hydra.utils import get_object

    name = target or DEFAULT_LLM_BUILDER
    try:
        builder = get_object(name)
    except Exception as err:  # ImportError, AttributeError: a config problem either way
        raise ConfigError(
            "llm._target_", f"cannot import {name!r} ({err}).", "name an LLM builder function."
        ) from None
    if not callable(builder):
        raise ConfigError("llm._target_", f"{name!r} is not callable.")
    return cast(Callable[..., Any], builder)


def build_vlm(
    encoder_cfg: DictConfig | Mapping[str, Any],
    connector_cfg: DictConfig | Mapping[str, Any],
    llm_cfg: DictConfig | Mapping[str, Any],
    quantization: dict[str, Any] | None = None,
    *,
    weights: Literal["preset", "none"] = "preset",
    device: str | torch.device | None = None,
    tokenizer: Any = LOAD,
) -> tuple[VisionLanguageModel, Any]:
    """The one assembly of encoder -> connector -> LLM: training, `vlmlab plan`, HF import.

    `weights`: "preset" loads what the presets say (pretrained or random init, as training
    does); "none" builds every part from its architecture numbers (`config:`), never loading
    a checkpoint. `device`: where parameters are created ("meta": shapes only, no memory).
    `tokenizer`: LOAD builds `llm.tokenizer`; a tokenizer is used as given; None builds
    without one (vocabulary from `llm.config.vocab_size`, image token id -1). Connector
    widths come from the built parts. Returns the model and the tokenizer (or None).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    llm_args = as_dict(llm_cfg)
    # an attention kernel this machine cannot run is refused before any weights load
    with torch.device(device) if device is not None else contextlib.nullcontext():
        check_attn_implementation(llm_args.get("attn_implementation"), "llm.attn_implementation")
        encoder_args = as_dict(encoder_cfg)
        if weights == "none":
            encoder_args["pretrained"] = False
            llm_args["pretrained"] = False
        encoder = instantiate(encoder_args, _convert_="all")
        if isinstance(tokenizer, str) and tokenizer == LOAD:
            tokenizer = build_tokenizer(llm_args["tokenizer"])
        builder = llm_builder(llm_args.get("_target_"))
        llm = builder(
            tokenizer,
            quantization=quantization,
            **{k: v for k, v in llm_args.items() if k not in _LLM_OWN_KEYS},
        )
        connector_args = as_dict(connector_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(connector_args.pop("init_seed", 0)))
            connector = instantiate(
                connector_args,
                in_features=encoder.hidden_size,
                out_features=llm.get_input_embeddings().embedding_dim,
            )
    for part, protocol, key in (
        (encoder, VisionEncoder, "encoder"),
        (connector, Connector, "connector"),
        (llm, LanguageModel, "llm"),
    ):
        if not isinstance(part, protocol):
            raise ConfigError(
                f"{key}._target_", f"{type(part).__name__} does not implement {protocol.__name__}."
            )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else -1
    return VisionLanguageModel(encoder, connector, llm, image_token_id), tokenizer
