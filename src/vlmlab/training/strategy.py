"""`trainer` (a typed `TrainerConfig`) -> Lightning Trainer arguments: strategy, precision.

The trainer presets (conf/trainer/*.yaml) name a strategy in our words:

    auto | ddp | ddp_* (Lightning's own)   passed through
    fsdp        FSDP2 through Lightning's ModelParallelStrategy: `fully_shard` on every LLM
                decoder layer and every encoder block, then on the LightningModule (the root);
                bf16 via MixedPrecisionPolicy (params bf16, gradient reduction fp32). Runs on
                CPU too (gloo), which is how the wrapping code is tested without a GPU.
    deepspeed   Lightning's DeepSpeedStrategy with a ZeRO config built here from
                `trainer.deepspeed` (the LLaVA zero2/zero3/zero3_offload json files as data)

Keys that are ours, not Lightning's (`fsdp`, `deepspeed`, `peak_tflops`, `emulate_ranks`,
`fail_after_nonfinite_steps`, `extra_callbacks`), never reach `L.Trainer(**kwargs)`. Which keys exist is the schema's
business (vlmlab.schema.TrainerConfig, checked at composition); values are checked here and
every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmlab import checkpoints
from vlmlab.errors import ConfigError
from vlmlab.schema import FsdpConfig, TrainerConfig
from vlmlab.training.deepspeed import (
    deepspeed_available,
    deepspeed_strategy,
    zero_config,
    zero_stage,
)
from vlmlab.training.guards import check_fail_after
from vlmlab.training.precision import check_precision

log = logging.getLogger(__name__)

_METADATA = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint folder
FSDP_WRAP = {"llm", "encoder"}
# `L.Trainer` arguments TrainerConfig declares as fields; the rest are vlmlab's own keys.
LIGHTNING_FIELDS = (
    "accelerator", "devices", "num_nodes", "max_steps", "strategy", "precision",
    "gradient_clip_val", "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
)  # fmt: skip
# Precisions FSDP2 handles through MixedPrecisionPolicy; Lightning itself then runs in fp32.
_FSDP_MIXED = {"bf16-mixed": torch.bfloat16}


def strategy_name(trainer: TrainerConfig) -> str:
    value = trainer.strategy
    if not isinstance(value, str):
        raise ConfigError(
            "trainer.strategy",
            f"got {value!r}.",
            "name a strategy: auto, ddp, fsdp or deepspeed (settings go in trainer.fsdp / trainer.deepspeed).",
        )
    return value


def world_size(trainer: TrainerConfig) -> int:
    devices = trainer.devices
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            "trainer.devices",
            f"got {devices!r}.",
            "give a positive integer so the global batch can be derived.",
        )
    return devices * int(trainer.num_nodes)


def peak_flops(trainer: TrainerConfig) -> float | None:
    """Peak FLOP/s of one device for MFU; None (MFU not logged) when the preset gives none."""
    value = trainer.peak_tflops
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(
            "trainer.peak_tflops",
            f"got {value!r}.",
            "give the device's dense peak in TFLOP/s for the training precision "
            "(A100 bf16: 312, H100 SXM bf16: 989) or null to skip MFU.",
        )
    return float(value) * 1e12


def emulated_ranks(trainer: TrainerConfig, resume: str | None = None) -> int:
    """`trainer.emulate_ranks: N`: one process reads the data of N ranks (the reference run
    a distributed run must reproduce); 1 when unset. `resume`: the run's `resume` value."""
    value = trainer.emulate_ranks
    if value in (None, 1):
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("trainer.emulate_ranks", f"got {value!r}.", "give an integer >= 1.")
    if world_size(trainer) != 1:
        raise ConfigError(
            "trainer.emulate_ranks",
            f"emulates {value} ranks in one process but trainer.devices x num_nodes = "
            f"{world_size(trainer)}.",
            "use it with trainer.devices=1 only.",
        )
    if resume not in (None, "", "null"):
        raise ConfigError(
            "trainer.emulate_ranks", "a rank-emulating run cannot resume.", "set resume=null."
        )
    return value


def fsdp_settings(trainer: TrainerConfig) -> FsdpConfig:
    """`trainer.fsdp` with its values checked (defaults when the preset gives none)."""
    settings = trainer.fsdp or FsdpConfig()
    if settings.state_dict not in ("sharded", "full"):
        raise ConfigError(
            "trainer.fsdp.state_dict",
            f"got {settings.state_dict!r}.",
            "use sharded (one file per rank, fast) or full (one file gathered on rank 0).",
        )
    bad = sorted(set(settings.wrap) - FSDP_WRAP)
    if bad:
        raise ConfigError(
            "trainer.fsdp.wrap", f"unknown component(s) {bad}.", "choose from llm, encoder."
        )
    if str(trainer.precision) in ("16-mixed", "16"):
        raise ConfigError(
            "trainer.precision",
            "16-mixed (fp16 with a loss scaler) is not supported with FSDP2 here.",
            "use bf16-mixed.",
        )
    if settings.cpu_offload and trainer.accelerator == "cpu":
        raise ConfigError(
            "trainer.fsdp.cpu_offload", "offloading to the CPU needs a GPU run.", "set it false."
        )
    return settings


def trainer_kwargs(trainer: TrainerConfig, micro_batch: int) -> dict[str, Any]:
    """Validated `L.Trainer` keyword arguments (vlmlab's own keys left out).

    `micro_batch`: `data.batch_size`, which DeepSpeed's config states per GPU."""
    kwargs = {name: getattr(trainer, name) for name in LIGHTNING_FIELDS}
    kwargs.update(trainer.lightning)
    world_size(trainer)
    peak_flops(trainer)
    check_fail_after(trainer.fail_after_nonfinite_steps)
    name = strategy_name(trainer)
    check_precision(str(trainer.precision), name)
    for key, section in (("fsdp", "fsdp"), ("deepspeed", "deepspeed")):
        if getattr(trainer, key) is not None and name != section:
            log.debug("trainer.%s is set but trainer.strategy=%s: ignored", key, name)
    if name == "fsdp":
        settings = fsdp_settings(trainer)
        kwargs["strategy"] = model_parallel_strategy(
            data_parallel_size=world_size(trainer),
            tensor_parallel_size=1,
            save_distributed_checkpoint=settings.state_dict == "sharded",
            # CPUOffloadPolicy keeps gradients on the CPU: their reduce-scatter needs gloo
            process_group_backend="cpu:gloo,cuda:nccl" if settings.cpu_offload else None,
        )
        if str(kwargs.get("precision")) in _FSDP_MIXED:
            kwargs["precision"] = "32-true"  # FSDP2's MixedPrecisionPolicy does the casting
    elif name == "deepspeed":
        if trainer.accelerator == "cpu":
            raise ConfigError(
                "trainer.accelerator",
                "DeepSpeed trains on GPUs only.",
                "use trainer=deepspeed_zero2 on a GPU machine, or trainer=fsdp_cpu / ddp on CPU.",
            )
        config = zero_config(trainer, micro_batch)
        if not deepspeed_available():
            raise ConfigError(
                "trainer.strategy",
                "deepspeed is requested but not installed.",
                "`pip install deepspeed` (it compiles its ops for your CUDA), or use trainer=fsdp.",
            )
        # trainable weights only in checkpoints, written atomically (training/deepspeed.py)
        kwargs["strategy"] = deepspeed_strategy(config)
    elif name.startswith("fsdp") or name.startswith("deepspeed"):
        raise ConfigError(
            "trainer.strategy",
            f"{name!r} is Lightning's spelling; vlmlab builds these strategies itself.",
            "use trainer=fsdp (or trainer.strategy=fsdp) / trainer=deepspeed_zero2 and the "
            "trainer.fsdp / trainer.deepspeed settings.",
        )
    return kwargs


def model_parallel_strategy(**kwargs: Any) -> Any:
    """Lightning's ModelParallelStrategy whose sharded checkpoint folders appear atomically.

    torch.distributed.checkpoint writes the shards in place; here they go to `<path>.tmp`, and
    rank 0 swaps the finished folder in (the old one kept as `<path>.prev` until the next
    save), so a kill mid-save leaves a loadable checkpoint for resume (checkpoints.py).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    class AtomicModelParallelStrategy(ModelParallelStrategy):
        def lightning_module_state_dict(self) -> dict[str, Any]:
            # Trainable weights only (VLMModule keeps no others): a full state dict would
            # otherwise gather the frozen 7B LLM onto rank 0 at every checkpoint.
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(
                full_state_dict=not self._save_distributed_checkpoint,
                cpu_offload=True,
                ignore_frozen_params=True,
            )
            assert self.model is not None
            return get_model_state_dict(self.model, options=options)

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            # A sharded checkpoint holds trainable weights only (above): read those, not the
            # whole model, which torch.distributed.checkpoint would report as missing keys.
            path = Path(self.broadcast(str(checkpoint_path)))
            if not (path.is_dir() and (path / _METADATA).is_file()):
                return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            assert self.model is not None
            module = self.model
            model_state = {
                "state_dict": get_model_state_dict(
                    module, options=StateDictOptions(ignore_frozen_params=True)
                )
            }
            _distributed_checkpoint_load(model_state, path)
            set_model_state_dict(
                module, model_state["state_dict"], options=StateDictOptions(strict=False)
            )
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                optim_state = {key: get_optimizer_state_dict(module, optimizer)}
                _distributed_checkpoint_load(optim_state, path)
                set_optimizer_state_dict(
                    module,
                    optimizer,
                    optim_state_dict=optim_state[key],
                    options=StateDictOptions(cpu_offload=True),
                )
            return torch.load(path / _METADATA, weights_only=True)  # never arbitrary pickles

        def save_checkpoint(
            self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
        ) -> None:
            if not self._save_distributed_checkpoint:  # one file on rank 0, via CheckpointIO
                super().save_checkpoint(checkpoint, filepath, storage_options)
                return
            path = Path(self.broadcast(str(filepath)))
            staged = path.with_name(path.name + ".tmp")
            if self.global_rank == 0:
                checkpoints.remove_path(staged)
            self.barrier("vlmlab-ckpt-clean")
            failure = checkpoints.agreed_failure(
                self, lambda: super(cls, self).save_checkpoint(checkpoint, staged, storage_options)
            )
            if failure is not None:  # every rank knows: none waits at a barrier for another
                if self.global_rank == 0:
                    checkpoints.remove_path(staged)
                kept = path if path.exists() else None
                raise checkpoints.write_error(path, failure, kept, "sharded checkpoint")
            self.barrier("vlmlab-ckpt-written")
            if self.global_rank == 0:
                checkpoints.publish_folder(staged, path)
            self.barrier("vlmlab-ckpt-swapped")

    cls = AtomicModelParallelStrategy

    return AtomicModelParallelStrategy(**kwargs)


def shards_parameters(trainer: TrainerConfig) -> bool:
    """FSDP or ZeRO-3: parameters live sharded and every forward all-gathers them collectively,
    so a rank may never skip a unit (VLM.sharded) and rank-0-only generation would hang."""
    name = strategy_name(trainer)
    return name == "fsdp" or (name == "deepspeed" and zero_stage(trainer) == 3)


def uses_global_token_loss(trainer: TrainerConfig) -> bool:
    """DeepSpeed owns gradient accumulation and scaling: its loss stays the micro-batch mean."""
    return strategy_name(trainer) != "deepspeed"


def fsdp_parallelizer(trainer: TrainerConfig) -> Callable[[torch.nn.Module, Any], None] | None:
    """The `configure_model` body for trainer.strategy=fsdp, or None for other strategies."""
    if strategy_name(trainer) != "fsdp":
        return None
    settings = fsdp_settings(trainer)
    dtype = _FSDP_MIXED.get(str(trainer.precision))

    def parallelize(root: torch.nn.Module, device_mesh: Any) -> None:
        shard_model(root, device_mesh["data_parallel"], settings, dtype)

    return parallelize


def fsdp_units(root: torch.nn.Module, wrap: list[str]) -> list[torch.nn.Module]:
    """The modules sharded on their own (each LLM decoder layer, each encoder block)."""
    from vlmlab.models.backbone import backbone_of

    model = getattr(root, "model", root)
    units: list[torch.nn.Module] = []
    for component in ("encoder", "llm"):
        if component not in wrap:
            continue
        units.extend(backbone_of(getattr(model, component), component).blocks())
    return units


def shard_model(
    root: torch.nn.Module,
    mesh: Any,
    settings: FsdpConfig,
    param_dtype: torch.dtype | None = None,
) -> None:
    """fully_shard each block, then the root: one all-gather per block, the rest with the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": settings.reshard_after_forward,
    }
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    if settings.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    units = fsdp_units(root, settings.wrap)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(root, **kwargs)
    log.info("FSDP2: sharded %d blocks + root over %d ranks", len(units), mesh.size())
