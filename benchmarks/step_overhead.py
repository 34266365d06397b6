"""Step overhead: vlmlab's Lightning path against a bare PyTorch loop, same model, same batches.

(a) bare: forward (the model called as VLMModule calls it, with collate's index keys), backward,
    gradient clipping at the preset's `trainer.gradient_clip_val`
    (the same update rule), AdamW step, LR-schedule step, zero_grad; nothing else;
(b) vlmlab: the recipe's own pieces (`vlmlab.train`: run context, model, stage policy,
    VLMModule, the stage's default callbacks, the MLflow logger on a SQLite store in a temp
    dir, the atomic checkpoint IO) in a Lightning Trainer of the `cpu` preset.

The batches are collated once by the real DataModule and replayed from memory by both, so data
loading is not part of either. Rounds alternate (a) and (b) (each round: warm-up steps, then
timed steps) and the medians of the per-step times are compared; wall time and CPU time (all
threads of the process) are both printed. End-of-stage work (evaluation, sample answers, the
final save) is not per-step and not timed; a step checkpoint does not fall inside the timed
window (`checkpoint.every_n_steps` is 50).

    python benchmarks/step_overhead.py [--rounds 3] [--steps 20] [--warmup 3] \\
        [--profile FILE] [overrides ...]

`--profile FILE` writes cProfile stats of one vlmlab round (read with `python -m pstats`).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
from torch.utils.data import DataLoader

# A model whose step takes >= ~0.2 s on a CPU core: tiny encoder, a 4-layer 256-wide Llama.
DEFAULTS = [
    "stage=2",
    "stage.init_from=null",
    "stage.evaluate=false",
    "logger.samples=0",
    "llm.config.hidden_size=256",
    "llm.config.intermediate_size=768",
    "llm.config.num_attention_heads=8",
    "llm.config.num_key_value_heads=8",
    "data=tiny",
    "data.batch_size=8",
    "stage.global_batch_size=8",
]


class Clock:
    """Wall and process CPU time between two marks."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start: tuple[float, float] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self, steps: int) -> None:
        assert self._start is not None
        self.wall.append((time.perf_counter() - self._start[0]) / steps)
        self.cpu.append((time.process_time() - self._start[1]) / steps)


class TimeSteps(L.Callback):
    """Starts the clock when batch `warmup` begins, stops it when the last batch has ended."""

    def __init__(self, clock: Clock, warmup: int, steps: int) -> None:
        self.clock, self.warmup, self.steps = clock, warmup, steps

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.clock.start()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup + self.steps:
            self.clock.stop(self.steps)


def _replay(batch: Any) -> Any:
    return batch


def collated_batches(datamodule: Any, count: int) -> list[dict[str, Any]]:
    """`count` batches of the stage's real DataModule (repeated if the epoch is shorter)."""
    batches: list[dict[str, Any]] = []
    while len(batches) < count:
        batches += [b for b in datamodule.train_dataloader() if b["input_ids"].shape[0] > 0]
    return batches[:count]


def bare_round(
    model: Any, batches: list[dict[str, Any]], cfg: Any, clock: Clock, warmup: int
) -> None:
    """(a): the minimal loop computing the same update (clipped AdamW, LR schedule)."""
    from vlmlab.training.module import _COLLATED_EXTRAS, lr_lambda

    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg.stage.optim
    optimizer = torch.optim.AdamW(
        params, lr=float(optim.lr), weight_decay=float(optim.weight_decay)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, len(batches), "cosine"))
    clip = float(cfg.trainer.gradient_clip_val or 0.0)
    model.train()
    for i, batch in enumerate(batches):
        if i == warmup:
            clock.start()
        extra = {k: batch[k] for k in _COLLATED_EXTRAS if k in batch}  # the model's contract
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            **extra,
        )
        out.loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    clock.stop(len(batches) - warmup)


def vlmlab_round(
    cfg: Any,
    pieces: dict[str, Any],
    batches: list[dict[str, Any]],
    clock: Clock,
    warmup: int,
    progress_bar: bool = True,
) -> None:
    """(b): what `vlmlab.train._train` builds around the model, fit on the replayed batches."""
    from vlmlab import checkpoints, launch
    from vlmlab.train import (
        accumulation,
        build_callbacks,
        callback_settings,
        identity_config,
        training_module,
    )

    ctx, model, plan, start, data, logger = (
        pieces[k] for k in ("ctx", "model", "plan", "start", "data", "logger")
    )
    module = training_module(cfg, ctx, model, plan, start, data, logger)
    stage_callbacks = build_callbacks(
        callback_settings(cfg, ctx, logger), model, data.text_encoder, data.dataset
    )
    steps = len(batches) - warmup
    trainer_args = {**ctx.trainer_args, "max_steps": len(batches)}
    if not progress_bar:
        trainer_args["enable_progress_bar"] = False
    trainer = L.Trainer(
        **trainer_args,
        max_epochs=1,
        accumulate_grad_batches=accumulation(cfg, ctx.trainer),
        logger=logger,
        callbacks=[*stage_callbacks.callbacks, TimeSteps(clock, warmup, steps)],
        plugins=[
            checkpoints.atomic_checkpoint_io(
                bool(cfg.checkpoint.keep_previous),
                checkpoints.CheckpointIdentity.of(identity_config(cfg)),
            )
        ],
        default_root_dir=str(launch.lightning_root(ctx.resume_dir)),
    )
    loader = DataLoader(batches, batch_size=None, collate_fn=_replay)  # type: ignore[arg-type]
    trainer.fit(module, train_dataloaders=loader)


def build(overrides: list[str], root: Path) -> tuple[Any, dict[str, Any]]:
    from vlmlab.config import compose
    from vlmlab.train import build_model, run_context, stage_data, start_and_policy, start_logger

    cfg = compose([f"paths.root={root}", f"data.root={root / 'data'}", *DEFAULTS, *overrides])
    ctx = run_context(cfg)
    model, tokenizer = build_model(cfg)
    start, plan = start_and_policy(cfg, ctx, model)
    data = stage_data(cfg, ctx, model, tokenizer)
    data.datamodule.prepare_data()
    logger = start_logger(cfg, ctx, data)
    return cfg, {
        "ctx": ctx,
        "model": model,
        "plan": plan,
        "start": start,
        "data": data,
        "logger": logger,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", type=Path, help="cProfile stats of one vlmlab round")
    parser.add_argument("overrides", nargs="*", help="config overrides (train.py syntax)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "vlmlab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="vlmlab-step-"))
    cfg, pieces = build(args.overrides, root)
    batches = collated_batches(pieces["data"].datamodule, args.warmup + args.steps)
    model = pieces["model"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
        f"({trainable / 1e6:.1f} M trainable, stage {cfg.stage.name}); batch "
        f"{cfg.data.batch_size}, {tokens:.0f} tokens per batch; {args.threads} thread(s); "
        f"MLflow store {pieces['ctx'].store_uri}"
    )
    bar = bool(cfg.trainer.enable_progress_bar)
    clocks = {"bare": Clock(), "vlmlab": Clock()}
    if bar:  # the preset shows Lightning's progress bar; its cost, measured apart
        clocks["vlmlab, no progress bar"] = Clock()
    for r in range(args.rounds):
        bare_round(model, batches, cfg, clocks["bare"], args.warmup)
        if args.profile is not None and r == args.rounds - 1:
            with cProfile.Profile() as profile:
                vlmlab_round(cfg, pieces, batches, clocks["vlmlab"], args.warmup)
            profile.dump_stats(str(args.profile))
        else:
            vlmlab_round(cfg, pieces, batches, clocks["vlmlab"], args.warmup)
        if bar:
            clock = clocks["vlmlab, no progress bar"]
            vlmlab_round(cfg, pieces, batches, clock, args.warmup, progress_bar=False)
        print(
            f"round {r + 1}: "
            + ", ".join(
                f"{name} {c.wall[-1] * 1e3:.1f} ms/step (CPU {c.cpu[-1] * 1e3:.1f})"
                for name, c in clocks.items()
            )
        )
    for kind in ("wall", "cpu"):
        base = statistics.median(getattr(clocks["bare"], kind))
        print(f"median {kind} time per step: bare {base * 1e3:.1f} ms")
        for name, c in list(clocks.items())[1:]:
            mine = statistics.median(getattr(c, kind))
            print(f"  {name}: {mine * 1e3:.1f} ms, overhead {100 * (mine / base - 1):+.1f} %")
    print("target: overhead <= 3 % on a step of >= ~0.2 s")
    from vlmlab.tracking.journal import close_logger

    close_logger(pieces["logger"])


if __name__ == "__main__":
    main()
