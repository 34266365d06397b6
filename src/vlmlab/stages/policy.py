"""Apply a stage policy to a model: what trains, with which LoRA, learning rates and groups.

A stage is data (conf/stage/*.yaml). `apply` validates the whole policy against the built
model and raises one ConfigError listing every problem, each naming its key, before anything
trains. Then it wraps LoRA adapters, sets `requires_grad`, enables gradient checkpointing and
returns the optimizer parameter groups and the per-component parameter table.

Gradient checkpointing (`stage.gradient_checkpointing`) applies to every component that
gradients flow *through* (`checkpointed_components`), not only those that train: in stage 1
the frozen LLM carries the loss back to the connector and would otherwise keep every layer's
activations. `vlmlab plan` uses the same rule for its activation estimate.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.backbone import backbone_of, block_names
from vlmlab.models.lora import lora_config, wrap_lora
from vlmlab.schema import (
    LoraConfig,
    OptimConfig,
    ParamGroupConfig,
    StageConfig,
    TrainerConfig,
    keys_of,
)

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
# The keys a policy may hold: the schema's (a stored policy from a checkpoint is checked too).
STAGE_KEYS = keys_of(StageConfig)
OPTIM_KEYS = keys_of(OptimConfig)
LORA_KEYS = keys_of(LoraConfig)
GROUP_KEYS = keys_of(ParamGroupConfig)


@dataclass
class StagePlan:
    """What `apply` decided."""

    trainable: list[str]
    groups: list[dict[str, Any]] = field(default_factory=list)  # {name, params, lr, weight_decay}
    table: list[dict[str, Any]] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # the resolved LoRA config (recorded in checkpoints)
    # components with activation checkpointing (checkpointed_components)
    checkpointed: list[str] = field(default_factory=list)


# Parameters of the VLM itself (outside the three components) and the component they belong
# to for globs, groups and the table. AnyRes's learned `image_newline` sits between the
# connector's output and the LLM and trains with the projector: `train: [connector]` and
# `match: connector.*` include it. (LLaVA-NeXT trains it in stage 2 with the base LR next to the
# projector, llava/train/train.py `mm_tunable_parts`; its stage 1 is square images, where the
# newline is unused: here a stage-1 AnyRes run would otherwise leave it at its random init.)
ATTACHED = {"image_newline": "connector"}


def policy_name(name: str) -> str:
    """The dotted name globs see: `image_newline` is `connector.image_newline`."""
    return f"{ATTACHED[name]}.{name}" if name in ATTACHED else name


def attached_parameters(model: nn.Module, component: str) -> list[nn.Parameter]:
    """The VLM's own parameters that count as part of `component` (see ATTACHED)."""
    return [p for n, p in model.named_parameters(recurse=False) if ATTACHED.get(n) == component]


def _matches(name: str, pattern: str) -> bool:
    # `connector` matches the module and everything under it; globs work on dotted paths.
    # A parameter ATTACHED to a component matches its own name and the component's globs.
    return any(
        fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")
        for n in {name, policy_name(name)}
    )


def _as_dict(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
        assert isinstance(data, dict)
        return {str(k): v for k, v in data.items()}
    return dict(node)


def _unknown_keys(given: dict[str, Any], allowed: set[str], prefix: str) -> list[str]:
    problems = []
    for key in sorted(set(given) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(
            f"{prefix}.{key}: unknown key{hint}; valid keys: {', '.join(sorted(allowed))}."
        )
    return problems


def unused_parameters(model: nn.Module) -> set[str]:
    """Parameters the forward never touches (e.g. encoder layers after `select_layer`).

    They can't get gradients, so training them would be a silent no-op (and DDP would fail).
    Each Backbone declares them (`unused_parameters`); names are found by identity.
    """
    ids: set[int] = set()
    for component in ("encoder", "llm"):
        module = getattr(model, component, None)
        if module is not None:
            ids |= {id(p) for p in backbone_of(module, component).unused_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _quantize_problems(spec: dict[str, Any], machine: bool = True) -> list[str]:
    """QLoRA settings; with `machine`, also whether this machine can load 4/8-bit weights."""
    if not spec:
        return []
    problems = []
    if int(spec.get("bits", 4)) not in (4, 8):
        problems.append("stage.quantize.bits: use 4 (QLoRA, nf4) or 8.")
    if not machine:
        return problems
    if not torch.cuda.is_available():
        problems.append(
            "stage.quantize: 4/8-bit base weights (QLoRA) need a CUDA GPU and bitsandbytes; "
            "this machine has no GPU. Use stage=2_lora on CPU."
        )
    else:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("stage.quantize: needs bitsandbytes (`pip install bitsandbytes`).")
    return problems


def _zero_stage(trainer: TrainerConfig) -> int:
    """The ZeRO stage a `deepspeed` trainer runs (trainer.deepspeed.stage, DeepSpeed's default 2)."""
    return int(trainer.deepspeed.stage) if trainer.deepspeed is not None else 2


def sharding_problem(quantize: Any, strategy: str, zero_stage: int | None = None) -> str | None:
    """Why quantized (bitsandbytes) base weights can't train under `strategy`, or None.

    `strategy` is the trainer's (`fsdp`, `deepspeed`, `ddp`, ... or the plan's
    `deepspeed_zero3`). bitsandbytes stores 4-bit weights packed two per uint8 element
    (Params4bit) with their scales in a separate `quant_state`: FSDP2's `fully_shard` and
    ZeRO-3's partitioning slice the packed tensor and lose the state, so both are refused.
    DDP and ZeRO-1/2 replicate the frozen base and shard only trainable state: they work.
    """
    if not quantize:
        return None
    bits = int(_as_dict(quantize).get("bits", 4))
    kind = (
        "4-bit bitsandbytes weights (two per uint8 element in Params4bit, scales in quant_state)"
        if bits == 4
        else f"{bits}-bit bitsandbytes weights (Int8Params with separate scales)"
    )
    name = str(strategy).lower()
    if name.startswith("fsdp") or name in ("model_parallel", "modelparallelstrategy"):
        return (
            f"stage.quantize with trainer.strategy={strategy}: {kind} can't be sharded by "
            "FSDP2's fully_shard. Use trainer=ddp (the quantized base is replicated, only the "
            "LoRA state trains) or trainer=deepspeed_zero2, or drop stage.quantize "
            "(stage=2_lora) to shard with FSDP."
        )
    if name.startswith("deepspeed"):
        stage = zero_stage
        if "zero3" in name or "stage_3" in name:
            stage = 3
        if stage == 3:
            return (
                f"stage.quantize with trainer.strategy={strategy}, trainer.deepspeed.stage=3: "
                f"ZeRO-3 partitions every parameter and can't partition {kind}. Use "
                "trainer=deepspeed_zero2 (or trainer.deepspeed.stage=2) or trainer=ddp."
            )
    return None


def config_problems(policy: Any, trainer: TrainerConfig | None = None) -> list[str]:
    """Problems the stage (and trainer) config show on any machine; `vlmlab plan` reports them."""
    stage = _as_dict(policy)
    quantize = _as_dict(stage.get("quantize"))
    problems = _quantize_problems(quantize, machine=False)
    if quantize and trainer is not None:
        strategy = str(trainer.strategy)
        problem = sharding_problem(quantize, strategy, _zero_stage(trainer))
        if problem:
            problems.append(problem)
    return problems


def check_before_build(policy: Any, trainer: TrainerConfig | None = None) -> None:
    """Problems visible without a model: fail before loading weights, listing all of them.

    E.g. QLoRA on a CPU machine (needs a CUDA GPU) and QLoRA under FSDP or ZeRO-3 (can't
    shard 4-bit weights) in one message. `trainer`: the typed `cfg.trainer` (None: stage only).
    """
    quantize = _as_dict(_as_dict(policy).get("quantize"))
    problems = _quantize_problems(quantize)
    problems += [p for p in config_problems(policy, trainer) if p not in problems]
    if problems:
        raise ConfigError("stage", "invalid stage policy:\n  " + "\n  ".join(problems))


def apply(policy: Any, model: nn.Module, machine_checks: bool = True) -> StagePlan:
    """Validate `policy` (the stage config) against `model`, then enforce it.

    `machine_checks=False` (`vlmlab plan` on a meta model) skips what depends on this machine
    (a GPU for QLoRA), so a QLoRA run can be planned on a laptop.
    """
    stage = _as_dict(policy)
    problems = _unknown_keys(stage, STAGE_KEYS, "stage")
    problems += _unknown_keys(_as_dict(stage.get("optim")), OPTIM_KEYS, "stage.optim")
    lora_spec = _as_dict(stage.get("lora"))
    problems += _unknown_keys(lora_spec, LORA_KEYS, "stage.lora")
    problems += _quantize_problems(_as_dict(stage.get("quantize")), machine=machine_checks)
    if stage.get("quantize") and not lora_spec:
        problems.append(
            "stage.quantize: quantized base weights only train through LoRA; set stage.lora."
        )

    resolved_lora = None
    if lora_spec:
        target = lora_spec.get("target", "llm")
        if target not in COMPONENTS or not hasattr(model, target):
            problems.append(
                f"stage.lora.target: component {target!r} does not exist; use one of {', '.join(COMPONENTS)}."
            )
        else:
            resolved_lora = lora_config(lora_spec, getattr(model, target))
            missing = [
                t for t in resolved_lora["target_modules"]
                if not any(n.rsplit(".", 1)[-1] == t for n, _ in getattr(model, target).named_modules())
            ]  # fmt: skip
            if missing:
                problems.append(
                    f"stage.lora.target_modules: {missing} are not modules of {target}."
                )

    train_globs = list(stage.get("train") or [])
    freeze_globs = list(stage.get("freeze") or [])
    names = [name for name, _ in model.named_parameters()]
    for key, globs in (("stage.train", train_globs), ("stage.freeze", freeze_globs)):
        for pattern in globs:
            if not any(_matches(n, pattern) for n in names):
                problems.append(
                    f"{key}: glob {pattern!r} matches no parameter (components: {', '.join(COMPONENTS)})."
                )
    last_globs = []
    for component, count in _as_dict(stage.get("train_last")).items():
        module = getattr(model, component, None) if component in ("encoder", "llm") else None
        if module is None:
            problems.append(
                f"stage.train_last.{component}: no component with repeated blocks by that name "
                "(use encoder or llm)."
            )
            continue
        unused = unused_parameters(model)
        used = [
            name for name in block_names(module, component)
            if not all(
                f"{component}.{name}.{n}" in unused
                for n, _ in module.get_submodule(name).named_parameters()
            )
        ]  # fmt: skip
        if not 0 < int(count) <= len(used):
            problems.append(
                f"stage.train_last.{component}: {count} is not in 1..{len(used)} (blocks that feed the output)."
            )
            continue
        last_globs += [f"{component}.{name}" for name in used[-int(count) :]]
    if problems:
        raise ConfigError("stage", "invalid stage policy:\n  " + "\n  ".join(problems))

    if resolved_lora is not None:
        wrap_lora(model, resolved_lora)
        names = [name for name, _ in model.named_parameters()]
    unused = unused_parameters(model)
    lora_names = {n for n in names if ".lora_" in n}
    trainable = [
        n for n in names
        if (any(_matches(n, g) for g in [*train_globs, *last_globs]) or n in lora_names)
        and not any(_matches(n, g) for g in freeze_globs)
        and n not in unused
    ]  # fmt: skip
    if resolved_lora is not None:  # LoRA trains adapters; the wrapped base stays frozen
        base = f"{resolved_lora['target']}."
        trainable = [n for n in trainable if n in lora_names or not n.startswith(base)]
    if not trainable:
        problems.append(
            "stage.train: nothing would train. Name at least one module, e.g. train: [connector]."
        )
    groups = _param_groups(stage, trainable, problems)
    if problems:
        raise ConfigError("stage", "invalid stage policy:\n  " + "\n  ".join(problems))

    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    checkpointed = []
    if stage.get("gradient_checkpointing"):
        checkpointed = _enable_gradient_checkpointing(model)
    model.train()  # re-evaluates frozen-encoder eval mode
    return StagePlan(
        trainable=trainable,
        groups=groups,
        table=parameter_table(model),
        lora=resolved_lora,
        checkpointed=checkpointed,
    )


def _param_groups(
    stage: dict[str, Any], trainable: list[str], problems: list[str]
) -> list[dict[str, Any]]:
    """Per-glob lr / weight decay; every trainable parameter lands in exactly one group."""
    optim = _as_dict(stage.get("optim"))
    default = {
        "lr": float(optim.get("lr", 1e-3)),
        "weight_decay": float(optim.get("weight_decay", 0.0)),
    }
    claimed: dict[str, str] = {}
    groups = []
    for i, raw in enumerate(stage.get("param_groups") or []):
        spec = _as_dict(raw)
        problems += _unknown_keys(spec, GROUP_KEYS, f"stage.param_groups[{i}]")
        patterns = spec.get("match")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        name = str(spec.get("name") or "|".join(patterns) or f"group{i}")
        if not patterns:
            problems.append(
                f"stage.param_groups[{i}].match: give a glob, e.g. match: 'connector.*'."
            )
            continue
        members = [n for n in trainable if any(_matches(n, p) for p in patterns)]
        if not members:
            problems.append(
                f"stage.param_groups[{i}].match: {patterns} matches no trainable parameter."
            )
        for member in members:
            if member in claimed:
                problems.append(
                    f"stage.param_groups: {member} is claimed by both {claimed[member]!r} and {name!r}."
                )
            claimed[member] = name
        groups.append(
            {
                "name": name,
                "params": members,
                "lr": float(spec.get("lr", default["lr"])),
                "weight_decay": float(spec.get("weight_decay", default["weight_decay"])),
            }
        )
    rest = [n for n in trainable if n not in claimed]
    if rest:
        groups.insert(0, {"name": "default", "params": rest, **default})
    return groups


def checkpointed_components(model: nn.Module) -> list[str]:
    """Components gradients flow through, which `stage.gradient_checkpointing` checkpoints.

    The LLM whenever anything trains: it comes last, so the loss reaches a trainable connector
    or encoder through it even when it is frozen, and without checkpointing it keeps every
    layer's activations (LLaVA's stage 1). The encoder only when some of its parameters train:
    a frozen encoder runs under no_grad and keeps nothing. The connector is a few layers.
    """

    def trains(name: str) -> bool:
        module = getattr(model, name, None)
        return module is not None and any(p.requires_grad for p in module.parameters())

    found = []
    if trains("encoder"):
        found.append("encoder")
    if getattr(model, "llm", None) is not None and any(trains(c) for c in COMPONENTS):
        found.append("llm")
    return found


def _enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Non-reentrant activation checkpointing on each block of the components that need it."""
    enabled = []
    for component in checkpointed_components(model):
        backbone_of(getattr(model, component), component).enable_activation_checkpointing()
        enabled.append(component)
    if enabled:
        log.info("activation checkpointing on: %s", ", ".join(enabled))
    return enabled


def parameter_table(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable/frozen parameter counts per top-level component."""
    rows = []
    for component, module in model.named_children():
        params = [*module.parameters(), *attached_parameters(model, component)]
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append(
            {
                "component": component,
                "trainable": trainable,
                "frozen": total - trainable,
                "total": total,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The `[TRAINABLE]` / `[Frozen]` table printed at the start of every stage."""
    lines = [f"{'component':<12}{'state':<13}{'trainable':>14}{'frozen':>14}{'total':>14}"]
    for row in rows:
        state = (
            "[Frozen]"
            if row["trainable"] == 0
            else ("[TRAINABLE]" if row["frozen"] == 0 else "[partial]")
        )
        lines.append(
            f"{row['component']:<12}{state:<13}{row['trainable']:>14,}{row['frozen']:>14,}{row['total']:>14,}"
        )
    total_t = sum(r["trainable"] for r in rows)
    total = sum(r["total"] for r in rows)
    lines.append(f"{'all':<12}{'':<13}{total_t:>14,}{total - total_t:>14,}{total:>14,}")
    return "\n".join(lines)
