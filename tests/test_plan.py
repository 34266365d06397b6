"""`vlmlab plan`: meta-device parameter counts equal transformers' own, memory formula, CLI."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from vlmlab import cli
from vlmlab.config import compose
from vlmlab.errors import ConfigError
from vlmlab.models import build_vlm
from vlmlab.plan import GB, build_meta_model, estimate_memory, normalize_strategy, plan

LLAVA15_7B = ["encoder=clip336", "connector=mlp", "llm=vicuna7b"]


def _hf_llava_meta(cfg: Any) -> Any:
    """transformers' own LlavaForConditionalGeneration from the same architecture numbers."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = OmegaConf.to_container(cfg.llm.config, resolve=True)
    assert isinstance(text, dict)
    text.pop("model_type")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**cfg.encoder.config),
        text_config=LlamaConfig(**text),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
    )
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def hf_llava15() -> Any:
    return _hf_llava_meta(compose([*LLAVA15_7B, "stage=2"]))


@pytest.fixture(scope="module")
def meta7b() -> Any:
    """The LLaVA-1.5-7B composition on the meta device; tests set requires_grad themselves."""
    return build_meta_model(compose([*LLAVA15_7B, "stage=2"]))[0]


def test_llava15_7b_total_equals_transformers(hf_llava15: Any) -> None:
    started = time.perf_counter()
    result = plan(compose([*LLAVA15_7B, "stage=2"]))
    seconds = time.perf_counter() - started
    # like with like: llm.vicuna7b builds a 32000-row vocabulary (LLaVA-1.5's HF repo pads to 32064)
    assert result["vocab_size"] == 32000 == hf_llava15.config.text_config.vocab_size
    assert result["params_total"] == _count(hf_llava15) == 7_062_902_784
    parts = result["components"]
    assert parts["encoder"]["total"] == _count(hf_llava15.model.vision_tower)
    assert parts["connector"]["total"] == _count(hf_llava15.model.multi_modal_projector)
    assert parts["llm"]["total"] == _count(hf_llava15.model.language_model) + _count(
        hf_llava15.lm_head
    )
    assert result["image_tokens"] == 576 == hf_llava15.config.image_seq_length
    # stage 2: connector + LLM train, the encoder stays frozen
    assert parts["encoder"]["trainable"] == 0
    assert result["params_trainable"] == parts["connector"]["total"] + parts["llm"]["total"]
    assert seconds < 10, f"plan took {seconds:.1f}s"


def test_llava15_7b_stage1_trains_only_the_connector() -> None:
    result = plan(compose([*LLAVA15_7B, "stage=1"]), precision="bf16-mixed")
    parts = result["components"]
    assert parts["connector"]["trainable"] == parts["connector"]["total"] == 20_979_712
    assert parts["encoder"]["trainable"] == parts["llm"]["trainable"] == 0
    assert result["params_trainable"] == 20_979_712
    # AdamW states for 21M params only; the frozen 7B still costs its weights
    memory = result["memory"]
    assert memory["optimizer_gb"] == pytest.approx(20_979_712 * 12 / GB)
    assert memory["weights_gb"] == pytest.approx(result["params_total"] * 2 / GB)


def test_tiny_plan_equals_the_real_build() -> None:
    """Without an explicit vocab_size, the plan reads the (bundled) tokenizer like build_llm."""
    cfg = compose(["stage=2"])
    result = plan(cfg)
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert result["params_total"] == _count(model)
    for name in ("encoder", "connector", "llm"):
        assert result["components"][name]["total"] == _count(getattr(model, name))
    assert result["image_tokens"] == model.num_image_tokens == 16
    assert result["vocab_size"] == model.llm.get_input_embeddings().num_embeddings


@pytest.mark.parametrize(
    ("strategy", "states_divisor", "weights_divisor"),
    [
        ("ddp", 1, 1),
        ("deepspeed_zero1", 1, 1),
        ("deepspeed_zero2", 8, 1),
        ("deepspeed_zero3", 8, 8),
        ("fsdp", 8, 8),
    ],
)
def test_memory_formula(
    meta7b: Any, strategy: str, states_divisor: int, weights_divisor: int
) -> None:
    model = meta7b
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("encoder."))
    total = _count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mixed = estimate_memory(model, strategy, 8, "bf16-mixed", micro_batch=1, seq_len=2048)
    assert mixed.weights_gb == pytest.approx(total * 2 / weights_divisor / GB)
    assert mixed.gradients_gb == pytest.approx(trainable * 2 / states_divisor / GB)
    optim_divisor = 8 if strategy != "ddp" else 1
    assert mixed.optimizer_gb == pytest.approx(trainable * 12 / optim_divisor / GB)
    full = estimate_memory(model, strategy, 8, "32-true", micro_batch=1, seq_len=2048)
    assert full.weights_gb == pytest.approx(2 * mixed.weights_gb)
    assert full.optimizer_gb == pytest.approx(mixed.optimizer_gb * 8 / 12)
    parts = mixed.weights_gb + mixed.gradients_gb + mixed.optimizer_gb + mixed.activations_gb
    assert mixed.total_gb == pytest.approx(parts)


def test_activation_term_scales_with_tokens_and_checkpointing(meta7b: Any) -> None:
    model = meta7b
    model.requires_grad_(True)
    model.encoder.requires_grad_(False)
    one = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=1, seq_len=2048)
    two = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=2, seq_len=2048)
    ckpt = estimate_memory(model, "ddp", 1, "bf16-mixed", 1, 2048, checkpointing=True)
    assert two.activations_gb == pytest.approx(2 * one.activations_gb)
    assert ckpt.activations_gb < one.activations_gb / 5
    # 34 bytes x tokens x hidden x layers (16 bit) + fp32 logits and their gradient
    expected = (34 * 2048 * 4096 * 32 + 8 * 2048 * 32000) / GB
    assert one.activations_gb == pytest.approx(expected)
    full = estimate_memory(model, "ddp", 1, "32-true", micro_batch=1, seq_len=2048)
    assert full.activations_gb == pytest.approx(expected + 34 * 2048 * 4096 * 32 / GB)
    # a training encoder keeps its activations too: 576 patch tokens x 1024 x 24 layers
    model.encoder.requires_grad_(True)
    tuned = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=1, seq_len=2048)
    assert tuned.activations_gb == pytest.approx(expected + 34 * 576 * 1024 * 24 / GB)


def test_plan_reads_the_trainer_config() -> None:
    overrides = [*LLAVA15_7B, "stage=2", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose([*overrides, "trainer.strategy=deepspeed_stage_3"])
    memory = plan(cfg)["memory"]
    assert (memory["strategy"], memory["world_size"], memory["precision"]) == (
        "deepspeed_zero3",
        8,
        "bf16-mixed",
    )
    assert not memory["checkpointing"]
    checkpointed = plan(compose([*overrides, "stage.gradient_checkpointing=true"]))["memory"]
    assert checkpointed["checkpointing"]
    assert checkpointed["activations_gb"] < memory["activations_gb"] / 5
    flags = plan(cfg, strategy="ddp", gpus=1, precision="32-true")["memory"]
    assert (flags["strategy"], flags["world_size"], flags["precision"]) == ("ddp", 1, "32-true")
    assert flags["total_gb"] > 10 * memory["total_gb"] / 8


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("deepspeed_zero2", "deepspeed_zero2"),
        ("deepspeed_zero3", "deepspeed_zero3"),
        ("deepspeed_zero3_offload", "deepspeed_zero3"),
        ("fsdp", "fsdp"),
        ("ddp", "ddp"),
    ],
)
def test_plan_reads_the_engine_presets(preset: str, expected: str) -> None:
    memory = plan(compose([*LLAVA15_7B, "stage=2", f"trainer={preset}"]))["memory"]
    assert memory["strategy"] == expected


def test_strategy_names() -> None:
    assert normalize_strategy("auto") == "ddp"
    assert normalize_strategy("ddp_spawn") == "ddp"
    assert normalize_strategy("fsdp") == "fsdp"
    assert normalize_strategy("deepspeed_stage_2_offload") == "deepspeed_zero2"
    assert normalize_strategy({"_target_": "lightning.pytorch.strategies.FSDPStrategy"}) == "fsdp"
    with pytest.raises(ConfigError, match=r"trainer\.strategy"):
        normalize_strategy("horovod")


def test_plan_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"llm\.config\.vocab_size"):
        plan(compose([*LLAVA15_7B, "llm.config.vocab_size=null"]))
    with pytest.raises(ConfigError, match=r"trainer\.precision"):
        plan(compose(LLAVA15_7B), precision="fp8")
    with pytest.raises(ConfigError, match=r"stage"):
        plan(compose([*LLAVA15_7B, "stage.train=[projector]"]))


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as code:
        cli.main(["plan", *LLAVA15_7B, "stage=1", "--json", "--gpus", "8", "--strategy", "fsdp"])
    assert code.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params_trainable"] == 20_979_712
    assert result["params_total"] == 7_062_902_784
    assert set(result["components"]) == {"encoder", "connector", "llm"}
    assert result["image_tokens"] == 576
    assert result["memory"]["strategy"] == "fsdp" and result["memory"]["world_size"] == 8
    assert result["memory_gb_per_gpu"] == pytest.approx(result["memory"]["total_gb"], abs=1e-3)
    with pytest.raises(SystemExit) as code:
        cli.main(["plan", *LLAVA15_7B, "--strategy", "horovod"])
    assert code.value.code == 2
    assert "trainer.strategy" in capsys.readouterr().err


def test_cli_plan_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as code:
        cli.main(["plan", *LLAVA15_7B, "stage=1"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "[TRAINABLE]" in out and "20,979,712" in out and "7,062,902,784" in out
    assert "image tokens per sample: 576" in out
