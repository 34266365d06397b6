"""Stage policies, optimizer/schedule, gradient accumulation and chained checkpoints."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from vlmlab import checkpoints, stages
from vlmlab.data.datamodule import VLMDataModule
from vlmlab.data.prepare import ensure_shapes, resolve_dataset
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models import build_vlm
from vlmlab.schema import DataConfig, TrainerConfig, typed
from vlmlab.stages.policy import format_table, parameter_table
from vlmlab.train import accumulation
from vlmlab.training.module import VLMModule

STAGES = ["1", "2", "lm"]


def _stage_cfg(compose_cfg: Callable[..., DictConfig], stage: str) -> DictConfig:
    return compose_cfg(f"stage={stage}", "stage.init_from=null")


def _build(cfg: DictConfig) -> tuple[Any, Any]:
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm)


def _under(name: str, globs: list[str]) -> bool:
    """Independent of the policy's matcher: the stage configs name whole modules."""
    return any(name == g or name.startswith(g + ".") for g in globs)


def _real_batch(cfg: DictConfig, model: Any, tokenizer: Any) -> dict[str, Any]:
    """One collated batch of the stage's own dataset, template and image transform."""
    ensure_shapes(typed(cfg.data, DataConfig))
    encoder = TextEncoder.for_model(
        model, tokenizer, str(cfg.stage.template), int(cfg.data.max_length)
    )
    dm = VLMDataModule(
        resolve_dataset(typed(cfg.data, DataConfig), str(cfg.stage.dataset))["shard_dir"],
        encoder,
        model.image_processor,
        batch_size=4,
        shuffle_buffer=4,
    )
    return next(iter(dm.train_dataloader()))


def _optim(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.stage.optim, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- policy + one step


@pytest.mark.parametrize("stage", STAGES)
def test_policy_trains_exactly_its_globs(
    compose_cfg: Callable[..., DictConfig], stage: str
) -> None:
    cfg = _stage_cfg(compose_cfg, stage)
    model, tokenizer = _build(cfg)
    plan = stages.apply(cfg.stage, model)
    train_globs = list(cfg.stage.train)

    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if _under(n, train_globs)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert expected and len(expected) < len(names)
    assert trainable == expected == set(plan.trainable)

    batch = _real_batch(cfg, model, tokenizer)
    if stage == "lm":
        assert batch["pixel_values"] is None
    else:
        assert batch["pixel_values"] is not None
    module = VLMModule(model, _optim(cfg), total_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.train()
    optimizer.zero_grad()
    loss = module(batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == expected
    for name, param in model.named_parameters():
        if name in expected:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("backend", ["transformers", "timm"])
def test_train_last_uses_the_encoders_declared_blocks(
    compose_cfg: Callable[..., DictConfig], backend: str
) -> None:
    """`stage.train_last.encoder` counts the blocks the encoder declares (contracts.Backbone),
    whatever container holds them (timm keeps them in an nn.Sequential), and only the blocks
    that feed the selected layer: the tiny tower's last block idles at select_layer=-2."""
    cfg = compose_cfg("stage=2_encoder_last", f"encoder.backend={backend}")
    model, tokenizer = _build(cfg)
    blocks = model.encoder.blocks()
    plan = stages.apply(cfg.stage, model)
    trained = {id(p) for p in model.encoder.parameters() if p.requires_grad}
    assert trained == {id(p) for p in blocks[-2].parameters()}  # the last block that feeds
    assert plan.table[0]["component"] == "encoder"
    assert plan.table[0]["trainable"] == sum(p.numel() for p in blocks[-2].parameters())
    model.train()
    module = VLMModule(model, _optim(cfg), total_steps=10)
    module(_real_batch(cfg, model, tokenizer)).loss.backward()
    assert all(p.grad is not None for p in blocks[-2].parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_parameter_table_counts(compose_cfg: Callable[..., DictConfig], stage: str) -> None:
    cfg = _stage_cfg(compose_cfg, stage)
    model, _ = _build(cfg)
    plan = stages.apply(cfg.stage, model)

    direct: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        row = direct.setdefault(name.split(".")[0], {"trainable": 0, "frozen": 0, "total": 0})
        row["trainable" if param.requires_grad else "frozen"] += param.numel()
        row["total"] += param.numel()
    table = {
        r["component"]: {k: r[k] for k in ("trainable", "frozen", "total")} for r in plan.table
    }
    assert table == direct
    assert set(table) == {"encoder", "connector", "llm"}
    assert parameter_table(model) == plan.table

    text = format_table(plan.table)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    for component in ("encoder", "connector", "llm"):
        state = "[TRAINABLE]" if _under(component, list(cfg.stage.train)) else "[Frozen]"
        assert state in lines[component], text
    total = sum(r["total"] for r in direct.values())
    trainable = sum(r["trainable"] for r in direct.values())
    assert f"{total:,}" in lines["all"] and f"{trainable:,}" in lines["all"]


def test_stage1_table_marks_frozen_encoder(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = _stage_cfg(compose_cfg, "1")
    model, _ = _build(cfg)
    text = format_table(stages.apply(cfg.stage, model).table)
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "[Frozen]" in lines["encoder"] and "[TRAINABLE]" not in lines["encoder"]
    assert "[TRAINABLE]" in lines["connector"]
    assert "[Frozen]" in lines["llm"]


# --------------------------------------------------------------------------- bad policies


def test_bad_policy_lists_every_problem(tiny_model: tuple) -> None:
    model, _ = tiny_model
    policy = OmegaConf.create(
        {"train": ["connector", "llm.no_such_module", "vision_tower"], "freeze": ["encoder.bogus*"]}
    )
    with pytest.raises(ConfigError) as err:
        stages.apply(policy, model)
    message = str(err.value)
    assert message.count("stage.train") == 2
    assert "'llm.no_such_module'" in message and "'vision_tower'" in message
    assert "stage.freeze" in message and "'encoder.bogus*'" in message
    # raised before touching the model: nothing was frozen
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "policy",
    [{"train": [], "freeze": []}, {"train": ["connector"], "freeze": ["connector"]}],
    ids=["empty", "all-frozen"],
)
def test_policy_with_nothing_trainable_is_rejected(tiny_model: tuple, policy: dict) -> None:
    model, _ = tiny_model
    with pytest.raises(ConfigError, match=r"stage\.train: nothing would train"):
        stages.apply(OmegaConf.create(policy), model)


def test_globs_and_freeze_carve_out(tiny_model: tuple) -> None:
    model, _ = tiny_model
    policy = OmegaConf.create({"train": ["llm.model.layers.*"], "freeze": ["llm.model.layers.0"]})
    plan = stages.apply(policy, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(plan.trainable)
    assert trainable and all(n.startswith("llm.model.layers.") for n in trainable)
    assert not any(n.startswith("llm.model.layers.0.") for n in trainable)
    assert any(n.startswith("llm.model.layers.1.") for n in trainable)


# --------------------------------------------------------------------------- optimizer + schedule


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_carries_stage_lr(compose_cfg: Callable[..., DictConfig], stage: str) -> None:
    cfg = _stage_cfg(compose_cfg, stage)
    model, _ = _build(cfg)
    stages.apply(cfg.stage, model)
    conf = VLMModule(model, _optim(cfg), total_steps=10).configure_optimizers()
    optimizer = conf["optimizer"]
    lr = float(cfg.stage.optim.lr)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(lr)]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(lr)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert conf["lr_scheduler"]["interval"] == "step"


def test_schedule_warms_up_then_cosine_decays(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = _stage_cfg(compose_cfg, "1")
    model, _ = _build(cfg)
    stages.apply(cfg.stage, model)
    total = 100
    conf = VLMModule(model, _optim(cfg), total_steps=total).configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = float(cfg.stage.optim.lr)
    warmup = math.ceil(float(cfg.stage.optim.warmup_ratio) * total)
    assert warmup == 3
    assert lrs[0] < lrs[1] < lrs[2]  # linear warmup: (step + 1) / warmup, never 0
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[1] == pytest.approx(2 * peak / warmup)
    assert lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    decay = lrs[warmup:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert decay[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs[total - 1] > 0
    # cosine, not linear: a quarter into the decay the factor is ~0.85 (linear: 0.75)
    quarter = warmup + (total - warmup) // 4
    assert 0.82 * peak < lrs[quarter] < 0.88 * peak
    mid = warmup + (total - warmup) / 2
    assert lrs[math.floor(mid)] > 0.5 * peak > lrs[math.ceil(mid)]


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.devices=2", "data.batch_size=4", "stage.global_batch_size=128"], 16),
        (
            [
                "trainer.devices=2",
                "trainer.num_nodes=2",
                "data.batch_size=4",
                "stage.global_batch_size=128",
            ],
            8,
        ),
        (["trainer.devices=1", "data.batch_size=8", "stage.global_batch_size=8"], 1),
    ],
)
def test_accumulation(
    compose_cfg: Callable[..., DictConfig], overrides: list[str], expected: int
) -> None:
    cfg = compose_cfg(*overrides)
    assert accumulation(cfg, typed(cfg.trainer, TrainerConfig)) == expected


def test_indivisible_global_batch_is_a_config_error(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_cfg("trainer.devices=2", "data.batch_size=8", "stage.global_batch_size=100")
    with pytest.raises(ConfigError) as err:
        accumulation(cfg, typed(cfg.trainer, TrainerConfig))
    assert "stage.global_batch_size" in str(err.value) and "data.batch_size" in str(err.value)


# --------------------------------------------------------------------------- checkpoints


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_trainable_writes_only_trainable(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = _stage_cfg(compose_cfg, "1")
    model, _ = _build(cfg)
    stages.apply(cfg.stage, model)
    out = checkpoints.save_trainable(model, tmp_path / "ckpt", {"stage": "1", "parent": None})
    tensors = load_file(str(out / checkpoints.WEIGHTS))
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == set(expected) and all(n.startswith("connector.") for n in tensors)
    assert all(torch.equal(tensors[n], p.detach()) for n, p in expected.items())
    meta = checkpoints.read_meta(out)
    assert meta.stage == "1" and meta.num_tensors == len(expected)
    assert meta.num_params == sum(p.numel() for p in expected.values())
    assert not (tmp_path / "ckpt.tmp").exists()
    with pytest.raises(FileExistsError):
        checkpoints.save_trainable(model, out, {"stage": "1"})


def test_load_chain_restores_root_first(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = _stage_cfg(compose_cfg, "2")
    model, _ = _build(cfg)
    # parent: a stage that trained connector + llm
    stages.apply(OmegaConf.create({"train": ["connector", "llm"]}), model)
    _perturb(model.llm, seed=1)
    _perturb(model.connector, seed=2)
    parent_llm, parent_connector = _snapshot(model.llm), _snapshot(model.connector)
    parent = checkpoints.save_trainable(model, tmp_path / "parent", {"stage": "2", "parent": None})
    # child: trains only the connector on top of it; its llm drift must not be saved
    stages.apply(OmegaConf.create({"train": ["connector"]}), model)
    _perturb(model.connector, seed=3)
    _perturb(model.llm, seed=4)
    child_connector = _snapshot(model.connector)
    child = checkpoints.save_trainable(
        model, tmp_path / "child", {"stage": "1", "parent": str(parent)}
    )
    assert set(load_file(str(child / checkpoints.WEIGHTS))) == {
        f"connector.{n}" for n in child_connector
    }

    fresh, _ = _build(cfg)
    fresh_encoder = _snapshot(fresh.encoder)
    assert not _same(_snapshot(fresh.llm), parent_llm)
    assert not _same(_snapshot(fresh.connector), child_connector)
    chain = checkpoints.load_chain(fresh, child)
    assert chain == [child, parent]
    assert _same(_snapshot(fresh.llm), parent_llm)
    assert _same(_snapshot(fresh.connector), child_connector)  # child applied last
    assert not _same(child_connector, parent_connector)
    assert _same(_snapshot(fresh.encoder), fresh_encoder)

    # loading only the parent gives the parent's connector
    other, _ = _build(cfg)
    assert checkpoints.load_chain(other, parent) == [parent]
    assert _same(_snapshot(other.connector), parent_connector)


def test_load_chain_rejects_a_folder_without_weights(tiny_model: tuple, tmp_path: Path) -> None:
    model, _ = tiny_model
    with pytest.raises(ConfigError, match=r"stage\.init_from"):
        checkpoints.load_chain(model, tmp_path)


def test_find_latest_matches_stage_and_fingerprints(tiny_model: tuple, tmp_path: Path) -> None:
    model, _ = tiny_model
    stages.apply(OmegaConf.create({"train": ["connector"]}), model)
    ours = {"encoder": "e1", "connector": "c1", "llm": "l1"}
    root = tmp_path / "checkpoints"
    assert checkpoints.find_latest(root, "1", ours) is None  # no folder yet

    def save(name: str, stage: str, fingerprints: dict[str, str]) -> Path:
        time.sleep(0.01)  # distinct finished_at stamps
        return checkpoints.save_trainable(
            model, root / name, {"stage": stage, "fingerprints": fingerprints, "parent": None}
        )

    save("old", "1", ours)
    newest_match = save("new", "1", ours)
    other_llm = save("newer-other-llm", "1", {**ours, "llm": "l2"})
    save("newest-stage2", "2", ours)
    lm_only = save("lm", "lm", {"llm": "l1"})

    assert checkpoints.find_latest(root, "1", ours) == newest_match
    assert checkpoints.find_latest(root, "1", {**ours, "llm": "l2"}) == other_llm
    assert checkpoints.find_latest(root, "1", {**ours, "encoder": "e9"}) is None
    assert checkpoints.find_latest(root, "3", ours) is None
    # a checkpoint records only the components it depends on
    assert checkpoints.find_latest(root, "lm", {**ours, "encoder": "e9"}) == lm_only
