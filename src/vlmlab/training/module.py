"""VLMModule: loss, optimizer and schedule around a VisionLanguageModel.

It never saves hyperparameters (that would deep-copy a 7B model); the run's config is logged
by the tracking layer. Lightning checkpoints keep only trainable weights (plus optimizer,
scheduler and loop state), so resuming a stage-1 run of a 7B model reads megabytes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from vlmlab.errors import ConfigError


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
        model: torch.nn.Module,
        optim: dict[str, Any],
        total_steps: int,
        groups: list[dict[str, Any]] | None = None,
        extra_state: dict[str, Any] | None = None,
        parallelize: Callable[[torch.nn.Module, Any], None] | None = None,
        global_token_loss: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.parallelize = parallelize  # trainer=fsdp: shards the model in configure_model
        self.global_token_loss = global_token_loss
        self._step_tokens = 0  # target tokens / summed token losses of this optimizer step
        self._step_loss_sum: torch.Tensor | float = 0.0
        self._step_pending = False
        self.last_step_loss: float | None = None  # global token-mean loss of the last step
        self.optim = optim
        self.total_steps = max(1, total_steps)
        self.groups = groups
        self.extra_state = extra_state or {}
        self.skipped: Counter[str] = Counter()
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
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            labels=batch["labels"],
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._count_skipped(batch)
        batch_size = batch["input_ids"].shape[0]
        if batch_size == 0:  # every sample of the batch was bad (counted above)
            return self._empty_step_loss()
        out = self(batch)  # a text-only batch still touches the vision branch (VLM._vision_anchor)
        if not self.global_token_loss:
            self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        if "padding_fraction" in batch:
            self.log(
                "data/padding_fraction", float(batch["padding_fraction"]), batch_size=batch_size
            )
        self.log(
            "train/target_tokens",
            float(out.num_target_tokens),
            batch_size=batch_size,
            reduce_fx="sum",
        )
        if not self.global_token_loss:
            return out.loss
        # Sum of token losses; on_after_backward divides the step's gradient by the number of
        # target tokens of the whole global batch (all ranks, all micro-batches).
        self._step_tokens += out.num_target_tokens
        self._step_loss_sum = (
            self._step_loss_sum + out.loss.detach().double() * out.num_target_tokens
        )
        self._step_pending = True
        return out.loss * out.num_target_tokens

    def on_after_backward(self) -> None:
        if self.global_token_loss and not self.trainer.fit_loop._should_accumulate():
            self._normalize_step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.global_token_loss and self._step_pending:  # the step's last batch was empty
            self._normalize_step()

    def _normalize_step(self) -> None:
        """grad = sum of token-loss gradients / global target tokens, on any world size.

        Lightning divides each micro-batch loss by accumulate_grad_batches and DDP / FSDP average
        over ranks; multiplying by (accumulation x world size / global tokens) makes the step the
        gradient of the global token-mean loss, the same number whatever the split (a per-micro-
        batch mean would weight tokens of short batches more: the gradient-accumulation bug).
        """
        loss_sum = torch.as_tensor(self._step_loss_sum, dtype=torch.float64, device=self.device)
        stats = torch.stack([loss_sum.new_tensor(float(self._step_tokens)), loss_sum])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        tokens, total = float(stats[0]), float(stats[1])
        self._step_tokens, self._step_loss_sum, self._step_pending = 0, 0.0, False
        if tokens <= 0:
            return
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        self.last_step_loss = total / tokens
        self.log("train/loss", self.last_step_loss, prog_bar=True, on_step=True, on_epoch=False)

    def _empty_step_loss(self) -> torch.Tensor | None:
        """None skips the step on one process; under DDP every rank must run backward (the
        gradient all-reduce is collective), so an empty batch gives a zero loss through every
        trainable parameter: zero gradients, same number of steps on every rank."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        return self._ddp_zero_link()

    def _ddp_zero_link(self) -> torch.Tensor | float:
        """0 x (sum of trainable parameters) under DDP, 0.0 otherwise.

        DDP (find_unused_parameters=False) fails when a trainable parameter gets no gradient,
        which an all-bad (empty) batch does to every parameter; this adds zero gradients instead.
        Not for FSDP: sharded parameters only take part in collectives through the forward.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return 0.0
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        self.skipped.update(batch.get("skipped") or {})
        # logged every batch once anything was skipped: a batch that is not a logging step
        # (accumulation, log_every_n_steps) must not lose the count
        for reason, count in self.skipped.items():
            self.log(f"data/skipped/{reason}", float(count), reduce_fx="max")

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
        optimizer = torch.optim.AdamW(
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
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
        checkpoint["vlmlab"] = {
            **self.extra_state,
            "skipped": dict(self.skipped),
            "rng": _rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("vlmlab", {})
        self.skipped = Counter(state.get("skipped", {}))
        self._pending_rng = state.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the random state where the interrupted run stood (dropout, LoRA dropout),
        # after Lightning has rebuilt the loaders, which draw from the global generator.
        pending = getattr(self, "_pending_rng", None)
        if pending is not None:
            _set_rng_state(pending)
            self._pending_rng = None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
