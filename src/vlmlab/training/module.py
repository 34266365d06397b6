"""VLMModule: loss, optimizer and schedule around a VisionLanguageModel.

It never saves hyperparameters (that would deep-copy a 7B model); the run's config is
logged by the tracking layer instead.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import lightning as L
import torch


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
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
    def __init__(self, model: torch.nn.Module, optim: dict[str, Any], total_steps: int) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.total_steps = max(1, total_steps)
        self.skipped: Counter[str] = Counter()
        if optim.get("schedule", "cosine") not in ("cosine", "constant"):
            from vlmlab.errors import ConfigError

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

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=float(self.optim["lr"]),
            weight_decay=float(self.optim.get("weight_decay", 0.0)),
            betas=tuple(self.optim.get("betas", (0.9, 0.999))),
        )
        warmup = math.ceil(float(self.optim.get("warmup_ratio", 0.0)) * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(warmup, self.total_steps, self.optim.get("schedule", "cosine"))
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
