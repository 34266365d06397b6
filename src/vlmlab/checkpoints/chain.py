"""Trainable-only stage checkpoints that chain across stages, and `init_from: auto` discovery.

A stage saves only what it trained (a stage-1 checkpoint of a 7B model is the connector),
plus `meta.json` naming its parent checkpoint. Loading walks the chain root-first, so stage 2
gets the LLM of the warm-up stage and the connector of stage 1 without copying paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlmlab.checkpoints.lightning_io import differences, flat_config, write_error
from vlmlab.checkpoints.meta import META, CheckpointMeta, read_meta
from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"


def component_fingerprint(component_cfg: DictConfig) -> str:
    """Hash of a component's resolved config: equal hashes build identical modules."""
    data = OmegaConf.to_container(component_cfg, resolve=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a stage checkpoint holds: the parameters the stage trains, nothing else."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter: each rank holds a slice, `param` itself is
    empty outside `GatheredParameters`. DeepSpeed tags them with `ds_id` and `ds_numel`."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_numel")


def gather_trainable(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable weights. FSDP-sharded (DTensor) and DeepSpeed ZeRO-3
    partitioned weights are gathered one at a time (bounded memory), so every rank must call
    this, in the same order; ranks with `keep=False` return nothing."""
    out: dict[str, torch.Tensor] = {}
    for name, param in trainable_parameters(model).items():
        if is_zero3_parameter(param):  # collective: all ranks gather, then re-partition
            import deepspeed  # `deepspeed.zero` is an attribute, not an importable module

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:  # copy out: the gathered storage is freed when the block ends
                    out[name] = param.detach().to("cpu", copy=True).contiguous()
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # DTensor: collective
            tensor = tensor.full_tensor()
        if keep:
            out[name] = tensor.cpu().contiguous()
    return out


def save_trainable(
    model: nn.Module,
    out_dir: Path,
    meta: CheckpointMeta | Mapping[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write trainable weights + meta atomically: a crash never leaves a half-written checkpoint.

    `tensors` (from gather_trainable) replaces reading the model, for sharded models. A plain
    mapping for `meta` is read as a meta.json would be (CheckpointMeta.from_dict)."""
    if tensors is None:
        tensors = gather_trainable(model)
    record = meta if isinstance(meta, CheckpointMeta) else CheckpointMeta.from_dict(meta)
    record = dataclasses.replace(
        record,
        num_tensors=len(tensors),
        num_params=sum(t.numel() for t in tensors.values()),
        finished_at=time.time(),
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / WEIGHTS))
        record.write(tmp)
        os.replace(tmp, out_dir)
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, read-only ...
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder: give the space back
        raise write_error(out_dir, err, None, "the stage checkpoint") from err
    log.info("saved %d trainable tensors to %s", len(tensors), out_dir)
    return out_dir


def load_chain(model: nn.Module, ckpt_dir: Path, merge_last: bool = True) -> list[Path]:
    """Load `ckpt_dir` and its ancestors (root first) into `model`; returns the chain.

    A LoRA checkpoint is loaded by wrapping its component with the recorded adapter config,
    loading the adapters and folding them into the base weights. With `merge_last=False` the
    last checkpoint's adapters stay separate (to compare merged and unmerged outputs).
    """
    from vlmlab.models.lora import merge_lora, wrap_lora

    chain: list[Path] = []
    current: Path | None = Path(ckpt_dir)
    while current is not None:
        if not (current / WEIGHTS).is_file():
            raise ConfigError(
                "stage.init_from",
                f"{current} holds no {WEIGHTS}.",
                "point it at a vlmlab checkpoint folder.",
            )
        chain.append(current)
        parent = read_meta(current).parent
        current = Path(parent) if parent else None
    hf_base = read_meta(chain[-1]).hf_base
    if hf_base:  # the chain started from an HF Llava folder: its weights come first
        from vlmlab.models.hf_llava import load_hf_weights

        load_hf_weights(model, hf_base)  # type: ignore[arg-type]
    for path in reversed(chain):
        lora = read_meta(path).lora
        if lora:
            wrap_lora(model, lora)
        _load_tensors(model, path)
        if lora and (merge_last or path != chain[0]):
            merge_lora(model, lora["target"])
    return chain


def _load_tensors(model: nn.Module, path: Path) -> None:
    params = dict(model.named_parameters())
    tensors = load_file(str(path / WEIGHTS))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(
            "stage.init_from",
            f"{path} has weights this model lacks: {unknown[:3]}...",
            "check encoder/connector/llm.",
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ConfigError(
                    "stage.init_from",
                    f"{path}: {name} is {tuple(tensor.shape)}, model has {tuple(params[name].shape)}.",
                )
            params[name].copy_(tensor)
    log.info("loaded %d tensors from %s", len(tensors), path)


def differing_components(meta: CheckpointMeta, fingerprints: dict[str, str]) -> list[str]:
    """Components the checkpoint recorded with another config than `fingerprints` has."""
    return [c for c, fp in meta.fingerprints.items() if fingerprints.get(c) != fp]


def describe_differences(
    meta: CheckpointMeta, fingerprints: dict[str, str], configs: Mapping[str, Mapping[str, Any]]
) -> str:
    """Each component whose config differs from the checkpoint's, with the keys (where the
    checkpoint recorded its component configs): what a refused `stage.init_from` shows."""
    parts = []
    for component in differing_components(meta, fingerprints):
        recorded = meta.config.get(component)
        keys = (
            differences(flat_config(recorded), flat_config(configs.get(component) or {}))
            if recorded
            else "its config was not recorded"
        )
        parts.append(f"{component} ({keys})")
    return "; ".join(parts)


def find_latest(ckpt_root: Path, stage: str, fingerprints: dict[str, str]) -> Path | None:
    """Newest finished checkpoint of `stage` whose recorded component fingerprints match ours."""
    best: tuple[float, Path] | None = None
    if not ckpt_root.is_dir():
        return None
    for meta_path in ckpt_root.glob(f"*/{META}"):
        if meta_path.parent.name.endswith(".tmp"):  # an interrupted save
            continue
        try:
            meta = read_meta(meta_path.parent)
        except (OSError, ValueError, TypeError):
            continue
        if meta.stage != str(stage) or not meta.complete:
            continue
        if differing_components(meta, fingerprints):
            continue
        when = meta.finished_at
        if best is None or when > best[0]:
            best = (when, meta_path.parent)
    return best[1] if best else None
