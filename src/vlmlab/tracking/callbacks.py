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
    `compute_grad_norm: false`) nothing is logged, with one warning. A module that
    `owns_grad_norm` (VLMModule with plain gradients) has computed it already for its guard
    and its clipping: that tensor is logged, after the step too, without a second pass.
    """

    def __init__(self) -> None:
        self._step_seen = -1
        self._warned = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step  # a resumed run starts past 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if _is_deepspeed(trainer) or getattr(pl_module, "owns_grad_norm", False):
            return  # read after the step (the engine's, or the module's), see on_train_batch_end
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
        if trainer.global_step == self._step_seen:
            return  # a micro-batch that only accumulated
        self._step_seen = trainer.global_step
        if not _is_deepspeed(trainer):
            norm = getattr(pl_module, "grad_norm", None)
            # VLMModule's guard computed it (one pass over the gradients, not three); a device
            # tensor, read on the host only when Lightning writes the metric; logged on the steps
            # whose per-step metrics the module logs (writes_step_metrics)
            if (
                getattr(pl_module, "owns_grad_norm", False)
                and isinstance(norm, torch.Tensor)
                and getattr(pl_module, "writes_step_metrics", True)
            ):
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            return
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
            logger.save()  # written now (a coalescing logger holds a step's metrics until saved)
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


class SystemMetrics(L.Callback):
    """CPU, memory, disk, network and (with nvidia-ml-py) GPU utilisation and memory, logged
    by MLflow's own monitor as `system/*` every `interval` seconds while the stage fits (rank
    zero; MLflow's System metrics tab charts them).

    Why MLflow's monitor: its keys are the ones the UI groups; `mlflow.enable_system_metrics_
    logging` only covers runs started through `mlflow.start_run`, not Lightning's logger.
    """

    def __init__(self, tracking_uri: str, interval: float) -> None:
        self.tracking_uri = tracking_uri
        self.interval = interval
        self.monitor: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        runs = mlflow_runs(trainer)
        if not trainer.is_global_zero or not runs:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            runs[0][1],
            sampling_interval=self.interval,
            resume_logging=trainer.global_step > 0,
            tracking_uri=self.tracking_uri,
        )
        self.monitor.start()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.finish()
