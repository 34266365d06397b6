"""Model zoo: `build_vlm` composes encoder, connector and LLM from their config groups."""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import Connector, VisionEncoder
from vlmlab.models.llm import IMAGE_TOKEN, build_llm, build_tokenizer, check_attn_implementation
from vlmlab.models.vlm import VisionLanguageModel

__all__ = ["IMAGE_TOKEN", "VisionLanguageModel", "build_tokenizer", "build_vlm"]


def instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a ConfigError raised by the target surfaces unwrapped."""
    try:
        return _hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def as_dict(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict of a config node."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def build_vlm(
    encoder_cfg: DictConfig,
    connector_cfg: DictConfig,
    llm_cfg: DictConfig,
    quantization: dict[str, Any] | None = None,
) -> tuple[VisionLanguageModel, Any]:
    """Build the model and its tokenizer. Connector widths come from the built parts."""
    llm_args = as_dict(llm_cfg)
    # an attention kernel this machine cannot run is refused before any weights load
    check_attn_implementation(llm_args.get("attn_implementation"), "llm.attn_implementation")
    encoder = instantiate(encoder_cfg, _convert_="all")
    tokenizer = build_tokenizer(llm_args["tokenizer"])
    llm = build_llm(
        tokenizer,
        name_or_path=llm_args.get("name_or_path"),
        pretrained=bool(llm_args.get("pretrained", False)),
        config=llm_args.get("config"),
        dtype=llm_args.get("dtype", "float32"),
        init_seed=int(llm_args.get("init_seed", 0)),
        quantization=quantization,
        attn_implementation=llm_args.get("attn_implementation"),
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
    ):
        if not isinstance(part, protocol):
            raise ConfigError(
                f"{key}._target_", f"{type(part).__name__} does not implement {protocol.__name__}."
            )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return VisionLanguageModel(encoder, connector, llm, image_token_id), tokenizer
