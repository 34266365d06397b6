"""`vlmlab plan`: parameter counts and a memory estimate for a composition, before any download.

The model is built on the meta device from the presets' architecture numbers (`config:`
blocks), so a 7B composition costs no memory and no network. The stage policy is applied to
that meta model (it only flips `requires_grad`), so the trainable counts are the ones training
would see.

Memory per GPU (decimal GB) is the usual ZeRO accounting (Rajbhandari et al. 2020):

    P = all parameters, T = trainable parameters, N = world size (devices x nodes)
    precision      weight  grad  optimizer (AdamW, per trainable param)
    32-true           4     4     8   (m, v in fp32)
    *-mixed           2     2    12   (fp32 master copy + m + v)
    *-true (16 bit)   2     2     4   (m, v in 16 bit, no master copy)

    weights = P * weight, grads = T * grad, optimizer = T * optimizer
    ddp              weights + grads + optimizer
    deepspeed_zero1  weights + grads + optimizer / N
    deepspeed_zero2  weights + (grads + optimizer) / N
    fsdp, zero3      (weights + grads + optimizer) / N

plus a rough activation term for one micro batch (b sequences of s tokens), after Korthikanti
et al. 2022 for a fused (SDPA/flash) attention kernel without recomputation: 34 * b * s * h
bytes per transformer layer in 16 bit (x2 in fp32), for the LLM always (gradients reach the
connector through it) and for the encoder (b * image tokens) only when it trains, plus fp32
logits and their gradient (8 * b * s * vocab). With `checkpointing`, only each layer's input
(2 * b * s * h) is kept, plus one layer's full activations. Buffers, the CUDA context,
fragmentation and communication buckets are not counted: treat the total as a lower bound.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")
GB = 1e9

# precision family -> bytes per parameter (weight, gradient, optimizer state); see module doc
BYTES = {"32-true": (4, 4, 8), "mixed": (2, 2, 12), "16-true": (2, 2, 4)}


@dataclass
class MemoryEstimate:
    strategy: str
    world_size: int
    precision: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    bytes_per_param: dict[str, int]
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    notes: list[str] = field(default_factory=list)


def normalize_strategy(value: Any) -> str:
    """Lightning's strategy names (or ours) -> one of STRATEGIES."""
    if isinstance(value, dict | DictConfig):
        value = value.get("_target_", "") or ""
    name = str(value).lower().rsplit(".", 1)[-1]
    if name in STRATEGIES:
        return name
    if name in ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device", "dp"):
        return "ddp"
    if name.startswith("ddp") or name in ("ddpstrategy", "singledevicestrategy"):
        return "ddp"
    if name.startswith("fsdp") or name in ("modelparallelstrategy", "model_parallel"):
        return "fsdp"
    if name.startswith("deepspeed"):
        for stage in ("1", "2", "3"):
            if f"stage_{stage}" in name or f"zero{stage}" in name:
                return f"deepspeed_zero{stage}"
        return "deepspeed_zero2"  # Lightning's DeepSpeedStrategy default
    raise ConfigError(
        "trainer.strategy",
        f"plan cannot estimate memory for strategy {value!r}.",
        f"pass --strategy with one of {', '.join(STRATEGIES)}.",
    )


def _config_strategy(trainer: DictConfig) -> Any:
    """The composed trainer's strategy; a DeepSpeed preset says its ZeRO stage in `deepspeed.stage`."""
    strategy = trainer.get("strategy", "auto")
    stage = (trainer.get("deepspeed") or {}).get("stage")
    if str(strategy).lower().startswith("deepspeed") and stage is not None:
        return f"deepspeed_zero{int(stage)}"
    return strategy


def normalize_precision(value: Any) -> str:
    """Lightning precision (32, '32-true', 'bf16-mixed', '16-true', ...) -> a key of BYTES."""
    name = str(value).lower()
    if "mixed" in name:
        return "mixed"
    if name in ("32", "32-true"):
        return "32-true"
    if name in ("16", "bf16", "16-true", "bf16-true"):
        return "16-true"
    raise ConfigError(
        "trainer.precision",
        f"plan cannot estimate memory for precision {value!r}.",
        "use 32-true, bf16-mixed, 16-mixed, bf16-true or 16-true.",
    )


def _world_size(trainer: DictConfig) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        count = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    else:
        raise ConfigError(
            "trainer.devices", f"got {devices!r}.", "pass --gpus N to say how many GPUs train."
        )
    return count * int(trainer.get("num_nodes", 1) or 1)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _local_tokenizer(llm_cfg: DictConfig) -> Any | None:
    """The tokenizer when it is a local folder (or bundled); None for hub ids (no network)."""
    from vlmlab.models.llm import build_tokenizer, resolve_asset

    tok_cfg = _plain(llm_cfg.get("tokenizer")) or {}
    name = tok_cfg.get("name_or_path")
    if not name or not Path(resolve_asset(name)).is_dir():
        return None
    return build_tokenizer(tok_cfg)


def _unwrap(err: Exception) -> Exception:
    """hydra.instantiate wraps a part's ConfigError; give the ConfigError back."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConfigError):
            return cause
        cause = cause.__cause__
    return err


def build_meta_model(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The composed VisionLanguageModel on the meta device, from architecture numbers only.

    Returns the model and notes on the vocabulary (what we build vs what training would build).
    """
    from hydra.utils import instantiate
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlmlab.models import IMAGE_TOKEN, VisionLanguageModel
    from vlmlab.models.llm import _DTYPES

    info: dict[str, Any] = {"notes": []}
    if cfg.encoder.get("pretrained") and not cfg.encoder.get("config"):
        raise ConfigError(
            "encoder.config",
            "plan builds the encoder from architecture numbers and this preset has none.",
            "add a `config:` block with the tower's numbers to the encoder preset.",
        )
    arch = _plain(cfg.llm.get("config"))
    if not arch or "model_type" not in arch:
        raise ConfigError(
            "llm.config",
            "plan builds the LLM from architecture numbers (with model_type) and there are none.",
            "add a `config:` block to the llm preset.",
        )
    arch = dict(arch)
    tokenizer = _local_tokenizer(cfg.llm)
    if arch.get("vocab_size") is None:
        if tokenizer is None:
            raise ConfigError(
                "llm.config.vocab_size",
                "is null (= len(tokenizer)) and the tokenizer is not a local folder.",
                "set llm.config.vocab_size=N.",
            )
        arch["vocab_size"] = len(tokenizer)
        info["vocab_source"] = "len(tokenizer)"
    else:
        info["vocab_source"] = "llm.config.vocab_size"
    rows = int(arch["vocab_size"])
    if tokenizer is not None and len(tokenizer) > rows:  # build_llm grows the embedding
        rows = -(-len(tokenizer) // 64) * 64
        info["vocab_source"] += f", padded to a multiple of 64 for {len(tokenizer)} tokens"
    elif tokenizer is None:
        info["notes"].append(
            f"vocabulary {rows} from llm.config.vocab_size (tokenizer not loaded: not a local "
            f"folder); if the tokenizer lacks {IMAGE_TOKEN}, training adds it and pads the "
            "embeddings to a multiple of 64 (LLaVA-1.5: 32064)."
        )
    arch["vocab_size"] = rows
    info["vocab_size"] = rows
    dtype = _DTYPES.get(str(cfg.llm.get("dtype", "float32")), torch.float32)

    encoder_kwargs: dict[str, Any] = {"_convert_": "all"}
    if "pretrained" in cfg.encoder:
        encoder_kwargs["pretrained"] = False
    try:
        with torch.device("meta"):
            encoder = instantiate(cfg.encoder, **encoder_kwargs)
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch), dtype=dtype)
            connector_args = _plain(cfg.connector)
            connector_args.pop("init_seed", None)
            connector = instantiate(
                connector_args,
                in_features=encoder.hidden_size,
                out_features=llm.get_input_embeddings().embedding_dim,
            )
    except Exception as err:
        raise _unwrap(err) from err
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else -1
    return VisionLanguageModel(encoder, connector, llm, image_token_id), info


def _activation_bytes(
    model: Any, micro_batch: int, seq_len: int, act_bytes: int, checkpointing: bool
) -> float:
    """Rough activation memory of one micro batch (see the module docstring)."""

    def stack(tokens: int, hidden: int, layers: int) -> float:
        per_layer = 34 * tokens * hidden * act_bytes / 2
        if checkpointing:
            return layers * tokens * hidden * act_bytes + per_layer
        return layers * per_layer

    text = model.llm.config.get_text_config()
    total = stack(micro_batch * seq_len, text.hidden_size, text.num_hidden_layers)
    total += 8 * micro_batch * seq_len * model.llm.get_output_embeddings().out_features
    if any(p.requires_grad for p in model.encoder.parameters()):
        vcfg = getattr(getattr(model.encoder, "vision", None), "config", None)
        layers = getattr(vcfg, "num_hidden_layers", 0)
        total += stack(micro_batch * model.encoder.num_tokens, model.encoder.hidden_size, layers)
    return total


def estimate_memory(
    model: Any,
    strategy: str,
    world_size: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """Per-GPU memory of training `model` as currently frozen/unfrozen (formula: module doc)."""
    strategy = normalize_strategy(strategy)
    family = normalize_precision(precision)
    weight_b, grad_b, optim_b = BYTES[family]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights, grads, optim = total * weight_b, trainable * grad_b, trainable * optim_b
    n = max(1, world_size)
    if strategy in ("fsdp", "deepspeed_zero3"):
        weights, grads, optim = weights / n, grads / n, optim / n
    elif strategy == "deepspeed_zero2":
        grads, optim = grads / n, optim / n
    elif strategy == "deepspeed_zero1":
        optim = optim / n
    act_bytes = 4 if family == "32-true" else 2
    activations = _activation_bytes(model, micro_batch, seq_len, act_bytes, checkpointing)
    notes = []
    if n == 1 and strategy != "ddp":
        notes.append(f"{strategy} on one GPU shards nothing.")
    return MemoryEstimate(
        strategy=strategy,
        world_size=n,
        precision=str(precision),
        micro_batch=micro_batch,
        seq_len=seq_len,
        checkpointing=checkpointing,
        bytes_per_param={"weight": weight_b, "gradient": grad_b, "optimizer": optim_b},
        weights_gb=weights / GB,
        gradients_gb=grads / GB,
        optimizer_gb=optim / GB,
        activations_gb=activations / GB,
        total_gb=(weights + grads + optim + activations) / GB,
        notes=notes,
    )


def plan(
    cfg: DictConfig,
    strategy: str | None = None,
    gpus: int | None = None,
    precision: str | None = None,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Parameters per component, trainable under `cfg.stage`, image tokens and memory per GPU.

    Unset arguments come from the composed config: trainer.strategy/devices/num_nodes/precision,
    data.batch_size (micro batch), data.max_length (sequence length) and
    stage.gradient_checkpointing (`checkpointing=True` forces it on).
    """
    from vlmlab import stages

    started = time.perf_counter()
    model, info = build_meta_model(cfg)
    stages.apply(cfg.stage, model)
    components = {}
    for name in COMPONENTS:
        module = getattr(model, name)
        components[name] = {
            "total": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }
    memory = estimate_memory(
        model,
        strategy=strategy or _config_strategy(cfg.trainer),
        world_size=gpus if gpus is not None else _world_size(cfg.trainer),
        precision=precision or str(cfg.trainer.get("precision", "32-true")),
        micro_batch=micro_batch or int(cfg.data.get("batch_size", 1)),
        seq_len=seq_len or int(cfg.data.get("max_length", 2048)),
        checkpointing=checkpointing or bool(cfg.stage.get("gradient_checkpointing", False)),
    )
    choices = {}
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            runtime = HydraConfig.get().runtime.choices
            choices = {k: str(runtime[k]) for k in (*COMPONENTS, "stage") if k in runtime}
    except (ImportError, ValueError):  # composed without Hydra's runtime config
        choices = {}
    return {
        "composition": choices,
        "stage": str(cfg.stage.get("name", "")),
        "params_total": sum(c["total"] for c in components.values()),
        "params_trainable": sum(c["trainable"] for c in components.values()),
        "components": components,
        "image_tokens": int(model.num_image_tokens),
        "vocab_size": info["vocab_size"],
        "vocab_source": info["vocab_source"],
        "memory": asdict(memory),
        "memory_gb_per_gpu": round(memory.total_gb, 3),
        "notes": info["notes"] + memory.notes,
        "seconds": round(time.perf_counter() - started, 3),
    }


def format_plan(result: dict[str, Any]) -> str:
    """The human-readable plan: the stage table, image tokens and the memory breakdown."""
    from vlmlab.stages.policy import format_table

    rows = [
        {
            "component": name,
            "trainable": c["trainable"],
            "frozen": c["total"] - c["trainable"],
            "total": c["total"],
        }
        for name, c in result["components"].items()
    ]
    mem = result["memory"]
    parts = " ".join(f"{k}={v}" for k, v in result["composition"].items())
    lines = [
        f"plan: {parts or 'composition'} (stage {result['stage']})",
        format_table(rows),
        f"image tokens per sample: {result['image_tokens']}",
        f"vocabulary: {result['vocab_size']} ({result['vocab_source']})",
        "",
        f"memory per GPU, {mem['strategy']} x {mem['world_size']}, {mem['precision']}, "
        f"micro batch {mem['micro_batch']} x {mem['seq_len']} tokens"
        f"{', activation checkpointing' if mem['checkpointing'] else ''}:",
        f"  weights      {mem['weights_gb']:9.2f} GB  ({mem['bytes_per_param']['weight']} B/param)",
        f"  gradients    {mem['gradients_gb']:9.2f} GB  "
        f"({mem['bytes_per_param']['gradient']} B/trainable param)",
        f"  optimizer    {mem['optimizer_gb']:9.2f} GB  "
        f"({mem['bytes_per_param']['optimizer']} B/trainable param, AdamW)",
        f"  activations  {mem['activations_gb']:9.2f} GB  (rough, see `vlmlab.plan` docs)",
        f"  total        {mem['total_gb']:9.2f} GB",
    ]
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1)
