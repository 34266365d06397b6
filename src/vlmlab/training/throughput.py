"""Throughput and MFU (model FLOPs utilisation) as MLflow metrics, every `log_every_n_steps`.

Model FLOPs of one optimizer step, from parameter and token counts (attention-score FLOPs,
about 2 x layers x seq x hidden per token, are left out, as in the usual 6ND convention):

    for each component c of encoder -> connector -> llm, processing T_c tokens this step
    (encoder and connector: images x encoder tokens per image; llm: non-padding tokens):
        forward              2 x N_c x T_c
        weight gradients     2 x N_c^trainable x T_c
        input gradients      2 x N_c x T_c   if c or a component before it trains, else 0

N_c counts matmul parameters: embedding lookups are not matmuls and are left out, except an
input embedding tied to the output head, which is counted once as the head. Quantized weights
count their logical elements: a bitsandbytes 4-bit weight (Params4bit) stores two per uint8
element, its `quant_state.shape` is the matmul's shape (QLoRA). A fully trained
model gets the familiar 6 N T; LLaVA stage 1 (connector only) gets 4 N_llm T for the LLM (its
forward, and the input gradients that carry the loss back to the connector) and 2 N_enc T for
the frozen encoder (forward only).

    perf/mfu = step FLOPs (all ranks) / (seconds x devices x trainer.peak_tflops x 1e12)

peak_tflops is one device's dense peak for the training precision (A100 bf16: 312, H100 SXM:
989); null (the CPU preset) skips MFU. Times are wall clock between logging steps, so data
loading stalls count against throughput, as they should.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

COMPONENTS = ("encoder", "connector", "llm")


def logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: `numel()`, except a quantized bitsandbytes Params4bit,
    whose packed uint8 storage holds two 4-bit weights per element; its `quant_state.shape` is
    the original (out, in) shape. (Int8Params hold one weight per element: numel is right.)"""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        count = 1
        for size in shape:
            count *= int(size)
        return count
    return param.numel()


def matmul_params(module: nn.Module, head: nn.Module | None = None) -> tuple[int, int]:
    """(all, trainable) parameters used in matmuls: embedding tables left out unless tied to `head`."""
    head_weight = getattr(head, "weight", None)
    lookup = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)} - {
        id(head_weight)
    }
    total = trainable = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen or id(param) in lookup:
            continue
        seen.add(id(param))
        count = logical_numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return total, trainable


@dataclass(frozen=True)
class FlopsModel:
    """Matmul parameter counts per component and which components carry input gradients."""

    params: dict[str, int]
    trainable: dict[str, int]
    grad_through: dict[str, bool]
    tokens_per_image: int

    @classmethod
    def of(cls, model: nn.Module) -> FlopsModel:
        params, trainable = {}, {}
        for name in COMPONENTS:
            component = getattr(model, name)
            heads = getattr(component, "get_output_embeddings", None)
            head = heads() if name == "llm" and heads is not None else None
            params[name], trainable[name] = matmul_params(component, head)
        grad_through, upstream = {}, False
        for name in COMPONENTS:
            upstream = upstream or trainable[name] > 0
            grad_through[name] = upstream
        encoder: Any = model.encoder
        return cls(params, trainable, grad_through, int(encoder.num_tokens))

    def step_flops(self, images: int, llm_tokens: int) -> float:
        tokens = {
            "encoder": images * self.tokens_per_image,
            "connector": images * self.tokens_per_image,
            "llm": llm_tokens,
        }
        total = 0.0
        for name in COMPONENTS:
            per_token = 2 * self.params[name] + 2 * self.trainable[name]
            if self.grad_through[name]:
                per_token += 2 * self.params[name]
            total += per_token * tokens[name]
        return total


def mfu(flops: float, seconds: float, devices: int, peak_flops: float) -> float:
    """Achieved model FLOP/s over the devices' combined peak."""
    return flops / (seconds * devices * peak_flops)


class Throughput(L.Callback):
    """Logs perf/samples_per_s, perf/tokens_per_s (global and per device), perf/tflops_per_device,
    perf/padding_fraction and, with a peak, perf/mfu; counts are summed over ranks."""

    def __init__(self, flops: FlopsModel, peak_flops: float | None = None) -> None:
        self.flops = flops
        self.peak_flops = peak_flops
        self._counts = [0, 0, 0]  # samples, padded slots, images (shapes: no device sync)
        self._tokens: torch.Tensor | float = 0.0  # attention-mask sum, kept on the device
        self._since: float | None = None
        self._seen_step = 0
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step  # a resumed run starts past 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        mask = batch["attention_mask"]
        pixels = batch.get("pixel_values")
        self._counts[0] += len(batch["ids"]) if "ids" in batch else mask.shape[0]  # packed rows
        self._counts[1] += mask.numel()
        self._counts[2] += 0 if pixels is None else pixels.shape[0]
        self._tokens = self._tokens + mask.sum()
        step = trainer.global_step
        if step == self._seen_step:
            return  # accumulating: no optimizer step in this batch
        self._seen_step = step
        if step % max(1, getattr(trainer, "log_every_n_steps", 1)) == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        seconds = max(now - (self._since or now), 1e-9)
        counts = torch.tensor(
            [*self._counts, float(self._tokens)], dtype=torch.float64, device=pl_module.device
        )
        samples, slots, images, tokens = (
            float(v) for v in trainer.strategy.reduce(counts, reduce_op="sum")
        )
        self._counts, self._tokens = [0, 0, 0], 0.0
        self._since = now
        devices = trainer.world_size
        flops = self.flops.step_flops(int(images), int(tokens))
        metrics = {
            "perf/samples_per_s": samples / seconds,
            "perf/samples_per_s_per_device": samples / seconds / devices,
            "perf/tokens_per_s": tokens / seconds,
            "perf/tokens_per_s_per_device": tokens / seconds / devices,
            "perf/tflops_per_device": flops / seconds / devices / 1e12,
            "perf/padding_fraction": 1.0 - tokens / slots if slots else 0.0,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = mfu(flops, seconds, devices, self.peak_flops)
        self.last = metrics
        if trainer.is_global_zero:
            # the step index Lightning writes this step's own metrics under (the optimizer step
            # just taken, 0-based), so a step's metrics share one row and one write
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
