"""Issue 20 item 7: activation checkpointing reaches every component gradients flow through.

In stage 1 only the connector trains, yet the loss reaches it through the whole (frozen) LLM:
without checkpointing the LLM keeps every layer's activations. `stage.gradient_checkpointing`
must checkpoint the LLM whenever anything trains and the encoder when some of it trains, for
the transformers and timm encoders and a LoRA-wrapped (peft) LLM, without changing gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from tests.test_stages import _real_batch
from vlmlab import stages
from vlmlab.models import build_vlm


def _checkpointed(model: Any) -> list[str]:
    """Components whose blocks are set to recompute (read from the modules themselves)."""
    found = []
    vision = model.encoder.vision
    if getattr(vision, "grad_checkpointing", False) or getattr(
        vision, "is_activation_checkpointing", False
    ):
        found.append("encoder")
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    if llm.is_activation_checkpointing:
        found.append("llm")
    return found


def _train_step(cfg: DictConfig, checkpointing: bool) -> tuple[Any, list[str], int, dict]:
    """One real forward/backward; returns the model, plan.checkpointed, bytes saved for
    backward during the forward, and the gradients of the trainable parameters."""
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    cfg.stage.gradient_checkpointing = checkpointing
    plan = stages.apply(cfg.stage, model)
    batch = {k: v for k, v in _real_batch(cfg, model, tokenizer).items() if k != "ids"}
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == trainable
    return model, plan.checkpointed, sum(saved), grads


@pytest.mark.parametrize(
    ("stage", "overrides", "expected"),
    [
        ("1", [], ["llm"]),  # frozen LLM, frozen encoder: the LLM still carries gradients
        ("2", [], ["llm"]),
        ("2_lora", ["stage.lora.r=8", "stage.lora.alpha=16", "stage.lora.dropout=0.0"], ["llm"]),
        ("full", [], ["encoder", "llm"]),
        ("full", ["encoder.backend=timm"], ["encoder", "llm"]),
    ],
    ids=["stage1", "stage2", "lora", "full", "full-timm"],
)
def test_checkpointing_where_gradients_flow(
    compose_cfg: Callable[..., DictConfig], stage: str, overrides: list[str], expected: list[str]
) -> None:
    cfg = compose_cfg(f"stage={stage}", "stage.init_from=null", *overrides)
    plain, plain_on, plain_bytes, plain_grads = _train_step(cfg, checkpointing=False)
    model, on, ckpt_bytes, grads = _train_step(cfg, checkpointing=True)
    assert plain_on == [] and _checkpointed(plain) == []
    assert on == expected == _checkpointed(model)
    # the checkpointed layers keep only their inputs for the backward
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], msg=name)
    if stage == "1":  # the connector's gradient is exactly the same with recomputation
        assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
        assert all(n.startswith("connector.") for n in grads)


def test_stage1_frozen_encoder_is_not_checkpointed(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    """The frozen encoder runs under no_grad: nothing to checkpoint, it stays in eval mode."""
    cfg = compose_cfg("stage=1", "stage.gradient_checkpointing=true")
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    plan = stages.apply(cfg.stage, model)
    assert plan.checkpointed == ["llm"] == stages.checkpointed_components(model)
    assert not model.encoder.training
    assert not model.encoder.vision.is_activation_checkpointing
