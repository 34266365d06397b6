"""One gradient norm per optimizer step (issue 15, item 6): the non-finite guard, `train/grad_norm`
and gradient clipping used to compute it three times; now the guard computes it once, in the
optimizer's order, and the other two reuse it. The weights and the logged norm must stay
exactly what Lightning's own clipping (`clip_grad_norm_`) and a recomputed norm give.

Real tiny VLM, real collated batches, real Lightning fits on CPU; the reference is the same
module with Lightning's default `configure_gradient_clipping` and a GradNorm that recomputes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from vlmlab.tracking.callbacks import GradNorm
from vlmlab.training.module import VLMModule


class LightningClipping(VLMModule):
    """The previous path: Lightning clips (its own norm), GradNorm computes its own norm."""

    @property
    def owns_grad_norm(self) -> bool:
        return False

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        L.LightningModule.configure_gradient_clipping(self, optimizer, *args, **kwargs)


class LoggedNorms(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def _fit(module_cls: type[VLMModule], model: Any, batches: list[dict[str, Any]]) -> tuple:
    module = module_cls(model, {"lr": 1e-2}, total_steps=len(batches))
    norms = LoggedNorms()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        gradient_clip_val=0.05,  # below every step's norm here: clipping changes the update
        logger=False,
        callbacks=[GradNorm(), norms],  # GradNorm first, as in the recipe
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    dataset: Any = batches
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    return module, norms.norms


def test_one_norm_per_step_same_weights_and_logged_norm(
    compose_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_models import _batch
    from vlmlab import stages
    from vlmlab.models import build_vlm

    cfg = compose_cfg("stage=2", "stage.init_from=null")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    stages.apply(cfg.stage, model)
    batches = [_batch(model, tokenizer, [True, False, True], start=i) for i in range(3)]
    reference = copy.deepcopy(model)

    calls = {"norms": 0}
    total_norm = torch.nn.utils.get_total_norm

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["norms"] += 1
        return total_norm(*args, **kwargs)

    # clip_grad_norm_ calls the private alias; count both, as torch resolves them
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    monkeypatch.setattr(torch.nn.utils.clip_grad, "_get_total_norm", counted)
    ours, our_norms = _fit(VLMModule, model, batches)
    ours_calls, calls["norms"] = calls["norms"], 0
    theirs, their_norms = _fit(LightningClipping, reference, batches)

    assert ours_calls == len(batches)  # the guard's, reused by GradNorm and clipping
    assert calls["norms"] == 3 * len(batches)  # guard, GradNorm, clip_grad_norm_
    assert our_norms == their_norms and all(n > 0.05 for n in our_norms)
    for (name, mine), (_, other) in zip(
        ours.model.named_parameters(), theirs.model.named_parameters(), strict=True
    ):
        assert torch.equal(mine, other), name
