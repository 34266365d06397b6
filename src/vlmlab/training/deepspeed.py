"""DeepSpeed ZeRO through Lightning's DeepSpeedStrategy: the config built from `trainer.deepspeed`.

The LLaVA zero2/zero3/zero3_offload json files are data here (conf/trainer/deepspeed_*.yaml);
Lightning adds precision, gradient clipping and accumulation from the trainer.

What Lightning 2.6's DeepSpeedStrategy does not do by itself, and this module adds:
- `deepspeed_strategy`: checkpoints hold the trainable parameters only
  (`exclude_frozen_parameters`; otherwise every step checkpoint rewrites the frozen 7B LLM)
  and appear atomically: DeepSpeed writes its folder in place, so a kill mid-save used to
  leave a torn `last.ckpt/`; here it is written to `last.ckpt.tmp/` and swapped in, the old one
  kept as `last.ckpt.prev/` (as training/strategy.py does for FSDP).
- `optimizer_class`: ZeRO-Offload refuses a client torch optimizer (DeepSpeed's
  `zero_force_ds_cpu_optimizer` check); it needs DeepSpeedCPUAdam.
- `zero_stage`: ZeRO-3 shards parameters like FSDP, so rank-0-only work (end-of-stage eval,
  sample generation) must be skipped and every forward must run the whole model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmlab import checkpoints
from vlmlab.errors import ConfigError
from vlmlab.schema import DeepSpeedConfig, TrainerConfig

log = logging.getLogger(__name__)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def zero_config(trainer: TrainerConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config (LLaVA's scripts/zero{2,3,3_offload}.json, with numbers for its
    `auto`s); Lightning adds precision, gradient clipping and accumulation from the trainer.
    `micro_batch`: `data.batch_size` (DeepSpeed's `train_micro_batch_size_per_gpu`)."""
    block = trainer.deepspeed or DeepSpeedConfig()
    stage = block.stage
    if stage not in (1, 2, 3):
        raise ConfigError("trainer.deepspeed.stage", f"got {stage!r}.", "use 1, 2 or 3.")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(block.overlap_comm),
        "contiguous_gradients": bool(block.contiguous_gradients),
        "sub_group_size": int(block.sub_group_size),
        "allgather_bucket_size": int(block.allgather_bucket_size),
        "reduce_bucket_size": int(block.reduce_bucket_size),
    }
    pin = bool(block.pin_memory)
    if block.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if block.offload_parameters:
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
                "stage3_prefetch_bucket_size": int(_or(block.prefetch_bucket_size, 5e7)),
                "stage3_param_persistence_threshold": int(
                    _or(block.param_persistence_threshold, 1e5)
                ),
                "stage3_max_live_parameters": int(_or(block.max_live_parameters, 1e9)),
                "stage3_max_reuse_distance": int(_or(block.max_reuse_distance, 1e9)),
                "stage3_gather_16bit_weights_on_model_save": bool(
                    _or(block.gather_16bit_weights_on_model_save, True)
                ),
            }
        )
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, as Lightning's default config
        "train_micro_batch_size_per_gpu": int(micro_batch),
    }


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def zero_stage(trainer: TrainerConfig) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None for any other strategy.

    Stage 3 partitions the parameters: like FSDP, the model is `sharded` (every rank runs every
    forward) and rank-0-only generation at the end of the stage would hang the other ranks."""
    if trainer.strategy != "deepspeed":
        return None
    return int(zero_config(trainer, 1)["zero_optimization"]["stage"])


def optimizer_class(trainer: TrainerConfig) -> type | None:
    """The optimizer DeepSpeed accepts for this config; None means torch.optim.AdamW.

    With `offload_optimizer` DeepSpeed refuses any client optimizer but its own CPU Adam
    (engine `_configure_optimizer`: "ZeRO-Offload with a client provided optimizer",
    `zero_force_ds_cpu_optimizer`, default true). DeepSpeedCPUAdam takes AdamW's arguments
    (params, lr, betas, eps, weight_decay) and is AdamW by default (`adamw_mode=True`), the
    optimizer LLaVA's zero3_offload.json asks for. It compiles its CPU kernel on first use."""
    if zero_stage(trainer) is None:
        return None
    if not (trainer.deepspeed and trainer.deepspeed.offload_optimizer):
        return None
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError as err:
        raise ConfigError(
            "trainer.deepspeed.offload_optimizer",
            f"optimizer offload needs DeepSpeed's CPU Adam, which does not import: {err}.",
            "`pip install deepspeed`, or set trainer.deepspeed.offload_optimizer=false.",
        ) from err
    return DeepSpeedCPUAdam  # type: ignore[no-any-return]


def deepspeed_strategy_class() -> type:
    """Lightning's DeepSpeedStrategy with atomic checkpoint folders (see the module docstring).

    A class factory so that importing vlmlab never imports Lightning's strategy eagerly."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeed's `engine.save_checkpoint` into `<path>.tmp`, then rank 0 swaps it in.

        Every rank writes its own shard files (`checkpoint/zero_pp_rank_<r>_..._states.pt`);
        DeepSpeed's rank 0 writes `latest` last, then all ranks meet at a barrier. One rank per
        node fsyncs the files (on a shared disk each node flushes what it wrote), and only then
        does rank 0 rename: a crash leaves either the old or the new folder, never half of one.
        """

        def save_checkpoint(
            self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
        ) -> None:
            path = Path(self.broadcast(str(filepath)))
            staged = path.with_name(path.name + ".tmp")
            if self.global_rank == 0:
                checkpoints.remove_path(staged)
            self.barrier("vlmlab-ds-ckpt-clean")

            def write() -> None:
                with deferred_writes(self.deepspeed_engine) as deferred:
                    super(AtomicDeepSpeedStrategy, self).save_checkpoint(
                        checkpoint, str(staged), storage_options
                    )
                deferred.raise_first()
                if self.global_rank == 0:  # the tag DeepSpeed's load reads; last, as it does
                    (staged / "latest").write_text(deferred.tag)
                if self.local_rank == 0:
                    checkpoints.fsync_tree(staged)

            failure = checkpoints.agreed_failure(self, write)
            if failure is not None:  # every rank raises: none waits for another at a barrier
                if self.global_rank == 0:
                    checkpoints.remove_path(staged)
                kept = path if path.exists() else None
                raise checkpoints.write_error(path, failure, kept, "DeepSpeed checkpoint")
            self.barrier("vlmlab-ds-ckpt-written")
            if self.global_rank == 0:
                checkpoints.publish_folder(staged, path)
            self.barrier("vlmlab-ds-ckpt-swapped")

        def remove_checkpoint(self, filepath: Any) -> None:
            if self.global_rank == 0:
                for suffix in ("", ".prev"):
                    checkpoints.remove_path(Path(str(filepath) + suffix))

    return AtomicDeepSpeedStrategy


class DeferredWrites:
    """The file writes of one `engine.save_checkpoint`, their first failure held back.

    Why: DeepSpeed's save meets the other ranks at barriers between its writes (after the
    folder, after each rank's ZeRO file, at the end). A rank whose write raises (disk full, no
    permission) leaves them there, and a later collective of that rank pairs with the wrong
    one: every rank hangs (measured: 2 CPU ranks, rank 1 limited to 1 kB files, hung until
    killed). Held back, the failing rank goes through every barrier; `agreed_failure` then
    makes all ranks raise. `latest` (rank 0, DeepSpeed's last write) is written by the caller
    after the held failures are raised, inside the same agreement.
    """

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.tag = "checkpoint"

    def call(self, write: Any, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            return None  # the checkpoint is lost already: skip the rest of its writes
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as err:
            self.failures.append(err)
            log.error(
                "a DeepSpeed checkpoint write failed (held until every rank is done): %s", err
            )
            return None

    def raise_first(self) -> None:
        if self.failures:
            raise self.failures[0]


@contextlib.contextmanager
def deferred_writes(engine: Any) -> Iterator[DeferredWrites]:
    """`engine`'s checkpoint writes (`checkpoint_engine.save` / `makedirs`, the recovery script)
    held back on failure, and `latest` left to the caller (`DeferredWrites`)."""
    deferred = DeferredWrites()
    files = engine.checkpoint_engine
    save_checkpoint = engine.save_checkpoint

    def without_latest(*args: Any, **kwargs: Any) -> Any:
        deferred.tag = str(kwargs.get("tag") or deferred.tag)
        return save_checkpoint(*args, **{**kwargs, "save_latest": False})

    patches = {
        (files, "save"): functools.partial(deferred.call, files.save),
        (files, "makedirs"): functools.partial(deferred.call, files.makedirs),
        (engine, "_copy_recovery_script"): functools.partial(
            deferred.call, engine._copy_recovery_script
        ),
        (engine, "save_checkpoint"): without_latest,
    }
    missing = object()
    before = {key: vars(key[0]).get(key[1], missing) for key in patches}
    try:
        for (owner, name), patch in patches.items():
            setattr(owner, name, patch)
        yield deferred
    finally:
        for (owner, name), old in before.items():
            if old is missing:
                delattr(owner, name)  # the class's method shows again
            else:
                setattr(owner, name, old)


def deepspeed_strategy(
    config: dict[str, Any], strategy_class: type | None = None, **kwargs: Any
) -> Any:
    """The strategy for trainer.strategy=deepspeed: `L.Trainer(strategy=deepspeed_strategy(zero_config(trainer, batch)))`.

    Checkpoints exclude frozen parameters. Loading them back works because Lightning calls
    `engine.load_checkpoint(load_module_strict=module.strict_loading)` and VLMModule sets
    `strict_loading = False`: the frozen weights come from the model build / init chain, as
    for every other strategy (checked on CPU with real ZeRO-2 and ZeRO-3 engines,
    tests/test_deepspeed.py). The config is copied: Lightning writes precision, accumulation
    and clipping into the dict it gets, and refuses a dict that already has them.
    `strategy_class`: a subclass of `deepspeed_strategy_class()` (the tests' CPU variant).
    """
    cls = strategy_class or deepspeed_strategy_class()
    kwargs.setdefault("exclude_frozen_parameters", True)
    return cls(config=copy.deepcopy(config), **kwargs)
