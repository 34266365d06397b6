"""Validated sub-blocks of `cfg.trainer` (trainer.fsdp, trainer.deepspeed): unknown keys named."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def settings_block(trainer: DictConfig, key: str, allowed: set[str]) -> dict[str, Any]:
    block = dict(plain(trainer.get(key)) or {})
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ConfigError(
            f"trainer.{key}.{unknown[0]}",
            f"unknown key(s) {unknown}.",
            f"valid keys: {', '.join(sorted(allowed))}.",
        )
    return block
