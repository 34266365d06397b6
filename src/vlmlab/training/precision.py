"""Parameter dtypes for training: fp32 master weights for everything that trains.

Why: presets load 7B LLMs in bf16 to halve their memory. Lightning's `bf16-mixed` only
autocasts, so weights, gradients and AdamW state of a bf16-loaded model stay bf16, and an
update of lr 2e-5 on a weight near 0.02 (a bf16 step there is ~1.2e-4) rounds away: stage 2
would silently not train. The rule here, applied once after the stage policy and before the
optimizer or any sharding exists:

- every trainable parameter is fp32 (its optimizer state follows it);
- a component that trains is held wholly in fp32, so no module mixes dtypes inside (a partly
  trained encoder, `train_last`), except a LoRA-wrapped one: its frozen base keeps the load
  dtype (peft casts activations into and out of the fp32 adapters);
- frozen components keep their load dtype (the frozen 7B LLM of stage 1 stays bf16);
- FSDP2 needs one dtype per shard unit (`fully_shard` refuses mixed units): a unit that holds
  a trainable parameter is fp32 wholly, and so is the root unit (connector, embeddings, head,
  norms: small); with `bf16-mixed` its MixedPrecisionPolicy computes in bf16 and reduces
  gradients in fp32. Under FSDP with `32-true` the whole model is fp32.

DeepSpeed casts the module to bf16 itself and keeps fp32 masters in its optimizer. Pure
half-precision training (`bf16-true`, `16-true`) would make the weights bf16 again, so it is
refused with the key and the fix.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
_HALF_TRUE = {"bf16-true", "16-true", "bf16", "16", "half"}


@dataclass
class PrecisionReport:
    """What `apply_master_weights` did, for the run log and tests."""

    upcast: int = 0  # parameters converted to fp32
    dtypes: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> dtype -> count

    def summary(self) -> str:
        parts = [
            f"{c}: " + ", ".join(f"{n:,} {d}" for d, n in sorted(counts.items()))
            for c, counts in self.dtypes.items()
        ]
        return f"{self.upcast:,} parameters upcast to fp32; " + "; ".join(parts)


def check_precision(precision: str, strategy: str) -> None:
    """Refuse precisions that would train half-precision weights (no fp32 master copy)."""
    if strategy == "deepspeed":
        return  # DeepSpeed keeps fp32 masters in its optimizer whatever the module dtype
    if str(precision) in _HALF_TRUE:
        raise ConfigError(
            "trainer.precision",
            f"{precision} casts the whole model, trainable weights included, to half precision: "
            "AdamW updates of ~1e-5 round away in bf16 and the stage silently stops learning.",
            "use trainer.precision=bf16-mixed (fp32 master weights, bf16 compute).",
        )


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _to_fp32(params: Iterable[nn.Parameter]) -> int:
    count = 0
    for param in params:
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            if param.grad is not None:
                param.grad = param.grad.float()
            count += param.numel()
    return count


def _module_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def apply_master_weights(
    model: nn.Module,
    precision: str = "32-true",
    strategy: str = "auto",
    shard_units: list[nn.Module] | None = None,
) -> PrecisionReport:
    """Convert parameters in place so every trainable weight has an fp32 master (rules above).

    `shard_units`: the modules FSDP shards on their own (training.strategy.fsdp_units); the
    rest belongs to the root unit. Call after `stages.apply`, before the optimizer is built.
    """
    check_precision(precision, strategy)
    report = PrecisionReport()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    report.upcast += _to_fp32(named[n] for n in trainable)
    for component in COMPONENTS:
        module = getattr(model, component, None)
        if module is None:
            continue
        prefix = f"{component}."
        trains = [n for n in trainable if n.startswith(prefix)]
        lora_only = bool(trains) and all(_is_lora(n) for n in trains)
        if trains and not lora_only:
            report.upcast += _to_fp32(module.parameters())
    if strategy == "fsdp":
        if precision == "32-true" or shard_units is None:
            report.upcast += _to_fp32(model.parameters())
        else:
            in_units: set[int] = set()
            for unit in shard_units:
                params = _module_params(unit)
                in_units.update(id(p) for p in params)
                if any(p.requires_grad for p in params) or len({p.dtype for p in params}) > 1:
                    report.upcast += _to_fp32(params)
            report.upcast += _to_fp32(p for p in model.parameters() if id(p) not in in_units)
    for component in COMPONENTS:
        module = getattr(model, component, None)
        if module is not None:
            counts: Counter[str] = Counter()
            for p in module.parameters():
                counts[str(p.dtype).removeprefix("torch.")] += p.numel()
            report.dtypes[component] = dict(counts)
    if report.upcast:
        log.info("master weights: %s", report.summary())
    return report


def master_dtypes(model: nn.Module) -> set[torch.dtype]:
    """Dtypes of the trainable parameters (tests and the plan: {torch.float32} after apply)."""
    return {p.dtype for p in model.parameters() if p.requires_grad}
