"""Lightning callbacks that feed the tracking layer: grad norm, rank check, and the logging of
what evaluation callbacks returned (benchmark metrics, sample answers). Nothing here imports
`vlmlab.eval`: results are read by attribute."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class GradNorm(L.Callback):
    """Log `train/grad_norm`: total L2 norm of the trainable gradients, before clipping.

    Why: clipping hides exploding gradients from the loss curve; the pre-clip norm shows them.
    Lightning calls `on_before_optimizer_step` after unscaling and before `gradient_clip_val`.

    Under DeepSpeed `p.grad` is empty (ZeRO-1/2/3 reduce gradients into their own partitioned
    buffers), so a norm of `p.grad` would be a wrong 0. DeepSpeed computes the global pre-clip
    norm inside `engine.step()`, which Lightning calls *after* `on_before_optimizer_step`; it
    is read in `on_train_batch_end` of each batch that stepped (`get_global_grad_norm()`,
    cached until the next step). Where DeepSpeed gives none (ZeRO-1/2 with
    `compute_grad_norm: false`) nothing is logged, with one warning.
    """

    def __init__(self) -> None:
        self._step_seen = -1
        self._warned = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step  # a resumed run starts past 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if _is_deepspeed(trainer):
            return  # read from the engine after its step, see on_train_batch_end
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        # every rank calls this: under FSDP the gradients are DTensor shards and the norm of
        # the whole model needs their all-reduce (`full_tensor`)
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        pl_module.log("train/grad_norm", float(total), on_step=True, on_epoch=False)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not _is_deepspeed(trainer) or trainer.global_step == self._step_seen:
            return  # not DeepSpeed, or a micro-batch that only accumulated
        self._step_seen = trainer.global_step
        norm = trainer.strategy.deepspeed_engine.get_global_grad_norm()  # type: ignore[attr-defined]
        if norm is None:
            if not self._warned:
                log.warning(
                    "train/grad_norm is not logged: DeepSpeed computed no gradient norm "
                    "(zero_optimization.compute_grad_norm is off)"
                )
                self._warned = True
            return
        value = float(norm)
        if math.isfinite(value):  # inf/nan: an fp16 overflow step that DeepSpeed skipped
            pl_module.log("train/grad_norm", value, on_step=True, on_epoch=False)


def _is_deepspeed(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(trainer.strategy, DeepSpeedStrategy)


class LogSamples(L.Callback):
    """Log the answers a sample callback returned (`rows`, e.g. eval.callback.SampleAnswers)
    with their images under `samples/` of the MLflow run: `samples.md`, PNGs, `samples.json`.
    Placed after that callback, so its `on_train_end` ran first."""

    def __init__(self, answers: Any) -> None:
        self.answers = answers  # has `rows`, `step` and `image_root` after fit

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows: list[dict[str, Any]] = getattr(self.answers, "rows", [])
        runs = mlflow_runs(trainer)
        if not trainer.is_global_zero or not rows or not runs:
            return
        from PIL import Image

        image_root = Path(self.answers.image_root)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            lines = [
                f"# Sample generations (step {self.answers.step})",
                "",
                "| # | image | prompt | model answer | reference |",
                "|---|---|---|---|---|",
            ]
            for i, row in enumerate(rows):
                png = f"sample_{i}.png"
                with Image.open(image_root / row["image"]) as image:
                    image.convert("RGB").save(out / png)
                lines.append(
                    f"| {i} | ![{row['image']}]({png}) | {_cell(row['question'])} "
                    f"| {_cell(row['prediction'])} | {_cell(row['answer'])} |"
                )
            (out / "samples.md").write_text("\n".join(lines) + "\n")
            (out / "samples.json").write_text(json.dumps(rows, indent=1))
            for client, run_id in runs:
                client.log_artifacts(run_id, str(out), "samples")


def mlflow_runs(trainer: L.Trainer) -> list[tuple[Any, str]]:
    """(MlflowClient, run id) of each MLflow logger of this rank (none on ranks > 0)."""
    from lightning.pytorch.loggers import MLFlowLogger

    found = []
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger) and logger.run_id:
            found.append((logger.experiment, logger.run_id))
    return found


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or "(empty)"


class LogEvalResults(L.Callback):
    """Log what an evaluation callback returned: its metrics, and its prediction files under
    `eval/` of the MLflow run. Placed after that callback, so its `on_train_end` ran first."""

    def __init__(self, evaluation: Any) -> None:
        self.evaluation = evaluation  # has `results` (eval.callback.EvalResults) after fit

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(self.evaluation, "results", None)
        if not trainer.is_global_zero or results is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(results.metrics, step=results.step)
        if Path(results.out_dir).is_dir():
            for client, run_id in mlflow_runs(trainer):
                client.log_artifacts(run_id, str(results.out_dir), "eval")


class RankAgreement(L.Callback):
    """Every rank must run the same job: compare a config key across ranks at fit start.

    Why: Lightning re-launches ranks > 0 with the command line; under a Hydra sweep that used
    to start the whole sweep again, so rank 1 could join rank 0 with another job's config and
    train silently wrong. `ranks_joined` is how many ranks reported rank 0's key.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.ranks_joined = 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        keys: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(keys, self.key)
        if len(set(keys)) != 1:
            raise RuntimeError(
                f"ranks run different configurations (run keys by rank: {keys}); "
                "every rank must be started with the same job overrides."
            )
        self.ranks_joined = len(keys)
        if trainer.is_global_zero:
            for client, run_id in mlflow_runs(trainer):
                client.log_param(run_id, "distributed.ranks_joined", len(keys))
