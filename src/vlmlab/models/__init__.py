"""Model zoo: `build_vlm` composes encoder, connector and LLM from their config groups."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlmlab.models.llm import IMAGE_TOKEN, build_llm, build_tokenizer
from vlmlab.models.vlm import VisionLanguageModel

__all__ = ["IMAGE_TOKEN", "VisionLanguageModel", "build_tokenizer", "build_vlm"]


def build_vlm(encoder_cfg: DictConfig, connector_cfg: DictConfig, llm_cfg: DictConfig) -> tuple[VisionLanguageModel, Any]:
    """Build the model and its tokenizer. Connector widths come from the built parts."""
    encoder = instantiate(encoder_cfg, _convert_="all")
    llm_dict: dict[str, Any] = OmegaConf.to_container(llm_cfg, resolve=True)  # type: ignore[assignment]
    tokenizer = build_tokenizer(llm_dict["tokenizer"])
    llm = build_llm(
        tokenizer,
        name_or_path=llm_dict.get("name_or_path"),
        pretrained=bool(llm_dict.get("pretrained", False)),
        config=llm_dict.get("config"),
        dtype=llm_dict.get("dtype", "float32"),
        init_seed=int(llm_dict.get("init_seed", 0)),
    )
    llm_width = llm.get_input_embeddings().embedding_dim
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(connector_cfg.get("init_seed", 0)))
        connector_kwargs = {k: v for k, v in OmegaConf.to_container(connector_cfg, resolve=True).items() if k != "init_seed"}  # type: ignore[union-attr]
        connector = instantiate(connector_kwargs, in_features=encoder.hidden_size, out_features=llm_width)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return VisionLanguageModel(encoder, connector, llm, image_token_id), tokenizer
