"""Run by tests/test_streaming.py: a real 2-rank CPU DDP fit that records what each rank trains.

    python tests/streaming_ddp.py <shard_dir> <out_dir>

Lightning relaunches this script for rank 1. Each rank writes out_dir/rank<r>.json:
{epoch: {"ids": [...], "batches": n, "empty": n, "text_only": n}, "finished_epochs": k}.
Empty (all-bad) and text-only batches are the two that break DDP when one rank skips backward
or leaves the connector without a gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L


class Recorder(L.Callback):
    """Sample ids of every batch this rank trains, per epoch."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.epochs: dict[int, dict[str, Any]] = defaultdict(lambda: {"ids": [], "batches": 0})
        self.finished = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        record = self.epochs[trainer.current_epoch]
        record["ids"] += list(batch["ids"])
        record["batches"] += 1
        record["empty"] = record.get("empty", 0) + int(not batch["ids"])
        text_only = bool(batch["ids"]) and batch["pixel_values"] is None
        record["text_only"] = record.get("text_only", 0) + int(text_only)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.finished += 1
        data = {str(k): v for k, v in self.epochs.items()} | {"finished_epochs": self.finished}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


def fit(
    location: Path | str, out_dir: Path, callbacks: list[L.Callback], epochs: int, **data: Any
) -> None:
    """A 2-rank CPU DDP fit of the tiny stage-2 model on the shards at `location` (a folder or
    a URL), batch 4 per rank, 2 workers; `data` adds VLMDataModule arguments (e.g. `fetch`)."""
    from vlmlab import stages
    from vlmlab.config import compose
    from vlmlab.data.datamodule import StreamPosition, VLMDataModule
    from vlmlab.data.tokenize import TextEncoder
    from vlmlab.models import as_dict, build_vlm
    from vlmlab.training.module import VLMModule

    cfg = compose([f"paths.root={out_dir}", "stage=2", "stage.init_from=null"])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    plan = stages.apply(cfg.stage, model)
    text_encoder = TextEncoder.for_model(model, tokenizer, str(cfg.stage.template), 256)
    datamodule = VLMDataModule(
        location,
        text_encoder,
        model.encoder.image_transform,
        batch_size=4,
        num_workers=2,
        shuffle_buffer=4,
        seed=0,
        **data,
    )
    total_steps = epochs * datamodule.batches_per_epoch(2)
    module = VLMModule(model, as_dict(cfg.stage.optim), total_steps, groups=plan.groups)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StreamPosition(), *callbacks],
        default_root_dir=str(out_dir),
    )
    trainer.fit(module, datamodule=datamodule)


def run_script(script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo root (Lightning relaunches it for rank 1)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, script, *args]
    return subprocess.run(
        command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )


def main(shard_dir: Path, out_dir: Path) -> None:
    fit(shard_dir, out_dir, [Recorder(out_dir)], epochs=2)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
