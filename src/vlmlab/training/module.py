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
    ) -> None:
        super().__init__()
        self.model = model
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
        if batch_size == 0:
            return None
        out = self(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        self.log(
            "train/target_tokens",
            float(out.num_target_tokens),
            batch_size=batch_size,
            reduce_fx="sum",
        )
        return out.loss

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        new = batch.get("skipped") or {}
        if not new:
            return
        self.skipped.update(new)
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
