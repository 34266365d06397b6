"""LLM backbone: any transformers causal LM plus its tokenizer, with the `<image>` token added.

Presets either load pretrained weights (`pretrained: true`, needs the weights locally or network)
or build a random-init model from the architecture numbers in `config` (the `tiny` preset).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_asset(path: str) -> str:
    """`pkg://tiny_tokenizer` -> the folder shipped inside vlmlab/assets; other paths unchanged."""
    if path.startswith("pkg://"):
        return str(resources.files("vlmlab") / "assets" / path.removeprefix("pkg://"))
    return path


def build_tokenizer(tokenizer_cfg: dict[str, Any]) -> Any:
    """Load the tokenizer and make sure it has `<image>` (special) and a pad token."""
    from transformers import AutoTokenizer

    name = tokenizer_cfg.get("name_or_path")
    if not name:
        raise ConfigError(
            "llm.tokenizer.name_or_path", "is empty.", "set a hub id or a local folder."
        )
    kwargs = {k: v for k, v in tokenizer_cfg.items() if k not in ("name_or_path", "pad_token")}
    path = resolve_asset(name)
    if path != name and not Path(path).is_dir():
        raise ConfigError(
            "llm.tokenizer.name_or_path", f"bundled tokenizer {name} is missing at {path}."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer_cfg.get("pad_token") or tokenizer.unk_token or tokenizer.eos_token
        )
    if tokenizer.bos_token_id is None and tokenizer_cfg.get("add_bos_token", False):
        raise ConfigError(
            "llm.tokenizer.add_bos_token", "is true but the tokenizer has no BOS token."
        )
    return tokenizer


def build_llm(
    tokenizer: Any,
    name_or_path: str | None = None,
    pretrained: bool = False,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    init_seed: int = 0,
    quantization: dict[str, Any] | None = None,
) -> Any:
    """A causal LM whose vocabulary covers the tokenizer (including `<image>`).

    `quantization` ({bits: 4|8}) loads the pretrained weights through bitsandbytes (QLoRA: nf4,
    double quantisation, bf16 compute); stages.apply has already checked for a GPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ConfigError("llm.dtype", f"got {dtype!r}.", f"use one of {sorted(_DTYPES)}.")
    if pretrained:
        if not name_or_path:
            raise ConfigError("llm.name_or_path", "pretrained=true needs a model id or folder.")
        kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
        if quantization:
            kwargs["quantization_config"] = _bnb_config(int(quantization.get("bits", 4)))
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        if quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif quantization:
        raise ConfigError(
            "stage.quantize", "quantizes pretrained weights; llm.pretrained is false."
        )
    else:
        if not config or "model_type" not in config:
            raise ConfigError(
                "llm.config",
                "random init (pretrained=false) needs architecture numbers with model_type.",
            )
        arch = dict(config)
        if arch.get("vocab_size") is None:
            arch["vocab_size"] = len(tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch.setdefault(key, getattr(tokenizer, key))
        hf_config = AutoConfig.for_model(**arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=_DTYPES[dtype])
    embeddings: Any = model.get_input_embeddings()
    vocab_rows = int(embeddings.weight.shape[0])
    if len(tokenizer) > vocab_rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return model


def _bnb_config(bits: int) -> Any:
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
