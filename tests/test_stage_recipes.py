"""Issue 4: stage presets (LoRA, full, partial encoder), per-module learning rates, merge,
resume, and the LLaVA recipes as data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file

from tests.test_stages import _real_batch
from vlmlab import checkpoints, stages
from vlmlab.errors import ConfigError
from vlmlab.merge import build_from_checkpoint, merge_checkpoint
from vlmlab.models import build_vlm
from vlmlab.schema import TrainerConfig, typed
from vlmlab.train import train
from vlmlab.training.module import VLMModule


def _model(cfg: DictConfig) -> tuple[Any, Any]:
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm)


def _one_step(
    cfg: DictConfig, model: Any, tokenizer: Any, plan: stages.StagePlan, steps: int = 1
) -> set[str]:
    """Real AdamW steps through VLMModule's optimizer; returns the names that changed."""
    batch = _real_batch(cfg, model, tokenizer)
    module = VLMModule(model, OmegaConf.to_container(cfg.stage.optim), 10, groups=plan.groups)  # type: ignore[arg-type]
    optimizer = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        module(batch).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _unreachable(model: Any, tokenizer: Any, cfg: DictConfig) -> set[str]:
    """Parameters that get no gradient even when everything trains (found empirically)."""
    for param in model.parameters():
        param.requires_grad_(True)
    model(
        **{k: v for k, v in _real_batch(cfg, model, tokenizer).items() if k != "ids"}
    ).loss.backward()
    unreachable = {n for n, p in model.named_parameters() if p.grad is None}
    for param in model.parameters():
        param.grad = None
    return unreachable


@pytest.mark.parametrize("stage", ["2_lora", "full", "2_encoder_last"])
def test_preset_trains_exactly_what_it_names(
    compose_cfg: Callable[..., DictConfig], stage: str
) -> None:
    small = ("stage.lora.r=8", "stage.lora.alpha=16") if stage == "2_lora" else ()  # r=128: slow
    cfg = compose_cfg(f"stage={stage}", "stage.init_from=null", *small)
    model, tokenizer = _model(cfg)
    unreachable = _unreachable(model, tokenizer, cfg)
    assert unreachable and all(n.startswith("encoder.") for n in unreachable)  # after select_layer
    plan = stages.apply(cfg.stage, model)
    names = {n for n, _ in model.named_parameters()}
    connector = {n for n in names if n.startswith("connector.")}
    if stage == "2_lora":
        lora = {n for n in names if ".lora_A." in n or ".lora_B." in n}
        expected = connector | lora
        peft_trainable, _ = model.llm.get_nb_trainable_parameters()
        ours = sum(
            p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad and n.startswith("llm.")
        )
        assert ours == peft_trainable > 0
        assert not any("lm_head" in n for n in lora), "LoRA must skip lm_head"
    elif stage == "full":
        expected = names - unreachable
    else:  # the only encoder block that feeds select_layer=-2 of the tiny encoder is layer 0
        llm = {n for n in names if n.startswith("llm.")}
        layer0 = {n for n in names if ".layers.0." in n and n.startswith("encoder.")}
        assert layer0
        expected = connector | llm | layer0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected == set(plan.trainable)
    assert sum(r["trainable"] for r in plan.table) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    # LoRA B starts at zero, so A gets a zero gradient on the first step: take two
    assert _one_step(cfg, model, tokenizer, plan, steps=2 if stage == "2_lora" else 1) == expected


def test_frozen_encoder_runs_in_eval_mode_without_grad(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_cfg("stage=2", "stage.init_from=null")
    model, _ = _model(cfg)
    stages.apply(cfg.stage, model)
    model.train()
    assert model.training and not model.encoder.training
    pixels = torch.randn(2, 3, model.encoder.image_size, model.encoder.image_size)
    embeds = model.encode_images(pixels)
    assert embeds.requires_grad  # the connector trains ...
    assert (
        not model.encoder(pixels).requires_grad or model.encoder_frozen
    )  # ... the encoder does not
    with torch.enable_grad():
        features = [None]
        handle = model.encoder.register_forward_hook(lambda m, i, o: features.__setitem__(0, o))
        model.encode_images(pixels)
        handle.remove()
    assert features[0] is not None and not features[0].requires_grad


def test_optimizer_groups_carry_configured_learning_rates(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    for stage, expected in (
        ("2_lora", {"default": 2e-4, "connector": 2e-5}),
        ("full", {"default": 2e-5, "encoder": 2e-6}),
    ):
        cfg = compose_cfg(f"stage={stage}", "stage.init_from=null")
        model, _ = _model(cfg)
        plan = stages.apply(cfg.stage, model)
        module = VLMModule(model, OmegaConf.to_container(cfg.stage.optim), 10, groups=plan.groups)  # type: ignore[arg-type]
        optimizer = module.configure_optimizers()["optimizer"]
        got = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert got == pytest.approx(expected)
        grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
        assert len(grouped) == len(set(grouped)) == sum(p.requires_grad for p in model.parameters())


def test_bad_policy_lists_every_problem_at_once(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg(
        "stage=2_lora",
        "stage.init_from=null",
        "stage.lora.target=decoder",
        "stage.train=[connector,vision_tower]",
        "+stage.param_groups=[{match: connector, lr: 1e-5}, {match: 'connector.*', lr: 3e-5}]",
    )
    with open_dict(cfg):  # past compose's schema check: stages.apply keeps its own key check
        cfg.stage.trian = ["llm"]
    model, _ = _model(cfg)
    with pytest.raises(ConfigError) as err:
        stages.apply(cfg.stage, model)
    message = str(err.value)
    assert "stage.lora.target" in message and "decoder" in message
    assert "'vision_tower' matches no parameter" in message
    assert "stage.trian" in message and "did you mean 'train'" in message
    overlap_cfg = compose_cfg(
        "stage=2",
        "stage.init_from=null",
        "stage.param_groups=[{match: connector, lr: 1e-5}, {match: 'connector.*', lr: 3e-5}]",
    )
    with pytest.raises(ConfigError, match="claimed by both"):
        stages.apply(overlap_cfg.stage, _model(overlap_cfg)[0])
    nothing = compose_cfg(
        "stage=2", "stage.init_from=null", "stage.train=[llm]", "stage.freeze=[llm]"
    )
    with pytest.raises(ConfigError, match="nothing would train"):
        stages.apply(nothing.stage, _model(nothing)[0])


def test_qlora_on_cpu_fails_before_loading_weights(compose_cfg: Callable[..., DictConfig]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal does not apply")
    cfg = compose_cfg(
        "stage=2_qlora", "stage.init_from=null", "llm=vicuna7b"
    )  # no download happens
    with pytest.raises(ConfigError, match=r"stage\.quantize: .*need a CUDA GPU and bitsandbytes"):
        train(cfg)


@pytest.mark.parametrize(
    ("trainer", "keys"),
    [
        ("fsdp_cpu", ["trainer.strategy=fsdp"]),
        ("fsdp", ["trainer.strategy=fsdp"]),
        ("deepspeed_zero3", ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"]),
        ("deepspeed_zero3_offload", ["trainer.deepspeed.stage=3"]),
    ],
)
def test_qlora_under_sharding_is_refused_before_build(
    compose_cfg: Callable[..., DictConfig], trainer: str, keys: list[str]
) -> None:
    """4-bit bitsandbytes weights can't be sharded by FSDP2 or partitioned by ZeRO-3: refused
    with the keys and the fix, and every other problem (no GPU here) in the same message."""
    cfg = compose_cfg("stage=2_qlora", f"trainer={trainer}", "llm=vicuna7b")
    with pytest.raises(ConfigError) as err:
        stages.check_before_build(cfg.stage, typed(cfg.trainer, TrainerConfig))
    message = str(err.value)
    for key in ["stage.quantize", *keys]:
        assert key in message, message
    assert "trainer=ddp" in message and "deepspeed_zero2" in message
    if not torch.cuda.is_available():
        assert "need a CUDA GPU" in message  # listed together, not one at a time


@pytest.mark.parametrize("trainer", ["ddp", "deepspeed_zero2", "cpu"])
def test_qlora_with_replicated_base_is_not_a_strategy_problem(
    compose_cfg: Callable[..., DictConfig], trainer: str
) -> None:
    cfg = compose_cfg("stage=2_qlora", f"trainer={trainer}", "llm=vicuna7b")
    assert stages.config_problems(cfg.stage, typed(cfg.trainer, TrainerConfig)) == []
    plain = compose_cfg("stage=2_lora", "trainer=fsdp_cpu")
    stages.check_before_build(
        plain.stage, typed(plain.trainer, TrainerConfig)
    )  # no quantize: nothing to refuse


def _trained_lora_checkpoint(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> tuple[Path, Any]:
    cfg = compose_cfg(
        "stage=2_lora", "stage.init_from=null", "stage.lora.r=8", "stage.lora.alpha=16"
    )
    model, tokenizer = _model(cfg)
    plan = stages.apply(cfg.stage, model)
    for _ in range(2):  # LoRA B starts at zero: train so the adapters matter
        _one_step(cfg, model, tokenizer, plan)
    meta = {
        "stage": "2_lora",
        "lora": plan.lora,
        "parent": None,
        "config": {
            c: OmegaConf.to_container(cfg[c], resolve=True) for c in ("encoder", "connector", "llm")
        },
    }
    ckpt = checkpoints.save_trainable(model, tmp_path / "lora", meta)
    return ckpt, (model, _real_batch(cfg, model, tokenizer))


def _logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


def test_lora_merge_gives_the_same_logits(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    ckpt, (trained, batch) = _trained_lora_checkpoint(compose_cfg, tmp_path)
    reference = _logits(trained, batch)
    unmerged, _, _ = build_from_checkpoint(ckpt, merge_last=False)
    merged, _, _ = build_from_checkpoint(ckpt, merge_last=True)
    assert hasattr(unmerged.llm, "merge_and_unload") and not hasattr(merged.llm, "merge_and_unload")
    assert (_logits(unmerged, batch) - reference).abs().max() <= 1e-5
    assert (_logits(merged, batch) - reference).abs().max() <= 1e-5
    base = _model(compose_cfg("stage=2_lora"))[0]
    assert (_logits(base, batch) - reference).abs().max() > 1e-3, (
        "the adapters must change the output"
    )

    out = merge_checkpoint(ckpt, tmp_path / "merged")
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in name for name in tensors)
    from transformers import LlavaForConditionalGeneration  # mlp connector: an HF export too

    hf = LlavaForConditionalGeneration.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        hf_logits = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    assert (hf_logits - reference).abs().max() <= 1e-5
    fresh = _model(compose_cfg("stage=2_lora"))[0]
    fresh.load_state_dict(tensors)
    assert (_logits(fresh, batch) - reference).abs().max() <= 1e-5


def _final_weights(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result["checkpoint"]) / checkpoints.WEIGHTS))


@pytest.mark.parametrize("stage", ["2_lora", pytest.param("2", marks=pytest.mark.slow)])
def test_resume_after_interruption_matches_uninterrupted(
    compose_cfg: Callable[..., DictConfig], stage: str, tmp_path: Path
) -> None:
    """Interrupted at step 3 of 6 (a resumable last.ckpt), resumed: same weights as one go."""
    common = (
        "logger=none",
        "stage.init_from=null",
        "stage.evaluate=false",
        "data.batch_size=4",
        "stage.global_batch_size=8",
        "checkpoint.every_n_steps=1",
        f"stage={stage}",
    )
    if stage == "2_lora":
        common = (
            *common,
            "stage.lora.r=4",
            "stage.lora.alpha=8",
        )  # dropout 0.05 stays: RNG must resume
    full = train(compose_cfg(*common, "seed=5"))
    assert full["complete"] and full["metrics"]

    # a fresh root: the interrupted run must not see the uninterrupted run's files
    stopped = train(
        compose_cfg(*common, "seed=5", "trainer.max_steps=3", f"paths.root={tmp_path / 'second'}")
    )
    assert not stopped["complete"]
    assert not checkpoints.read_meta(Path(stopped["checkpoint"])).complete
    resumed = train(
        compose_cfg(*common, "seed=5", "resume=auto", f"paths.root={tmp_path / 'second'}")
    )
    assert resumed["complete"]
    assert (
        checkpoints.read_meta(Path(resumed["checkpoint"])).global_step
        == checkpoints.read_meta(Path(full["checkpoint"])).global_step
        == 6
    )

    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


# LLaVA-1.5 paper Table 9 and the official scripts (see ../shared/ANCHORS.md).
TABLE9 = {
    "1": {
        "train": ["connector"],
        "global_batch_size": 256,
        "lr": 1e-3,
        "template": "plain",
        "dataset": "align",
    },
    "2": {
        "train": ["connector", "llm"],
        "global_batch_size": 128,
        "lr": 2e-5,
        "template": "vicuna_v1",
        "dataset": "instruct",
    },
    "2_lora": {
        "train": ["connector"],
        "global_batch_size": 128,
        "lr": 2e-4,
        "template": "vicuna_v1",
        "dataset": "instruct",
    },
}


@pytest.mark.parametrize("experiment", ["llava15_7b", "llava15_13b", "llava15_7b_lora"])
@pytest.mark.parametrize("stage", ["1", "2", "2_lora"])
def test_llava15_experiments_resolve_to_table9(
    compose_cfg: Callable[..., DictConfig], experiment: str, stage: str
) -> None:
    cfg = compose_cfg(f"experiment={experiment}", f"stage={stage}", tiny_data=False)
    row = TABLE9[stage]
    assert list(cfg.stage.train) == row["train"]
    assert cfg.stage.global_batch_size == row["global_batch_size"]
    assert cfg.stage.optim.lr == pytest.approx(row["lr"])
    assert cfg.stage.template == row["template"] and cfg.stage.dataset == row["dataset"]
    assert cfg.stage.optim.schedule == "cosine" and cfg.stage.optim.warmup_ratio == pytest.approx(
        0.03
    )
    assert cfg.stage.optim.weight_decay == 0.0 and cfg.stage.epochs == 1
    # shared by both stages: CLIP-L/14-336, penultimate layer, patch features, mlp2x_gelu, pad, bf16, 2048
    assert cfg.encoder.name_or_path == "openai/clip-vit-large-patch14-336"
    assert (cfg.encoder.select_layer, cfg.encoder.select_feature) == (-2, "patch")
    assert cfg.encoder.transform.aspect == "pad"
    assert cfg.connector._target_.endswith("MLPConnector") and cfg.connector.depth == 2
    assert cfg.data.max_length == 2048 and cfg.trainer.precision == "bf16-mixed"
    # the official scripts pass --gradient_checkpointing True in both stages
    assert cfg.stage.gradient_checkpointing is True
    llm = "lmsys/vicuna-13b-v1.5" if experiment == "llava15_13b" else "lmsys/vicuna-7b-v1.5"
    assert cfg.llm.name_or_path == llm
    # micro batch x 8 GPUs = the official per-device batch; accumulation is derived
    assert cfg.data.batch_size * 8 == row["global_batch_size"]
    if stage == "2_lora":
        assert dict(cfg.stage.lora) | {"target_modules": None} == {
            "target": "llm",
            "r": 128,
            "alpha": 256,
            "dropout": 0.05,
            "target_modules": None,
            "bias": "none",
        }
        assert [(g.match, g.lr) for g in cfg.stage.param_groups] == [("connector", 2e-5)]


def test_llava_v1_recipe(compose_cfg: Callable[..., DictConfig]) -> None:
    one = compose_cfg("experiment=llava_v1", "stage=1", tiny_data=False)
    two = compose_cfg("experiment=llava_v1", "stage=2", tiny_data=False)
    assert (
        one.encoder.name_or_path == "openai/clip-vit-large-patch14"
        and one.encoder.config.image_size == 224
    )
    assert one.connector._target_.endswith("LinearConnector")
    assert (one.stage.optim.lr, one.stage.global_batch_size, one.stage.epochs) == (2e-3, 128, 1)
    assert (two.stage.optim.lr, two.stage.global_batch_size, two.stage.epochs) == (2e-5, 32, 3)
    assert one.encoder.transform.aspect == "crop"
    assert one.stage.gradient_checkpointing is True and two.stage.gradient_checkpointing is True
    off = compose_cfg(
        "experiment=llava_v1", "stage=2", "stage.gradient_checkpointing=false", tiny_data=False
    )
    assert off.stage.gradient_checkpointing is False  # the command line still decides


def test_init_from_an_mlflow_run(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    first = train(compose_cfg("stage=1", "stage.init_from=null"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    assert run.data.tags["checkpoint"] == first["checkpoint"]
    second = train(
        compose_cfg("stage=2", f"stage.init_from=runs:/{run.info.run_id}", "stage.evaluate=false")
    )
    meta = checkpoints.read_meta(Path(second["checkpoint"]))
    assert meta.parent == first["checkpoint"]
    runs = client.search_runs([run.info.experiment_id], filter_string="tags.stage = '2'")
    assert runs[0].data.tags["parent_stage_run"] == run.info.run_id
    with pytest.raises(ConfigError, match="not found"):
        train(compose_cfg("stage=2", "stage.init_from=runs:/0123456789abcdef0123456789abcdef"))


@pytest.mark.slow
def test_accumulation_on_two_ddp_ranks(tmp_path: Path) -> None:
    """global 128 / (micro 4 x 2 CPU DDP ranks) = 16, read back from the run both ranks trained."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import REPO, TINY_DATA

    args = [
        sys.executable,
        "train.py",
        "stage=1",
        "stage.init_from=null",
        *TINY_DATA,
        f"data.root={tmp_path / 'data'}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.batch_size=4",
        "stage.global_batch_size=128",
        "+trainer.limit_train_batches=2",
    ]
    env = {**os.environ, "VLMLAB_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    assert run.data.params["trainer.world_size"] == "2"
    assert run.data.params["trainer.accumulate_grad_batches"] == "16"
    bad = subprocess.run(
        [*args[:-3], "data.batch_size=3", "stage.global_batch_size=128"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2
    assert (
        "stage.global_batch_size" in bad.stderr + bad.stdout
        and "data.batch_size" in bad.stderr + bad.stdout
    )


def test_init_from_mismatch_and_policy_problems_in_one_message(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    first = train(compose_cfg("stage=1", "connector=linear", "logger=none", "stage.init_from=null"))
    cfg = compose_cfg(
        "stage=2",
        "connector=mlp",
        "logger=none",
        f"stage.init_from={first['checkpoint']}",
        "stage.train=[connector,no_such_module]",
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert (
        "another component config: connector" in message
        and "'no_such_module' matches no parameter" in message
    )


def test_continue_training_from_an_hf_llava_folder(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """stage.init_from=hf:<dir>: every weight from the HF folder, and chains replay it later."""
    from vlmlab.models.hf_llava import export_hf_llava

    base_cfg = compose_cfg()
    source, tokenizer = _model(base_cfg)
    with torch.no_grad():  # an HF checkpoint that is not our random init
        for param in source.parameters():
            param.add_(0.05 * torch.randn_like(param))
    hf_dir = export_hf_llava(source, tokenizer, tmp_path / "hf")

    result = train(compose_cfg("stage=1", f"stage.init_from=hf:{hf_dir}", "logger=none"))
    meta = checkpoints.read_meta(Path(result["checkpoint"]))
    assert meta.hf_base == str(hf_dir) and meta.parent is None
    rebuilt, _, _ = build_from_checkpoint(Path(result["checkpoint"]))
    ours = dict(rebuilt.named_parameters())
    for name, param in source.named_parameters():
        if name.startswith("connector."):  # stage 1 trained it away from the HF weights
            assert not torch.equal(ours[name], param), name
        else:  # frozen: exactly the HF folder's weights
            assert torch.equal(ours[name], param), name
