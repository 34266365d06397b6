"""DeepSpeed ZeRO through Lightning's DeepSpeedStrategy: the config built from `trainer.deepspeed`.

The LLaVA zero2/zero3/zero3_offload json files are data here (conf/trainer/deepspeed_*.yaml);
Lightning adds precision, gradient clipping and accumulation from the trainer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig

from vlmlab.errors import ConfigError
from vlmlab.training.settings import settings_block

DEEPSPEED_KEYS = {
    "stage",
    "offload_optimizer",
    "offload_parameters",
    "pin_memory",
    "allgather_bucket_size",
    "reduce_bucket_size",
    "overlap_comm",
    "contiguous_gradients",
    "sub_group_size",
    "max_live_parameters",
    "max_reuse_distance",
    "prefetch_bucket_size",
    "param_persistence_threshold",
    "gather_16bit_weights_on_model_save",
}


def zero_config(cfg: DictConfig) -> dict[str, Any]:
    """The DeepSpeed config (LLaVA's scripts/zero{2,3,3_offload}.json, with numbers for its
    `auto`s); Lightning adds precision, gradient clipping and accumulation from the trainer."""
    block = settings_block(cfg.trainer, "deepspeed", DEEPSPEED_KEYS)
    stage = block.get("stage", 2)
    if stage not in (1, 2, 3):
        raise ConfigError("trainer.deepspeed.stage", f"got {stage!r}.", "use 1, 2 or 3.")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(block.get("overlap_comm", True)),
        "contiguous_gradients": bool(block.get("contiguous_gradients", True)),
        "sub_group_size": int(block.get("sub_group_size", 1e9)),
        "allgather_bucket_size": int(block.get("allgather_bucket_size", 2e8)),
        "reduce_bucket_size": int(block.get("reduce_bucket_size", 2e8)),
    }
    pin = bool(block.get("pin_memory", True))
    if block.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if block.get("offload_parameters"):
        if stage != 3:
            raise ConfigError(
                "trainer.deepspeed.offload_parameters",
                f"parameter offload needs ZeRO stage 3, got stage {stage}.",
                "use trainer=deepspeed_zero3_offload or set trainer.deepspeed.stage=3.",
            )
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(block.get("prefetch_bucket_size", 5e7)),
                "stage3_param_persistence_threshold": int(
                    block.get("param_persistence_threshold", 1e5)
                ),
                "stage3_max_live_parameters": int(block.get("max_live_parameters", 1e9)),
                "stage3_max_reuse_distance": int(block.get("max_reuse_distance", 1e9)),
                "stage3_gather_16bit_weights_on_model_save": bool(
                    block.get("gather_16bit_weights_on_model_save", True)
                ),
            }
        )
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, as Lightning's default config
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
    }


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None
