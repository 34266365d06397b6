"""Benchmarks at the end of a stage (`eval.benchmarks`), logged as `eval/<benchmark>/<metric>`.

The same `run_benchmark` as `vlmlab eval` scores them, so the number a run logs is the number
`vlmlab eval` gives on its checkpoint. `eval.alias`'s accuracy is also logged as `eval/accuracy`,
the key the demo and sweeps read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.benchmarks import SYNTHETIC, synthetic_for_shapes
from vlmlab.eval.generate import Generator
from vlmlab.eval.runner import run_benchmark
from vlmlab.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


class BenchmarkEval(L.Callback):
    """On rank zero after fit: answer each benchmark with the trained model and log the metrics."""

    def __init__(
        self,
        benchmarks: list[str],
        text_encoder: TextEncoder,
        out_dir: Path,
        shapes_root: Path | None = None,
        alias: str | None = None,
        **settings: Any,
    ) -> None:
        self.benchmarks = benchmarks
        self.text_encoder = text_encoder
        self.out_dir = out_dir
        self.shapes_root = shapes_root
        self.alias = alias
        self.settings = settings
        self.summaries: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, float] = {}

    def _files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        synthetic = synthetic_for_shapes(self.shapes_root) if self.shapes_root else {}
        for entry in self.benchmarks:
            if entry in SYNTHETIC:
                if entry in synthetic:
                    files[entry] = synthetic[entry]
            else:
                files[Path(entry).stem] = Path(entry)
        return files

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model: VisionLanguageModel = pl_module.model  # type: ignore[assignment]
        generator = Generator(
            model,
            self.text_encoder.tokenizer,
            self.text_encoder.template,
            model.encoder.image_transform,
        )
        for name, path in self._files().items():
            summary = run_benchmark(generator, path, self.out_dir, name=name, **self.settings)
            self.summaries[name] = summary
            for metric, value in summary["metrics"].items():
                self.metrics[f"eval/{name}/{metric}"] = float(value)
            log.info(
                "eval %s: %s on %d questions (%d rejected)",
                name,
                {k: round(v, 4) for k, v in summary["metrics"].items()},
                summary["num_samples"],
                summary["num_rejected"],
            )
        alias = f"eval/{self.alias}/accuracy"
        if alias in self.metrics:
            self.metrics["eval/accuracy"] = self.metrics[alias]
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
            run_id = getattr(logger, "run_id", None)
            client = getattr(logger, "experiment", None)
            if run_id and hasattr(client, "log_artifacts") and self.out_dir.is_dir():
                client.log_artifacts(run_id, str(self.out_dir), "eval")  # type: ignore[union-attr]


def build_eval_callback(
    cfg: DictConfig, dataset: dict[str, Any], text_encoder: TextEncoder, out_dir: Path
) -> BenchmarkEval | None:
    """The callback for a stage with `stage.evaluate: true` and benchmarks to run, else None.

    Synthetic names (shapes_colour ...) need data=shapes and are skipped otherwise; file entries
    must exist now, so a typo fails before training, not after it.
    """
    eval_cfg = cfg.get("eval")
    if not cfg.stage.get("evaluate") or eval_cfg is None or not eval_cfg.get("benchmarks"):
        return None
    shapes_root = None
    if cfg.data.get("name") == "shapes" and dataset.get("heldout") is not None:
        shapes_root = Path(dataset["heldout"]).parent
    benchmarks = [str(b) for b in eval_cfg.benchmarks]
    for entry in benchmarks:
        if entry in SYNTHETIC:
            if shapes_root is None:
                log.info(
                    "eval.benchmarks: %s needs data=shapes; skipped for data=%s",
                    entry,
                    cfg.data.get("name"),
                )
        elif not Path(entry).is_file():
            raise ConfigError(
                "eval.benchmarks",
                f"{entry!r} is neither a synthetic benchmark ({', '.join(SYNTHETIC)}) nor a file.",
                "give JSONL paths (see `vlmlab eval --help`) or synthetic names.",
            )
    max_samples = eval_cfg.get("max_samples")
    return BenchmarkEval(
        benchmarks,
        text_encoder,
        out_dir,
        shapes_root=shapes_root,
        alias=eval_cfg.get("alias"),
        batch_size=int(eval_cfg.batch_size),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        short_answer_prompt=bool(eval_cfg.get("short_answer_prompt", False)),
        circular=bool(eval_cfg.get("circular", False)),
        max_samples=int(max_samples) if max_samples is not None else None,
    )
