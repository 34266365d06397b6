"""`vlmlab plan`: parameter counts and a memory estimate for a composition, before any download.

The model is built on the meta device from the presets' architecture numbers (`config:`
blocks), so a 7B composition costs no memory and no network. The stage policy is applied to
that meta model (it only flips `requires_grad`), so the trainable counts are the ones training
would see.

Memory per GPU (decimal GB) follows what training holds (training/precision.py):

    every trainable parameter has an fp32 master, whatever the load dtype:
        4 B weight + 4 B gradient + 8 B AdamW (m, v in fp32)      = 16 B per trainable param
    frozen parameters stay in the dtype they are held in (their load dtype, e.g. a frozen
    bf16 LLM 2 B; fp32 where precision.py upcasts them: a trained component wholly, FSDP's
    root unit and units holding trainable parameters; 32-true under FSDP: everything)
    DeepSpeed casts the module to the compute dtype and keeps the fp32 masters in its
    optimizer: 2 B weight + 2 B gradient + 12 B (master, m, v) per trainable param in 16 bit,
    4 + 4 + 8 in 32-true; frozen 2 B (4 B in 32-true)
    QLoRA (stage.quantize): the LLM's linear weights (lm_head excepted) bits/8 B, the rest of
    the LLM fp32 (peft's prepare_model_for_kbit_training)

    N = world size (devices x nodes)
    ddp              weights + grads + optimizer
    deepspeed_zero1  weights + grads + optimizer / N
    deepspeed_zero2  weights + (grads + optimizer) / N
    fsdp, zero3      (weights + grads + optimizer) / N

plus compute copies: FSDP all-gathers each shard unit in the compute dtype (the root stays
gathered, about two blocks are in flight), ZeRO-3 about two blocks; DDP under *-mixed keeps
autocast's 16-bit casts of the fp32 trainable weights from forward to backward, and its
gradient buckets are a second copy of the gradients (Lightning leaves gradient_as_bucket_view
off).

Activations of one micro batch (b sequences of s tokens), after Korthikanti et al. 2022 for a
fused (SDPA/flash) attention kernel: 34 * b * s * h bytes per transformer layer in 16 bit (x2
in fp32). Counted for the LLM whenever anything trains (gradients reach the connector through
it) and for the encoder (b x image tokens) only when it trains. Components that
`stage.gradient_checkpointing` checkpoints (the rule of stages.checkpointed_components) keep
only each layer's input (b * s * h in the residual stream's dtype: fp32 under DDP when the
LLM's weights are fp32, else the compute dtype) plus one layer's full activations during the
recompute. The loss path keeps the final hidden states and one chunk's logits, their fp32 copy, the
log-softmax and the gradients: 14 * min(chunk, b * s) * vocab bytes (measured by
benchmarks/loss_memory.py at vocab 128k; head and cross-entropy run over checkpointed chunks
of target positions, `VisionLanguageModel.loss_chunk_size`, never the whole (b, s, vocab)
tensor). The CUDA context, fragmentation,
temporary buffers and communication buckets other than DDP's are not counted: treat the
total as a lower bound.
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

from vlmlab import schema
from vlmlab.errors import ConfigError
from vlmlab.schema import FsdpConfig, TrainerConfig

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")
GB = 1e9

# bytes per trainable parameter (weight, gradient, optimizer state); see module doc
MASTER_BYTES = (4, 4, 8)  # fp32 master + fp32 gradient + AdamW m, v (DDP, FSDP; any 32-true)
DEEPSPEED_HALF_BYTES = (2, 2, 12)  # 16-bit module + 16-bit gradient + fp32 master, m, v
# Target positions per chunk of the LLM head + cross-entropy when the model does not say
# (`VisionLanguageModel.loss_chunk_size`): the loss never holds the whole (B, T, vocab)
# logits, only one (checkpointed) chunk's fp32 logits and their gradient.
LOSS_CHUNK = 1024


@dataclass
class MemoryEstimate:
    strategy: str
    world_size: int
    precision: str
    micro_batch: int
    seq_len: int
    checkpointing: bool  # stage.gradient_checkpointing
    checkpointed: list[str]  # the components it applies to (stages.checkpointed_components)
    master_weights: str  # where the fp32 masters of trainable parameters live
    dtypes: dict[str, dict[str, int]]  # component -> dtype as held -> parameters
    bytes_per_param: dict[str, int]  # per trainable parameter
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    compute_copies_gb: float
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


def _config_strategy(trainer: TrainerConfig) -> Any:
    """The composed trainer's strategy; a DeepSpeed preset says its ZeRO stage in `deepspeed.stage`."""
    strategy = trainer.strategy
    if str(strategy).lower().startswith("deepspeed") and trainer.deepspeed is not None:
        return f"deepspeed_zero{int(trainer.deepspeed.stage)}"
    return strategy


def normalize_precision(value: Any) -> str:
    """Lightning precision (32, '32-true', 'bf16-mixed', '16-true', ...) -> its family."""
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


def _world_size(trainer: TrainerConfig) -> int:
    devices = trainer.devices
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        count = devices
    elif isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    else:
        raise ConfigError(
            "trainer.devices", f"got {devices!r}.", "pass --gpus N to say how many GPUs train."
        )
    return count * int(trainer.num_nodes or 1)


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


def build_meta_model(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The composed VisionLanguageModel on the meta device, from architecture numbers only.

    Built by `build_vlm` (the assembly training uses) with `weights="none"` on the meta
    device. Returns the model and notes on the vocabulary (what we build vs what training
    would build).
    """
    from vlmlab.models import build_vlm
    from vlmlab.text import IMAGE_TOKEN

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
    tokenizer = _local_tokenizer(cfg.llm)
    if arch.get("vocab_size") is None:
        if tokenizer is None:
            raise ConfigError(
                "llm.config.vocab_size",
                "is null (= len(tokenizer)) and the tokenizer is not a local folder.",
                "set llm.config.vocab_size=N.",
            )
        info["vocab_source"] = "len(tokenizer)"
    else:
        info["vocab_source"] = "llm.config.vocab_size"
    model, _ = build_vlm(
        cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta", tokenizer=tokenizer
    )
    rows = int(model.llm.get_input_embeddings().num_embeddings)
    if tokenizer is not None and len(tokenizer) > int(arch.get("vocab_size") or len(tokenizer)):
        info["vocab_source"] += f", padded to a multiple of 64 for {len(tokenizer)} tokens"
    elif tokenizer is None:
        info["notes"].append(
            f"vocabulary {rows} from llm.config.vocab_size (tokenizer not loaded: not a local "
            f"folder); if the tokenizer lacks {IMAGE_TOKEN}, training adds it and pads the "
            "embeddings to a multiple of 64 (LLaVA-1.5: 32064)."
        )
    info["vocab_size"] = rows
    return model, info


def _blocks(module: Any, key: str) -> list[Any]:
    from vlmlab.models.backbone import backbone_of

    return backbone_of(module, key).blocks()


def _quantized_weights(model: Any) -> set[int]:
    """ids of the LLM weights bitsandbytes quantizes: every nn.Linear weight but the head's."""
    head = model.llm.get_output_embeddings()
    return {
        id(module.weight)
        for name, module in model.llm.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and ".lora_" not in name
    }


def _residual_bytes(held_fp32: bool, strategy: str, family: str) -> int:
    """Bytes per element of the residual stream a checkpointed layer keeps as its input.

    Under DDP with *-mixed, autocast computes matmuls in 16 bit but the residual adds follow
    the fp32 embeddings/norms when the weights are held in fp32; FSDP and DeepSpeed compute
    with 16-bit weights throughout.
    """
    if family == "32-true":
        return 4
    return 4 if strategy == "ddp" and held_fp32 else 2


def _activation_bytes(
    model: Any,
    micro_batch: int,
    seq_len: int,
    act_bytes: int,
    checkpointed: list[str],
    strategy: str,
    family: str,
    quantized: bool = False,
) -> float:
    """Rough activation memory of one micro batch (see the module docstring)."""

    def stack(tokens: int, hidden: int, layers: int, checkpoint: bool, residual: int) -> float:
        per_layer = 34 * tokens * hidden * act_bytes / 2
        if checkpoint:
            return layers * tokens * hidden * residual + per_layer
        return layers * per_layer

    text = model.llm.config.get_text_config()
    tokens = micro_batch * seq_len
    embedding = model.llm.get_input_embeddings().weight
    # fp32 embeddings: trained (master weights), loaded so, or QLoRA's prepare step
    held_fp32 = quantized or embedding.requires_grad or embedding.dtype == torch.float32
    residual = _residual_bytes(held_fp32, strategy, family)
    total = stack(tokens, text.hidden_size, text.num_hidden_layers, "llm" in checkpointed, residual)
    total += tokens * text.hidden_size * act_bytes  # final hidden states, input of the head
    vocab = model.llm.get_output_embeddings().out_features
    chunk = int(getattr(model, "loss_chunk_size", LOSS_CHUNK))
    total += 14 * min(chunk, tokens) * vocab  # one chunk: logits, fp32 copy, softmax, grads
    if any(p.requires_grad for p in model.encoder.parameters()):
        vision = next(model.encoder.parameters())
        layers = len(_blocks(model.encoder, "encoder"))
        total += stack(  # every tile of the largest image goes through the encoder (AnyRes)
            micro_batch * model.encoder.num_tokens * _image_tiles(model),
            model.encoder.hidden_size,
            layers,
            "encoder" in checkpointed,
            _residual_bytes(
                vision.requires_grad or vision.dtype == torch.float32, strategy, family
            ),
        )
    return total


def _image_tiles(model: Any) -> int:
    """Encoder passes per image at the largest grid: 1 (pad), 1 + rows x cols (AnyRes)."""
    return int(getattr(model, "max_image_tiles", 1))


def _dtypes(
    model: Any, quantized: set[int], bits: int | None, frozen_dtype: str | None
) -> dict[str, dict[str, int]]:
    """component -> dtype as held in training -> parameter count (`frozen_dtype`: DeepSpeed's module dtype)."""
    from vlmlab.stages.policy import attached_parameters

    out: dict[str, dict[str, int]] = {}
    for name in COMPONENTS:
        counts: dict[str, int] = {}
        for param in [*getattr(model, name).parameters(), *attached_parameters(model, name)]:
            if id(param) in quantized:
                key = f"int{bits}"
            elif frozen_dtype:
                key = frozen_dtype  # DeepSpeed holds the whole module so (masters: optimizer)
            elif param.requires_grad or (quantized and name == "llm"):
                key = "float32"  # master weights; QLoRA's prepare step upcasts the LLM's rest
            else:
                key = str(param.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + param.numel()
        out[name] = counts
    return out


def estimate_memory(
    model: Any,
    strategy: str,
    world_size: int,
    precision: str,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = False,
    quantize_bits: int | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of training `model` as currently frozen/unfrozen (formula: module doc).

    Frozen parameters count in the dtype they are held in; call
    training.precision.apply_master_weights on the model first to hold them as training
    does (`plan` does). `checkpointing` is stage.gradient_checkpointing: which components it
    reaches follows stages.checkpointed_components.
    """
    from vlmlab.stages.policy import checkpointed_components
    from vlmlab.training.precision import check_precision

    strategy = normalize_strategy(strategy)
    family = normalize_precision(precision)
    deepspeed = strategy.startswith("deepspeed")
    check_precision(str(precision), "deepspeed" if deepspeed else strategy)
    compute = 4 if family == "32-true" else 2
    if deepspeed:
        per_trainable = MASTER_BYTES if family == "32-true" else DEEPSPEED_HALF_BYTES
    else:
        per_trainable = MASTER_BYTES
    weight_b, grad_b, optim_b = per_trainable
    quantized = _quantized_weights(model) if quantize_bits else set()
    llm_params = {id(p) for p in model.llm.parameters()} if quantize_bits else set()
    weights = grads = optim = 0.0
    trainable = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = param.numel()
        if id(param) in quantized:
            weights += count * (quantize_bits or 16) / 8
        elif param.requires_grad:
            trainable += count
            weights += count * weight_b
        elif deepspeed:
            weights += count * compute
        elif id(param) in llm_params:
            weights += count * 4  # prepare_model_for_kbit_training keeps the rest fp32
        else:
            weights += count * param.element_size()
    grads, optim = trainable * grad_b, trainable * optim_b
    n = max(1, world_size)
    if strategy in ("fsdp", "deepspeed_zero3"):
        weights, grads, optim = weights / n, grads / n, optim / n
    elif strategy == "deepspeed_zero2":
        grads, optim = grads / n, optim / n
    elif strategy == "deepspeed_zero1":
        optim = optim / n
    units = [*_blocks(model.llm, "llm"), *_blocks(model.encoder, "encoder")]
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    notes = []
    copies = 0.0
    if strategy == "fsdp":
        in_units = {id(p) for u in units for p in u.parameters()}
        root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
        copies = compute * (root + 2 * largest)
        notes.append(
            "fsdp: the root unit (connector, embeddings, head, norms) stays all-gathered; "
            "about two blocks are gathered at a time."
        )
    elif strategy == "deepspeed_zero3":
        copies = compute * 2 * largest
    elif strategy == "ddp":
        copies = trainable * grad_b  # gradient buckets (gradient_as_bucket_view off)
        if family != "32-true":
            copies += trainable * 2  # autocast's 16-bit casts of the fp32 trainable weights
    checkpointed = checkpointed_components(model) if checkpointing else []
    activations = _activation_bytes(
        model,
        micro_batch,
        seq_len,
        compute,
        checkpointed,
        strategy,
        family,
        quantized=bool(quantize_bits),
    )
    if n == 1 and strategy != "ddp":
        notes.append(f"{strategy} on one GPU shards nothing.")
    if deepspeed:
        masters = (
            "fp32 in DeepSpeed's optimizer (module held in 16 bit)"
            if family != "32-true"
            else "fp32 (32-true)"
        )
    else:
        masters = "fp32 (every trainable parameter; frozen ones keep their dtype)"
    return MemoryEstimate(
        strategy=strategy,
        world_size=n,
        precision=str(precision),
        micro_batch=micro_batch,
        seq_len=seq_len,
        checkpointing=checkpointing,
        checkpointed=checkpointed,
        master_weights=masters,
        dtypes=_dtypes(
            model,
            quantized,
            quantize_bits,
            ("bfloat16" if compute == 2 else "float32") if deepspeed else None,
        ),
        bytes_per_param={"weight": weight_b, "gradient": grad_b, "optimizer": optim_b},
        weights_gb=weights / GB,
        gradients_gb=grads / GB,
        optimizer_gb=optim / GB,
        compute_copies_gb=copies / GB,
        activations_gb=activations / GB,
        total_gb=(weights + grads + optim + copies + activations) / GB,
        notes=notes,
    )


def _precision_strategy(strategy: str) -> str:
    """The plan's strategy name in training/precision.py's words."""
    return "deepspeed" if strategy.startswith("deepspeed") else strategy


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
    stage.gradient_checkpointing (`checkpointing=True` forces it on). A stage/trainer pair
    training would refuse before building (QLoRA under FSDP or ZeRO-3) raises here too.
    """
    from vlmlab import stages
    from vlmlab.stages.policy import attached_parameters
    from vlmlab.training.precision import apply_master_weights

    started = time.perf_counter()
    trainer = schema.typed(cfg.trainer, TrainerConfig)
    chosen = normalize_strategy(strategy or _config_strategy(trainer))
    problems = stages.config_problems(
        cfg.stage, TrainerConfig(strategy=chosen) if strategy else trainer
    )
    if problems:
        raise ConfigError("stage", "invalid stage policy:\n  " + "\n  ".join(problems))
    precision = precision or str(trainer.precision)
    model, info = build_meta_model(cfg)
    stages.apply(cfg.stage, model, machine_checks=False)
    quantize = _plain(cfg.stage.get("quantize")) or None
    bits = int(quantize.get("bits", 4)) if quantize else None
    wrap = list((trainer.fsdp or FsdpConfig()).wrap)
    units = [u for c in ("encoder", "llm") if c in wrap for u in _blocks(getattr(model, c), c)]
    apply_master_weights(model, precision, _precision_strategy(chosen), shard_units=units)
    components = {}
    for name in COMPONENTS:
        params = [*getattr(model, name).parameters(), *attached_parameters(model, name)]
        components[name] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    max_length = int(cfg.data.get("max_length", 2048))
    largest = int(model.image_token_counter().max_count)
    if largest >= max_length:
        info["notes"].append(
            f"the largest image gives {largest} tokens, data.max_length is {max_length}: such "
            "samples cannot fit; raise data.max_length or lower encoder.anyres.max_tiles."
        )
    memory = estimate_memory(
        model,
        strategy=chosen,
        world_size=gpus if gpus is not None else _world_size(trainer),
        precision=precision,
        micro_batch=micro_batch or int(cfg.data.get("batch_size", 1)),
        seq_len=seq_len or int(cfg.data.get("max_length", 2048)),
        checkpointing=checkpointing or bool(cfg.stage.get("gradient_checkpointing", False)),
        quantize_bits=bits,
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
        "image_tokens": int(model.image_token_counter().max_count),  # the largest image
        "image_tiles": _image_tiles(model),  # its encoder passes (AnyRes: overview + grid)
        "image_strategy": str(getattr(model, "image_strategy", "pad")),
        "vocab_size": info["vocab_size"],
        "vocab_source": info["vocab_source"],
        "memory": asdict(memory),
        "memory_gb_per_gpu": round(memory.total_gb, 3),
        "feature_cache": feature_cache_plan(cfg, model),
        "loader": loader_plan(cfg, model),
        "notes": info["notes"] + memory.notes,
        "seconds": round(time.perf_counter() - started, 3),
    }


LCS_558K = 558_128  # LLaVA-1.5 stage-1 images: the reference size when no manifest is found


def feature_cache_plan(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What `data.features` would cost on disk and save in memory (data/features.py).

    The cache holds N x Dv features per image in `data.feature_dtype` (null: the encoder's);
    with it the tower is never loaded, which saves its weights as held.
    """
    from vlmlab.data.features import cache_size_bytes, encoder_trains
    from vlmlab.models.vision import DTYPES

    encoder = model.encoder
    dtype = str(cfg.data.get("feature_dtype") or cfg.encoder.get("dtype") or "float32")
    per_image = cache_size_bytes(1, int(encoder.num_tokens), int(encoder.hidden_size), dtype)
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    images, where = LCS_558K, "LCS-558K, for reference"
    try:
        from vlmlab.data.prepare import data_source
        from vlmlab.data.shards import read_manifest

        shard_dir = data_source(schema.typed(cfg.data, schema.DataConfig)).set_dir(
            str(cfg.stage.dataset), "stage.dataset"
        )
        images, where = int(read_manifest(shard_dir)["num_with_image"]), str(shard_dir)
    except Exception:  # not converted or generated yet: the reference size instead
        pass
    usable = not encoder_trains(_plain(cfg.stage)) and cfg.encoder.get("image", "pad") == "pad"
    return {
        "mode": str(cfg.data.get("features", "off")),
        "dtype": dtype if dtype in DTYPES else "float32",
        "bytes_per_image": per_image,
        "images": images,
        "images_from": where,
        "size_gb": round(per_image * images / 1e9, 3),
        "usable": usable,  # the stage's encoder is frozen and images are single tiles
        "encoder_weights_gb_saved": round(weights / 1e9, 3) if usable else 0.0,
    }


def loader_plan(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """Host memory the data loader holds per rank, at most: each DataLoader worker decodes its
    whole look-ahead (the samples of `data.group_megabatch` batches when grouping by length or
    packing, else one batch) before it yields from it, and images travel as uint8 tiles
    (3 x S x S bytes each; AnyRes: up to `image_tiles` per image). Why: a longer look-ahead pads
    less (AnyRes most, benchmarks/padding.py) and costs this much RAM per worker."""
    data = cfg.data
    grouped = bool(data.get("group_by_length", False) or data.get("packing", False))
    batches = int(data.get("group_megabatch", 16)) if grouped else 1
    samples = int(data.get("batch_size", 1)) * batches
    size = int(model.encoder.image_size)
    per_sample = _image_tiles(model) * 3 * size * size
    workers = max(1, int(data.get("num_workers", 0)))
    return {
        "lookahead_samples": samples,
        "bytes_per_sample_max": per_sample,
        "workers": workers,
        "gb_per_rank_max": round(samples * per_sample * workers / GB, 3),
    }


def _loader_line(result: dict[str, Any]) -> str:
    loader = result["loader"]
    return (
        f"data loader look-ahead: {loader['lookahead_samples']} samples x up to "
        f"{loader['bytes_per_sample_max'] / 1e6:.2f} MB of uint8 pixels x {loader['workers']} "
        f"workers = at most {loader['gb_per_rank_max']:.2f} GB host RAM per rank "
        "(data.batch_size x data.group_megabatch when grouping or packing)"
    )


def _feature_line(result: dict[str, Any]) -> str:
    cache = result["feature_cache"]
    size = (
        f"{cache['bytes_per_image'] / 1e6:.2f} MB per image x {cache['images']:,} images "
        f"({cache['images_from']}) = {cache['size_gb']:.1f} GB on disk ({cache['dtype']})"
    )
    if not cache["usable"]:
        return f"feature cache: not used by this stage (its encoder trains or tiles); {size}"
    return (
        f"feature cache (data.features={cache['mode']}): {size}; the vision tower is not "
        f"loaded: {cache['encoder_weights_gb_saved']:.2f} GB of weights saved per GPU"
    )


def _checkpointing_line(mem: dict[str, Any]) -> str:
    if not mem["checkpointing"]:
        return "activation checkpointing: off (stage.gradient_checkpointing=false)"
    on = ", ".join(mem["checkpointed"]) or "none (nothing trains)"
    return f"activation checkpointing: {on} (stage.gradient_checkpointing=true; every component gradients flow through)"


def _image_line(result: dict[str, Any]) -> str:
    if result.get("image_strategy", "pad") == "pad":
        return f"image tokens per sample: {result['image_tokens']}"
    return (
        f"image tokens per sample: up to {result['image_tokens']} (encoder.image=anyres, the "
        f"largest grid: {result['image_tiles']} tiles through the encoder)"
    )


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
    held = "; ".join(
        f"{c} " + ", ".join(f"{d} {n:,}" for d, n in sorted(counts.items()))
        for c, counts in mem["dtypes"].items()
    )
    per = mem["bytes_per_param"]
    lines = [
        f"plan: {parts or 'composition'} (stage {result['stage']})",
        format_table(rows),
        _image_line(result),
        f"vocabulary: {result['vocab_size']} ({result['vocab_source']})",
        "",
        f"master weights: {mem['master_weights']}",
        f"parameters as held: {held}",
        _checkpointing_line(mem),
        "",
        f"memory per GPU, {mem['strategy']} x {mem['world_size']}, {mem['precision']}, "
        f"micro batch {mem['micro_batch']} x {mem['seq_len']} tokens:",
        f"  weights        {mem['weights_gb']:9.2f} GB  "
        f"({per['weight']} B/trainable param, frozen as held)",
        f"  gradients      {mem['gradients_gb']:9.2f} GB  ({per['gradient']} B/trainable param)",
        f"  optimizer      {mem['optimizer_gb']:9.2f} GB  "
        f"({per['optimizer']} B/trainable param, AdamW)",
        f"  compute copies {mem['compute_copies_gb']:9.2f} GB  "
        "(gathered shards / autocast casts / DDP buckets)",
        f"  activations    {mem['activations_gb']:9.2f} GB  (rough, see `vlmlab.plan` docs)",
        f"  total          {mem['total_gb']:9.2f} GB",
        _feature_line(result),
        _loader_line(result),
    ]
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1)
