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
from vlmlab.plan import (
    GB,
    LOSS_CHUNK,
    build_meta_model,
    estimate_memory,
    normalize_strategy,
    plan,
)

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
    # fp32 masters for the 21M trainable params only; the frozen 7B costs its weights as loaded
    memory = result["memory"]
    assert memory["optimizer_gb"] == pytest.approx(20_979_712 * 8 / GB)
    assert memory["gradients_gb"] == pytest.approx(20_979_712 * 4 / GB)
    encoder, llm = parts["encoder"]["total"], parts["llm"]["total"]
    # clip336 loads in float32, vicuna7b in bfloat16; the connector's master is fp32
    assert memory["weights_gb"] == pytest.approx((20_979_712 * 4 + encoder * 4 + llm * 2) / GB)
    assert memory["dtypes"]["llm"] == {"bfloat16": llm}
    assert memory["dtypes"]["connector"] == {"float32": 20_979_712}


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
    """Trainable: fp32 master 4 + gradient 4 + AdamW 8 B whatever the load dtype (here the
    bf16 LLM); frozen: as held (the fp32 encoder). DeepSpeed: a 16-bit module, 2 + 2 + 12 B."""
    model = meta7b
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("encoder."))
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    total = _count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = total - trainable  # the encoder, loaded in fp32
    deepspeed = strategy.startswith("deepspeed")
    mixed = estimate_memory(model, strategy, 8, "bf16-mixed", micro_batch=1, seq_len=2048)
    weights = total * 2 if deepspeed else trainable * 4 + frozen * 4
    assert mixed.weights_gb == pytest.approx(weights / weights_divisor / GB)
    grad_b, optim_b = (2, 12) if deepspeed else (4, 8)
    assert mixed.gradients_gb == pytest.approx(trainable * grad_b / states_divisor / GB)
    optim_divisor = 8 if strategy != "ddp" else 1
    assert mixed.optimizer_gb == pytest.approx(trainable * optim_b / optim_divisor / GB)
    full = estimate_memory(model, strategy, 8, "32-true", micro_batch=1, seq_len=2048)
    assert full.weights_gb == pytest.approx(2 * mixed.weights_gb if deepspeed else mixed.weights_gb)
    assert full.optimizer_gb == pytest.approx(trainable * 8 / optim_divisor / GB)
    parts = (
        mixed.weights_gb
        + mixed.gradients_gb
        + mixed.optimizer_gb
        + mixed.compute_copies_gb
        + mixed.activations_gb
    )
    assert mixed.total_gb == pytest.approx(parts)


def test_activation_term_scales_with_tokens_and_checkpointing(meta7b: Any) -> None:
    model = meta7b
    model.requires_grad_(True)
    model.encoder.requires_grad_(False)
    one = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=1, seq_len=2048)
    two = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=2, seq_len=2048)
    assert two.activations_gb > 1.9 * one.activations_gb
    # 34 bytes x tokens x hidden x layers (16 bit) + the head's input + one loss chunk (14 B per logit)
    layers = 34 * 2048 * 4096 * 32
    head = 2048 * 4096 * 2 + 14 * min(2048, getattr(model, "loss_chunk_size", LOSS_CHUNK)) * 32000
    assert one.activations_gb == pytest.approx((layers + head) / GB)
    # the loss is chunked: 16 x 2048 positions hold one chunk's rows of logits, not 32768
    chunk = getattr(model, "loss_chunk_size", LOSS_CHUNK)
    assert chunk < 2048
    big = estimate_memory(model, "fsdp", 8, "bf16-mixed", micro_batch=16, seq_len=2048)
    assert big.activations_gb == pytest.approx(
        (16 * layers + 16 * 2048 * 4096 * 2 + 14 * chunk * 32000) / GB
    )
    # checkpointing keeps each layer's input + one layer's full activations; under DDP the
    # residual stream of an fp32-master LLM is fp32, under FSDP it is bf16
    ckpt = estimate_memory(model, "ddp", 1, "bf16-mixed", 1, 2048, checkpointing=True)
    assert ckpt.checkpointed == ["llm"]
    assert ckpt.activations_gb == pytest.approx(
        (32 * 2048 * 4096 * 4 + 34 * 2048 * 4096 + head) / GB
    )
    sharded = estimate_memory(model, "fsdp", 8, "bf16-mixed", 1, 2048, checkpointing=True)
    assert sharded.activations_gb == pytest.approx(
        (32 * 2048 * 4096 * 2 + 34 * 2048 * 4096 + head) / GB
    )
    assert ckpt.activations_gb < one.activations_gb / 5
    full = estimate_memory(model, "ddp", 1, "32-true", micro_batch=1, seq_len=2048)
    assert full.activations_gb == pytest.approx((2 * layers + head + 2048 * 4096 * 2) / GB)
    # a training encoder keeps its activations too: 576 patch tokens x 1024 x 24 layers
    model.encoder.requires_grad_(True)
    tuned = estimate_memory(model, "ddp", 1, "bf16-mixed", micro_batch=1, seq_len=2048)
    assert tuned.activations_gb == pytest.approx((layers + head + 34 * 576 * 1024 * 24) / GB)
    both = estimate_memory(model, "ddp", 1, "bf16-mixed", 1, 2048, checkpointing=True)
    assert both.checkpointed == ["encoder", "llm"]
    # a frozen LLM still carries gradients to the connector: it is checkpointed too
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    stage1 = estimate_memory(model, "ddp", 1, "bf16-mixed", 1, 2048, checkpointing=True)
    assert stage1.checkpointed == ["llm"]


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


LLAVA15_EXPERIMENT = ["experiment=llava15_7b"]


def test_llava15_7b_stage2_fsdp_fits_an_80gb_gpu() -> None:
    """Acceptance 2: the experiment and the plan agree (checkpointing on, fp32 masters), and
    the shipped micro batch (16 x 2048 in stage 2) fits an 80 GB GPU on 8-way FSDP."""
    cfg = compose([*LLAVA15_EXPERIMENT, "stage=2", "trainer=fsdp"])
    assert cfg.stage.gradient_checkpointing is True
    memory = plan(cfg)["memory"]
    assert (memory["strategy"], memory["world_size"], memory["precision"]) == (
        "fsdp",
        8,
        "bf16-mixed",
    )
    assert (memory["micro_batch"], memory["seq_len"]) == (16, 2048)
    assert memory["checkpointing"] and memory["checkpointed"] == ["llm"]
    assert memory["master_weights"].startswith("fp32")
    assert memory["bytes_per_param"] == {"weight": 4, "gradient": 4, "optimizer": 8}
    assert set(memory["dtypes"]["llm"]) == {"float32"}  # a trained LLM is held in fp32
    assert memory["total_gb"] < 80, memory
    assert memory["activations_gb"] < 40, memory
    off = plan(compose([*LLAVA15_EXPERIMENT, "stage=2", "trainer=fsdp",
                        "stage.gradient_checkpointing=false"]))["memory"]  # fmt: skip
    assert not off["checkpointed"]
    assert off["activations_gb"] > 5 * memory["activations_gb"]
    assert off["total_gb"] > 80


def test_stage1_checkpoints_the_frozen_llm() -> None:
    """Gradients reach the connector through the frozen LLM: it is checkpointed, not skipped."""
    result = plan(compose([*LLAVA15_EXPERIMENT, "stage=1", "trainer=fsdp"]))
    memory = result["memory"]
    assert result["components"]["llm"]["trainable"] == 0
    assert memory["checkpointed"] == ["llm"]
    off = plan(compose([*LLAVA15_EXPERIMENT, "stage=1", "trainer=fsdp",
                        "stage.gradient_checkpointing=false"]))["memory"]  # fmt: skip
    assert off["total_gb"] > memory["total_gb"] + 100


@pytest.mark.parametrize(
    ("trainer", "keys"),
    [
        ("fsdp", ["stage.quantize", "trainer.strategy=fsdp"]),
        ("fsdp_cpu", ["stage.quantize", "trainer.strategy=fsdp"]),
        ("deepspeed_zero3", ["stage.quantize", "trainer.deepspeed.stage=3"]),
    ],
)
def test_plan_refuses_qlora_under_sharding(trainer: str, keys: list[str]) -> None:
    cfg = compose([*LLAVA15_EXPERIMENT, "stage=2_qlora", f"trainer={trainer}"])
    with pytest.raises(ConfigError) as err:
        plan(cfg)
    for key in keys:
        assert key in str(err.value)
    assert "trainer=ddp" in str(err.value) or "deepspeed_zero2" in str(err.value)


def test_qlora_plan_counts_4bit_base_weights() -> None:
    """On any machine (no GPU needed to plan): the LLM's linear weights at 4 bits, the rest of
    the LLM fp32 (peft's kbit preparation), LoRA + connector with fp32 masters."""
    lora = plan(compose([*LLAVA15_EXPERIMENT, "stage=2_lora", "trainer=ddp"]))["memory"]
    qlora = plan(compose([*LLAVA15_EXPERIMENT, "stage=2_qlora", "trainer=ddp"]))["memory"]
    linear = 32 * 4 * 4096 * 4096 + 32 * 3 * 4096 * 11008  # q, k, v, o + gate, up, down
    assert qlora["dtypes"]["llm"]["int4"] == linear
    assert lora["dtypes"]["llm"]["bfloat16"] == linear + 2 * 32000 * 4096 + 65 * 4096
    assert qlora["weights_gb"] < lora["weights_gb"] / 2
    assert qlora["gradients_gb"] == pytest.approx(lora["gradients_gb"])


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
    assert "master weights: fp32" in out
    assert "activation checkpointing: off" in out
    assert "data loader look-ahead:" in out and "GB host RAM per rank" in out
    with pytest.raises(SystemExit) as code:
        cli.main(["plan", *LLAVA15_EXPERIMENT, "stage=1", "trainer=fsdp"])
    assert code.value.code == 0
    assert "activation checkpointing: llm" in capsys.readouterr().out
