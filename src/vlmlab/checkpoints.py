"""Trainable-only checkpoints that chain across stages, and `init_from: auto` discovery.

A stage saves only what it trained (a stage-1 checkpoint of a 7B model is the connector),
plus `meta.json` naming its parent checkpoint. Loading walks the chain root-first, so stage 2
gets the LLM of the warm-up stage and the connector of stage 1 without copying paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
META = "meta.json"


def component_fingerprint(component_cfg: DictConfig) -> str:
    """Hash of a component's resolved config: equal hashes build identical modules."""
    data = OmegaConf.to_container(component_cfg, resolve=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_trainable(model: nn.Module, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write trainable weights + meta atomically: a crash never leaves a half-written checkpoint."""
    tensors = {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / WEIGHTS))
    meta = {
        **meta,
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "finished_at": time.time(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    os.replace(tmp, out_dir)
    log.info("saved %d trainable tensors to %s", len(tensors), out_dir)
    return out_dir


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / META).read_text())


def load_chain(model: nn.Module, ckpt_dir: Path, merge_last: bool = True) -> list[Path]:
    """Load `ckpt_dir` and its ancestors (root first) into `model`; returns the chain.

    A LoRA checkpoint is loaded by wrapping its component with the recorded adapter config,
    loading the adapters and folding them into the base weights. With `merge_last=False` the
    last checkpoint's adapters stay separate (to compare merged and unmerged outputs).
    """
    from vlmlab.stages.policy import merge_lora, wrap_lora

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
        parent = read_meta(current).get("parent")
        current = Path(parent) if parent else None
    hf_base = read_meta(chain[-1]).get("hf_base")
    if hf_base:  # the chain started from an HF Llava folder: its weights come first
        from vlmlab.models.hf_llava import load_hf_weights

        load_hf_weights(model, hf_base)  # type: ignore[arg-type]
    for path in reversed(chain):
        lora = read_meta(path).get("lora")
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


def from_mlflow(reference: str, tracking_uri: str) -> Path:
    """`runs:/<run_id>` or a bare run id -> the checkpoint folder that run recorded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = reference.removeprefix("runs:/").strip("/").split("/")[0]
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            "stage.init_from", f"MLflow run {run_id!r} not found in {tracking_uri}."
        ) from err
    path = run.data.tags.get("checkpoint")
    if not path:
        raise ConfigError(
            "stage.init_from", f"MLflow run {run_id} has no checkpoint tag (did it finish?)."
        )
    return Path(path)


def is_run_reference(value: str) -> bool:
    return value.startswith("runs:/") or (
        len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


def find_latest(ckpt_root: Path, stage: str, fingerprints: dict[str, str]) -> Path | None:
    """Newest finished checkpoint of `stage` whose recorded component fingerprints match ours."""
    best: tuple[float, Path] | None = None
    if not ckpt_root.is_dir():
        return None
    for meta_path in ckpt_root.glob(f"*/{META}"):
        if meta_path.parent.name.endswith(".tmp"):  # an interrupted save
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if str(meta.get("stage")) != str(stage) or not meta.get("complete", True):
            continue
        recorded: dict[str, str] = meta.get("fingerprints", {})
        if any(fingerprints.get(c) != fp for c, fp in recorded.items()):
            continue
        when = float(meta.get("finished_at", 0))
        if best is None or when > best[0]:
            best = (when, meta_path.parent)
    return best[1] if best else None
