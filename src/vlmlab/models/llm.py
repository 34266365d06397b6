"""LLM backbone: any transformers causal LM plus its tokenizer, with the `<image>` token added.

Presets either load pretrained weights (`pretrained: true`, needs the weights locally or network)
or build a random-init model from the architecture numbers in `config` (the `tiny` preset).

`build_llm` is the default LLM builder (`llm._target_`, see `vlmlab.models.build_vlm`): a new
LLM family is one builder with the same signature plus one YAML naming it. `HFCausalLM` is the
Backbone adapter of a transformers causal LM (its decoder layers, activation checkpointing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.contracts import LanguageModel, LLMBackbone
from vlmlab.text import IMAGE_TOKEN

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers attention kernels a preset may name; null keeps transformers' default (sdpa)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_FLASH_PACKAGES = {  # kernel: (package transformers looks for, how to get it)
    "flash_attention_2": ("flash-attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash-attn-3", "build flash-attn's hopper/ folder (H100/H200)"),
}


def flash_attention_problem(value: str) -> str | None:
    """Why `value` (a flash_attention_* kernel) cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and this machine has none visible"
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = (
        is_flash_attn_2_available() if value == "flash_attention_2" else is_flash_attn_3_available()
    )
    if not available:
        return f"needs the {_FLASH_PACKAGES[value][0]} package, which is not installed"
    return None


def check_attn_implementation(value: str | None, key: str) -> str | None:
    """Validate an `attn_implementation` preset value before any weights are loaded.

    Why here: transformers only finds a missing flash-attn after reading the config (and may
    fall back to a hub kernel download); a 7B load should fail at once, naming the key.
    """
    if value is None:
        return None
    if value not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            key,
            f"got {value!r}.",
            f"use null (transformers' default: sdpa) or one of {list(ATTN_IMPLEMENTATIONS)}.",
        )
    if value in _FLASH_PACKAGES:
        if torch.get_default_device().type == "meta":
            return None  # a shape-only build (vlmlab plan) runs no kernel
        missing = flash_attention_problem(value)
        if missing:
            raise ConfigError(
                key,
                f"{value} {missing}.",
                f"use sdpa (or null) here, or run on a CUDA GPU with {_FLASH_PACKAGES[value][0]} "
                f"installed ({_FLASH_PACKAGES[value][1]}).",
            )
    return value


def quantized_device_map(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """`device_map` that puts a bitsandbytes model on this process's GPU.

    Why: bitsandbytes quantises while loading, on the device it loads to; without a map every
    rank loads onto GPU 0 before Lightning sets the device. The local rank is LOCAL_RANK
    (torchrun, Lightning's own launcher for ranks > 0), else SLURM_LOCALID (srun; Lightning's
    SLURMEnvironment reads the same), else 0 (the launching process).
    """
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        raw = env.get(name)
        if raw not in (None, ""):
            try:
                return {"": int(str(raw))}
            except ValueError:
                raise ConfigError(name, f"is {raw!r}, not an integer local rank.") from None
    return {"": 0}


def resolve_asset(path: str) -> str:
    """`pkg://tiny_tokenizer` -> the folder shipped inside vlmlab/assets; other paths unchanged."""
    if path.startswith("pkg://"):
        return str(resources.files("vlmlab") / "assets" / path.removeprefix("pkg://"))
    return path


TOKENIZER_BACKENDS = ("auto", "sentencepiece")


def build_tokenizer(tokenizer_cfg: dict[str, Any]) -> Any:
    """Load the tokenizer and make sure it has `<image>` (special) and a pad token.

    `backend` (llm.tokenizer.backend): `sentencepiece` loads tokenizer.model with the
    SentencePiece library, token for token what LLaVA trained with (transformers 4's slow
    `LlamaTokenizer`, vlmlab.models.sp_tokenizer); `auto` (default) is AutoTokenizer, except
    for a folder that this backend saved (its tokenizer_config.json says so), which reloads
    with it: transformers 5 would read tokenizer.model as BPE merges, other tokens.
    """
    name = tokenizer_cfg.get("name_or_path")
    if not name:
        raise ConfigError(
            "llm.tokenizer.name_or_path", "is empty.", "set a hub id or a local folder."
        )
    backend = tokenizer_cfg.get("backend") or "auto"
    if backend not in TOKENIZER_BACKENDS:
        raise ConfigError(
            "llm.tokenizer.backend", f"got {backend!r}.", f"use one of {list(TOKENIZER_BACKENDS)}."
        )
    kwargs = {
        k: v for k, v in tokenizer_cfg.items() if k not in ("name_or_path", "pad_token", "backend")
    }
    path = resolve_asset(name)
    if path != name and not Path(path).is_dir():
        raise ConfigError(
            "llm.tokenizer.name_or_path", f"bundled tokenizer {name} is missing at {path}."
        )
    from vlmlab.models.sp_tokenizer import load_sentencepiece_tokenizer, saved_with_sentencepiece

    tokenizer: Any
    if backend == "sentencepiece" or (Path(path).is_dir() and saved_with_sentencepiece(path)):
        tokenizer = load_sentencepiece_tokenizer(path, **kwargs)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **{**kwargs, "trust_remote_code": False})
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
    tokenizer: Any | None,
    name_or_path: str | None = None,
    pretrained: bool = False,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    init_seed: int = 0,
    quantization: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM whose vocabulary covers the tokenizer (including `<image>`).

    `quantization` ({bits: 4|8}) loads the pretrained weights through bitsandbytes (QLoRA: nf4,
    double quantisation, bf16 compute) onto this process's GPU (`quantized_device_map`);
    stages.apply has already checked for a GPU. `attn_implementation` (null = transformers'
    default) picks the attention kernel; the built model's `config._attn_implementation` says
    which one runs. `tokenizer=None` (a shape-only build, `vlmlab plan`) takes the vocabulary
    from `config.vocab_size` and adds no row for `<image>`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ConfigError("llm.dtype", f"got {dtype!r}.", f"use one of {sorted(_DTYPES)}.")
    attn = check_attn_implementation(attn_implementation, "llm.attn_implementation")
    attn_kwargs: dict[str, Any] = {"attn_implementation": attn} if attn else {}
    if pretrained:
        if not name_or_path:
            raise ConfigError("llm.name_or_path", "pretrained=true needs a model id or folder.")
        kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], **attn_kwargs}
        if quantization:
            kwargs["quantization_config"] = _bnb_config(int(quantization.get("bits", 4)))
            if torch.cuda.is_available():
                kwargs["device_map"] = quantized_device_map()
                _check_visible(kwargs["device_map"][""])
                log.info(
                    "loading quantized %s onto cuda:%d", name_or_path, kwargs["device_map"][""]
                )
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=False, **kwargs
        )
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
            if tokenizer is None:
                raise ConfigError(
                    "llm.config.vocab_size",
                    "is null (= len(tokenizer)) and no tokenizer was loaded.",
                    "set llm.config.vocab_size=N.",
                )
            arch["vocab_size"] = len(tokenizer)
        if tokenizer is not None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                arch.setdefault(key, getattr(tokenizer, key))
        hf_config = AutoConfig.for_model(**arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=_DTYPES[dtype], **attn_kwargs)
    embeddings: Any = model.get_input_embeddings()
    vocab_rows = int(embeddings.weight.shape[0])
    if tokenizer is not None and len(tokenizer) > vocab_rows:
        # mean resizing computes statistics of the old rows: impossible on the meta device
        model.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=64, mean_resizing=not embeddings.weight.is_meta
        )
    return model


def enable_hf_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of each layer of a transformers model.

    transformers hooks the input embeddings to make their output require grad: only reentrant
    checkpointing needs that. Non-reentrant checkpointing recomputes correctly without it, and
    the hook would turn frozen embeddings into extra leaves needing grads, so it is removed.
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


class HFCausalLM(LLMBackbone):
    """The Backbone adapter of a transformers causal LM (or of peft wrapping one).

    Blocks are the decoder's `layers` (LlamaDecoderLayer, Qwen2DecoderLayer, ...): FSDP's
    shard units and what `stage.train_last.llm` counts. Every parameter gets gradients.
    """

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.hidden_size = int(self.base().get_input_embeddings().embedding_dim)

    def base(self) -> Any:
        """The transformers model (inside a peft wrapper, the one carrying the adapters)."""
        model: Any = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def blocks(self) -> list[nn.Module]:
        layers = getattr(self.base().get_decoder(), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ConfigError(
                "llm",
                f"{type(self.base()).__name__} has no decoder layers at get_decoder().layers.",
                "give this LLM family its own Backbone adapter (vlmlab.models.contracts).",
            )
        return list(layers)

    def unused_parameters(self) -> list[nn.Parameter]:
        return []

    def enable_activation_checkpointing(self) -> None:
        enable_hf_checkpointing(self.base())


def _check_visible(index: int) -> None:
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            "stage.quantize",
            f"this process's local rank is {index} but it sees {count} GPU(s).",
            "give every rank all of its node's GPUs (do not narrow CUDA_VISIBLE_DEVICES per "
            "task), as Lightning expects: rank k uses cuda:k.",
        )


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
