"""Benchmarks at the end of a stage (`eval.benchmarks`), as metrics `eval/<benchmark>/<metric>`.

The same `run_benchmark` as `vlmlab eval` scores them, so the number a run logs is the number
`vlmlab eval` gives on its checkpoint. `eval.alias`'s accuracy is also given as `eval/accuracy`,
the key the demo and sweeps read. `SampleAnswers` gives a few held-out answers to look at.
These callbacks only compute: their `results` / `rows` are what tracking logs
(`tracking.callbacks.LogEvalResults`, `LogSamples`), wired by `train.build_callbacks`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from vlmlab.data.prepare import ResolvedDataset
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.benchmarks import SYNTHETIC, is_synthetic, synthetic_for_shapes
from vlmlab.eval.generate import Generator
from vlmlab.eval.heldout import evaluate_heldout
from vlmlab.eval.runner import run_benchmark
from vlmlab.eval.scorers import resolve_settings
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.schema import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class EvalResults:
    """What the end-of-stage evaluation produced: metrics, per-benchmark summaries, files."""

    step: int
    out_dir: Path  # <out_dir>/<benchmark>/{predictions.jsonl,summary.json}
    metrics: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


class BenchmarkEval(L.Callback):
    """On rank zero after fit: answer each benchmark with the trained model; see `results`."""

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
        self.results: EvalResults | None = None  # set on rank zero at the end of fit

    def _files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        synthetic = synthetic_for_shapes(self.shapes_root) if self.shapes_root else {}
        for entry in self.benchmarks:
            if is_synthetic(entry):
                if entry in synthetic:
                    files[entry] = synthetic[entry]
                else:
                    log.warning(
                        "eval.benchmarks: %s is not a benchmark of this data; skipped", entry
                    )
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
            model.image_processor,
        )
        results = EvalResults(step=trainer.global_step, out_dir=self.out_dir)
        for name, path in self._files().items():
            summary = run_benchmark(generator, path, self.out_dir, name=name, **self.settings)
            results.summaries[name] = summary
            for metric, value in summary["metrics"].items():
                results.metrics[f"eval/{name}/{metric}"] = float(value)
            log.info(
                "eval %s: %s on %d questions (%d rejected)",
                name,
                {k: round(v, 4) for k, v in summary["metrics"].items()},
                summary["num_samples"],
                summary["num_rejected"],
            )
        alias = f"eval/{self.alias}/accuracy"
        if alias in results.metrics:
            results.metrics["eval/accuracy"] = results.metrics[alias]
        self.results = results


class SampleAnswers(L.Callback):
    """At the end of fit (rank zero), greedy answers to a few held-out questions.

    Why: a number like accuracy says little about *what* the model says; a few answers next
    to their pictures do. `rows` (question, image, prediction, answer ...) is what tracking
    logs (`tracking.callbacks.LogSamples`); images are relative to `image_root`.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_transform: Callable[[Image.Image], torch.Tensor],
        heldout_file: Path,
        image_root: Path,
        num_samples: int = 4,
        max_new_tokens: int = 16,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_transform = image_transform
        self.heldout_file = Path(heldout_file)
        self.image_root = Path(image_root)
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.rows: list[dict[str, Any]] = []
        self.step = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.num_samples < 1:
            return
        records = json.loads(self.heldout_file.read_text())[: self.num_samples]
        result = evaluate_heldout(
            pl_module.model,  # type: ignore[arg-type]
            self.text_encoder,
            self.image_transform,
            self.heldout_file,
            self.image_root,
            max_samples=self.num_samples,
            batch_size=self.num_samples,
            max_new_tokens=self.max_new_tokens,
        )
        self.step = trainer.global_step
        self.rows = [
            {"question": r["question"], "image": r["image"], **p}
            for r, p in zip(records, result["predictions"])
        ]


def build_eval_callback(
    eval_cfg: EvalConfig | None,
    evaluate: bool,
    dataset: ResolvedDataset,
    text_encoder: TextEncoder,
    out_dir: Path,
) -> BenchmarkEval | None:
    """The callback for a stage with `stage.evaluate: true` and benchmarks to run, else None.

    Synthetic names (shapes_colour ...) need a data source that generates them (data=shapes)
    and are skipped otherwise; file entries must exist now, so a typo fails before training.
    """
    if not evaluate or eval_cfg is None or not eval_cfg.benchmarks:
        return None
    synthetic_root = dataset.get("synthetic_root")
    benchmarks = [str(b) for b in eval_cfg.benchmarks]
    for entry in benchmarks:
        if is_synthetic(entry):
            if synthetic_root is None:
                log.info(
                    "eval.benchmarks: %s needs generated data (data=shapes or data=scenes); skipped",
                    entry,
                )
        elif not Path(entry).is_file():
            raise ConfigError(
                "eval.benchmarks",
                f"{entry!r} is neither a synthetic benchmark ({', '.join(SYNTHETIC)}) nor a file.",
                "give JSONL paths (see `vlmlab eval --help`) or synthetic names.",
            )
    return BenchmarkEval(
        benchmarks,
        text_encoder,
        out_dir,
        shapes_root=Path(synthetic_root) if synthetic_root is not None else None,
        alias=eval_cfg.alias,
        batch_size=int(eval_cfg.batch_size),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        short_answer_prompt=bool(eval_cfg.short_answer_prompt),
        circular=bool(eval_cfg.circular),
        max_samples=int(eval_cfg.max_samples) if eval_cfg.max_samples is not None else None,
        scoring=resolve_settings(eval_cfg.scoring),  # a misspelt mode fails before training
    )
