"""VLMModule: loss, optimizer and schedule around a VisionLanguageModel.

It never saves hyperparameters (that would deep-copy a 7B model); the run's config is logged
by the tracking layer. Lightning checkpoints keep only trainable weights (plus optimizer,
scheduler and loop state), so resuming a stage-1 run of a 7B model reads megabytes.

No host synchronisation per micro-batch: counts arrive as Python ints from collate, losses stay
on the device, and the one collective of an optimizer step (token count, loss sum, padding) is
issued once, after the step's last backward, without a barrier.

Numerical guards (training/guards.py): before each optimizer step every rank contributes one
flag (its loss or gradient norm is not finite) to a small all-reduce, read on the host once per
optimizer step; when any rank's is set, all ranks skip the step together.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision

from vlmlab.errors import ConfigError
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.training.guards import (
    NonFiniteError,
    NonFiniteGuard,
    check_fail_after,
    nonfinite_flag,
    nonfinite_weights,
    step_gradients,
)

log = logging.getLogger(__name__)

# Batch keys from `collate` that the VLM forward takes when present: counted / indexed on the
# CPU there, so the forward needs no host sync of its own. `image_sizes` ((width, height) per
# image) lays out AnyRes tiles; a pad model ignores it.
_COLLATED_EXTRAS = (
    "target_index",
    "num_target_tokens",
    "image_index",
    "image_tokens",
    "ids",
    "image_sizes",
    "position_ids",  # packed rows (data.packing): the segments, see VisionLanguageModel
    "cu_seq_lens",
    "max_seqlen",
)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to zero (LLaVA) or constant."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class VLMModule(L.LightningModule):
    def __init__(
        self,
        model: VisionLanguageModel,
        optim: dict[str, Any],
        total_steps: int,
        groups: list[dict[str, Any]] | None = None,
        extra_state: dict[str, Any] | None = None,
        parallelize: Callable[[torch.nn.Module, Any], None] | None = None,
        global_token_loss: bool = True,
        sharded: bool = False,
        optimizer_cls: Callable[..., torch.optim.Optimizer] | None = None,
        fail_after_nonfinite_steps: int = 3,
    ) -> None:
        """`sharded`: FSDP / ZeRO-3, where every forward must run the whole model (vision branch
        included) so that the parameter all-gathers of all ranks stay in step. `optimizer_cls`:
        AdamW by default (DeepSpeed's CPU Adam for ZeRO-Offload), called with the same arguments.
        `fail_after_nonfinite_steps`: non-finite optimizer steps in a row that fail the run
        (each one is skipped; trainer.fail_after_nonfinite_steps)."""
        super().__init__()
        self.model = model
        self.model.sharded = sharded
        self.parallelize = parallelize  # trainer=fsdp: shards the model in configure_model
        self.global_token_loss = global_token_loss
        self.optimizer_cls = optimizer_cls or torch.optim.AdamW
        # this rank's share of the current optimizer step (Python numbers: no device sync)
        self._step_tokens = 0  # target tokens
        self._step_pad = 0  # padded positions and all positions, for data/padding_fraction
        self._step_slots = 0
        self._step_rows = [0, 0]  # samples and rows (data.packing: several samples per row)
        self._step_loss_sum: torch.Tensor | None = None  # sum of token losses, on the device
        self._step_pending = False
        self._step_total: torch.Tensor | None = None  # all-reduced loss sum of the step
        self._step_empty: torch.Tensor | None = None  # no target token on any rank (all-bad)
        self.empty_steps = 0  # all-bad optimizer steps skipped since the run began
        self._step_ids: list[str] = []  # this rank's sample ids of the step (for the guard)
        # the step's pre-clip gradient norm when `owns_grad_norm` (a device tensor), for GradNorm
        self.grad_norm: torch.Tensor | None = None
        self._clip_norm: torch.Tensor | None = None  # the same, until clipping used it
        self.nonfinite = NonFiniteGuard(check_fail_after(fail_after_nonfinite_steps))
        # global token-mean loss of the last step: a device tensor (read it with float())
        self.last_step_loss: torch.Tensor | None = None
        self.writes_step_metrics = True  # see _writes_step_metrics; read by GradNorm too
        self.optim = optim
        self.total_steps = max(1, total_steps)
        self.groups = groups
        self.extra_state = extra_state or {}
        self.skipped: Counter[str] = Counter()  # this rank's bad samples, since the run began
        self._pending_rng: dict[str, Any] | None = None
        self._gradient_sync: bool | None = None
        self.strict_loading = False  # checkpoints hold trainable weights only
        if optim.get("schedule", "cosine") not in ("cosine", "constant"):
            raise ConfigError(
                "stage.optim.schedule", f"got {optim.get('schedule')!r}.", "use cosine or constant."
            )

    def configure_model(self) -> None:
        # ModelParallelStrategy sets the mesh; every other strategy leaves the model alone.
        sharded = getattr(self, "_sharded", False)
        if self.parallelize is not None and self.device_mesh is not None and not sharded:
            self.parallelize(self, self.device_mesh)
            self._sharded = True

    def forward(self, batch: dict[str, Any]) -> Any:
        extra = {k: batch[k] for k in _COLLATED_EXTRAS if k in batch}
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            labels=batch["labels"],
            **extra,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._set_gradient_sync()
        self.skipped.update(batch.get("skipped") or {})
        self._step_pad += int(batch.get("num_pad_tokens", 0))  # Python ints from collate
        self._step_slots += int(batch.get("num_tokens", 0))
        self._step_rows[0] += len(batch.get("ids") or ())
        self._step_rows[1] += int(batch["input_ids"].shape[0])
        self._step_pending = True
        self._step_ids.extend(str(i) for i in batch.get("ids") or ())
        batch_size = batch["input_ids"].shape[0]
        if batch_size == 0:  # every sample of the batch was bad (counted above)
            return self._empty_step_loss()
        out = self(batch)  # a text-only batch still touches the vision branch (VLM._vision_anchor)
        if not self.global_token_loss:
            self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=batch_size)
        tokens = out.num_target_tokens  # a Python int (counted in collate)
        self._step_tokens += tokens
        loss_sum = out.loss.detach().double() * tokens
        self._step_loss_sum = (
            loss_sum if self._step_loss_sum is None else self._step_loss_sum + loss_sum
        )
        if not self.global_token_loss:
            return out.loss
        # Sum of token losses; _finish_step divides the step's gradient by the number of
        # target tokens of the whole global batch (all ranks, all micro-batches).
        return out.loss * tokens

    def on_after_backward(self) -> None:
        if not self.trainer.fit_loop._should_accumulate():
            self._finish_step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # one process, the step's last batch empty: its backward was skipped (training_step
        # returned None), so on_after_backward did not close the step
        if self._step_pending and not self.trainer.fit_loop._should_accumulate():
            self._finish_step()
        self._guard_step(optimizer)

    def _guard_step(self, optimizer: Any = None) -> None:
        """Skip this optimizer step on every rank when any rank's loss or gradient norm is not
        finite: gradients become None, so AdamW changes no weight and no state (its step count
        included); clipping sees no gradient. Lightning still counts the step and steps the LR
        scheduler: schedule, global step and data position stay in lockstep for resume.

        Module hooks run after the callbacks' `on_before_optimizer_step` (GradNorm logs the bad
        norm first) and before Lightning clips. Under DeepSpeed the engine owns the gradients
        and its step cannot be skipped from here: the step is counted and K in a row fail.

        A step with no target token on any rank (every sample bad) is skipped the same way and
        counted in `train/skipped_empty`: its zero gradients would still let AdamW move weights.
        """
        total, self._step_total = self._step_total, None
        empty, self._step_empty = self._step_empty, None
        ids, self._step_ids = self._step_ids, []
        grads, norm = step_gradients(optimizer, self.parameters(), self.owns_grad_norm)
        self.grad_norm = self._clip_norm = norm  # pre-clip; a skipped step clips nothing
        flag = nonfinite_flag(total, grads, norm).to(self.device).reshape(1)
        if empty is not None:  # the same on every rank: summed, it stays non-zero when set
            flag = torch.cat([flag, empty.to(flag.dtype).reshape(1)])
        verdict = _all_reduce_sum(flag).tolist()  # the one host read of the guard
        bad, all_bad = verdict[0] > 0, len(verdict) > 1 and verdict[1] > 0
        step = self.trainer.global_step
        if bad or all_bad:
            self._clip_norm = None
            for param in self.parameters():
                param.grad = None
        if bad:
            step_ids = [i for rank_ids in _gather_objects(ids) for i in rank_ids]
            self.nonfinite.record(step, True, step_ids)  # raises at the K-th in a row
        elif all_bad:
            # no valid sample on any rank: the gradients are exact zeros, but AdamW would still
            # move the weights (momentum, decay), so the step is skipped, not taken with zeros;
            # it neither extends nor ends a non-finite streak
            self.empty_steps += 1
            log.warning("step %d skipped: no rank had a valid sample (see data/skipped/*)", step)
        else:
            self.nonfinite.record(step, False, [])
        if not (self.writes_step_metrics or bad or all_bad):
            return
        for name, count in (("nonfinite", self.nonfinite.total), ("empty", self.empty_steps)):
            self.log(
                f"train/skipped_{name}",
                float(count),
                on_step=True,
                on_epoch=False,
                reduce_fx="max",
                batch_size=1,
            )

    @property
    def owns_grad_norm(self) -> bool:
        """Whether the guard's norm is the global pre-clip gradient norm (plain gradients: one
        process or DDP), so `GradNorm` logs `grad_norm` and clipping reuses it."""
        return not self.model.sharded

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the norm the guard computed (`step_gradients`): what `clip_grad_norm_` does,
        minus its own pass over the gradients. Another precision plugin's or algorithm's
        clipping goes through Lightning as before."""
        norm, self._clip_norm = self._clip_norm, None
        plugin = type(self.trainer.precision_plugin)
        if (
            norm is not None
            and gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and plugin.clip_grad_by_norm is Precision.clip_grad_by_norm
            and plugin.main_params is Precision.main_params
        ):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), norm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _set_gradient_sync(self) -> None:
        """FSDP2: reduce-scatter gradients on the step's last micro-batch only.

        Lightning blocks gradient sync during accumulation for DDP alone; an FSDP2 root would
        reduce-scatter after every micro-batch (accumulation x the communication). Unsynced
        micro-batches accumulate unsharded gradients that the last backward reduces with its own.
        """
        if not _is_fsdp2(self) or self._trainer is None:
            return
        sync = not self.trainer.fit_loop._should_accumulate()
        if sync != self._gradient_sync:
            self.set_requires_gradient_sync(sync)  # type: ignore[operator]
            self._gradient_sync = sync

    def _finish_step(self) -> None:
        """Once per optimizer step on every rank: one all-reduce, gradient scaling, logging.

        grad = sum of token-loss gradients / global target tokens, on any world size.
        Lightning divides each micro-batch loss by accumulate_grad_batches and DDP / FSDP average
        over ranks; multiplying by (accumulation x world size / global tokens) makes the step the
        gradient of the global token-mean loss, the same number whatever the split (a per-micro-
        batch mean would weight tokens of short batches more: the gradient-accumulation bug).
        The counts logged here (target tokens, padding) are global too.
        """
        device = self.device
        counts = torch.tensor(
            [self._step_tokens, self._step_pad, self._step_slots, *self._step_rows],
            dtype=torch.float64,
        ).to(device, non_blocking=True)  # pageable host memory: staged, no device sync
        loss_sum = self._step_loss_sum
        if loss_sum is None:
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        stats = _all_reduce_sum(torch.cat([counts, loss_sum.to(device).reshape(1)]))
        self._step_tokens, self._step_pad, self._step_slots = 0, 0, 0
        self._step_rows = [0, 0]
        self._step_loss_sum, self._step_pending = None, False
        tokens, pad, slots, samples, rows, total = stats.unbind()
        self._step_total = total  # NaN / inf on every rank when any rank's loss was
        self._step_empty = tokens == 0
        self.writes_step_metrics = self._writes_step_metrics()
        if self.writes_step_metrics:
            self.log("train/target_tokens", tokens, on_step=True, on_epoch=False, batch_size=1)
            padding = pad / slots.clamp_min(1)
            self.log("data/padding_fraction", padding, on_step=True, on_epoch=False, batch_size=1)
            per_row = samples / rows.clamp_min(1)  # 1 without packing
            self.log("data/samples_per_row", per_row, on_step=True, on_epoch=False, batch_size=1)
        if self.global_token_loss:
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
            _scale_gradients(self.parameters(), (scale / tokens.clamp_min(1)).float())
            # NaN when no rank had a target token (every sample of the step was bad)
            loss = torch.where(tokens > 0, total / tokens.clamp_min(1), torch.nan)
            self.last_step_loss = loss
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if self._is_logging_step():
            self._log_skipped()

    def _is_logging_step(self) -> bool:
        """The step whose metrics Lightning writes (same on every rank: no collective mismatch)."""
        every = int(getattr(self.trainer, "log_every_n_steps", 0) or 0)
        stepped = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        return every > 0 and (stepped + 1) % every == 0

    def _writes_step_metrics(self) -> bool:
        """Whether this step's per-step metrics are worth a `self.log`: on the steps Lightning
        writes to the logger, and on an epoch's or the run's last step (what
        `trainer.callback_metrics`, the stage's summary, ends with).

        Why: each `self.log` costs Lightning's result bookkeeping (a recursive `.to(device)` of the
        metric's state, about 0.3 ms on CPU); six of them on every step were about 1 % of a
        0.25 s step (benchmarks/step_overhead.py), for values Lightning then drops on the steps
        it does not write (`trainer.log_every_n_steps`). `train/loss` stays on every step (the
        progress bar shows it)."""
        trainer = self.trainer
        if self._is_logging_step() or trainer.should_stop or trainer.is_last_batch:
            return True
        max_steps = int(trainer.max_steps or -1)
        return max_steps > 0 and trainer.global_step + 1 >= max_steps

    def _log_skipped(self) -> None:
        """`data/skipped/<reason>` summed over ranks, since the run began.

        Reasons are open-ended strings, so the counters are gathered as objects, only on
        logging steps (a host sync there, where Lightning syncs its metrics anyway)."""
        total: Counter[str] = Counter()
        for counts in _gather_objects(dict(self.skipped)):
            total.update(counts)
        for reason, count in sorted(total.items()):
            self.log(f"data/skipped/{reason}", float(count), reduce_fx="max", batch_size=1)

    def _empty_step_loss(self) -> torch.Tensor | None:
        """None skips the step on one process. With several ranks (or FSDP, whose unsynced
        micro-batches wait in unsharded buffers for a backward), every rank must run forward and
        backward: an empty batch gives 0 x a real forward on a dummy one-token batch."""
        if self._trainer is None:
            return None
        if self.trainer.world_size == 1 and not _is_fsdp2(self):
            return None
        return self._zero_forward_loss()

    def _zero_forward_loss(self) -> torch.Tensor:
        """0 x (sum of the outputs of a forward on one text token, no labels).

        Why a forward and not 0 x (sum of the parameters): under FSDP and ZeRO-3 parameters are
        sharded and join the other ranks' all-gathers only inside the forward (and reduce-
        scatters only in its backward); through `self(...)` (the LightningModule is the FSDP
        root) and with `model.sharded` the vision branch runs too. Every trainable parameter the
        forward reaches gets an exact zero gradient, which is what DDP needs as well.
        """
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        dummy = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": None}
        out = self(dummy)
        parts = [t for t in (out.logits, out.loss) if isinstance(t, torch.Tensor)]
        return torch.stack([t.float().sum() for t in parts]).sum() * 0.0

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups from the stage plan (per-module lr / weight decay)."""
        params = dict(self.model.named_parameters())
        if not self.groups:
            trainable = [p for p in params.values() if p.requires_grad]
            return [{"name": "default", "params": trainable, "lr": float(self.optim["lr"])}]
        return [
            {
                "name": g["name"],
                "params": [params[n] for n in g["params"]],
                "lr": g["lr"],
                "weight_decay": g["weight_decay"],
            }
            for g in self.groups
        ]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_cls(
            self.param_groups(),
            lr=float(self.optim["lr"]),
            weight_decay=float(self.optim.get("weight_decay", 0.0)),
            betas=tuple(self.optim.get("betas", (0.9, 0.999))),
            eps=float(self.optim.get("eps", 1e-8)),
        )
        warmup = math.ceil(float(self.optim.get("warmup_ratio", 0.0)) * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(warmup, self.total_steps, self.optim.get("schedule", "cosine"))
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank calls this (Lightning's save is collective): each rank's random state and
        bad-sample counts are gathered into `per_rank`, indexed by global rank."""
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if _all_reduce_sum(nonfinite_weights(weights).to(self.device).reshape(1)).item() > 0:
            # the previous checkpoint stays the resume point (every rank raises together)
            raise NonFiniteError(
                f"trainable weights are not finite at step {checkpoint.get('global_step')}: this "
                "checkpoint is not written; the previous one stays the resume point."
            )
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
        per_rank = _gather_objects({"rng": _rng_state(self.device), "skipped": dict(self.skipped)})
        total: Counter[str] = Counter()
        for entry in per_rank:
            total.update(entry["skipped"])
        checkpoint["vlmlab"] = {
            **self.extra_state,
            "skipped": dict(total),  # all ranks
            "per_rank": per_rank,
            "nonfinite": self.nonfinite.state_dict(),  # the same on every rank
            "empty_steps": self.empty_steps,  # the same on every rank
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("vlmlab", {})
        self.nonfinite.load_state_dict(state.get("nonfinite") or {})
        self.empty_steps = int(state.get("empty_steps", 0))
        rank = self.global_rank
        world = self.trainer.world_size if self._trainer is not None else 1
        per_rank = state.get("per_rank")
        if per_rank is None:  # written before per-rank state: rank 0's RNG and counts only
            per_rank = [{"rng": state.get("rng"), "skipped": state.get("skipped", {})}]
        if len(per_rank) == world:
            mine = per_rank[rank]
            self.skipped = Counter(mine.get("skipped") or {})
        else:
            log.warning(
                "the checkpoint holds the random state of %d rank(s), this run has %d: ranks "
                "beyond the saved ones keep their fresh seed (dropout streams differ from an "
                "uninterrupted run)",
                len(per_rank),
                world,
            )
            mine = per_rank[rank] if rank < len(per_rank) else {}
            total: Counter[str] = Counter()
            for entry in per_rank:
                total.update(entry.get("skipped") or {})
            self.skipped = total if rank == 0 else Counter()  # the global sum is kept
        self._pending_rng = mine.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the random state where the interrupted run stood (dropout, LoRA dropout),
        # after Lightning has rebuilt the loaders, which draw from the global generator.
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng, self.device)
            self._pending_rng = None


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. Not strategy.reduce: Lightning's puts a barrier first, which
    under NCCL blocks the host until the device has caught up."""
    if _distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in one process."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _scale_gradients(params: Any, scale: torch.Tensor) -> None:
    """grad *= scale for every gradient: one foreach kernel per (kind, device, dtype) group,
    DTensor (FSDP2) shards included; `scale` is a 0-dim fp32 tensor, never read on the host."""
    groups: defaultdict[tuple[type, torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(
        list
    )
    for param in params:
        grad = param.grad
        if grad is not None:
            groups[(type(grad), grad.device, grad.dtype)].append(grad)
    for (_, device, _), grads in groups.items():
        # CPU-offloaded gradients: the factor follows them (a copy, not a sync per parameter)
        factor = scale if scale.device == device else scale.to(device)
        torch._foreach_mul_(grads, factor)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: torch CPU, the current CUDA device, `random`, numpy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with the stack
        return state
    numpy_state = cast(tuple[str, Any, int, int, float], np.random.get_state(legacy=True))
    name, keys, pos, has_gauss, cached = numpy_state
    state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
