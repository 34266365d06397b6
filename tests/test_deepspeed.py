"""DeepSpeed: resume finds DeepSpeed's checkpoint folders, saves are atomic and skip frozen
weights, ZeRO-3 weights are gathered for the final checkpoint, ZeRO-Offload gets DeepSpeed's CPU
Adam, `train/grad_norm` comes from the engine.

DeepSpeed is not a runtime dependency but a dev one (the README's install line and .ci/run
build it without CUDA ops: `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`). The
folder tests write DeepSpeed's exact layout with torch.save (deepspeed 0.19 runtime/engine.py
file names); the others run DeepSpeed for real on CPU (its CPU accelerator with gloo, one
process): engines built by `deepspeed.initialize`, and Lightning's DeepSpeedStrategy with the
one CUDA-only guard (`setup_environment`) skipped. A missing deepspeed fails them, with the
install command, rather than skipping them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import assert_every_rank_failed
from vlmlab import checkpoints
from vlmlab.errors import ConfigError
from vlmlab.schema import TrainerConfig, typed
from vlmlab.training.deepspeed import (
    deepspeed_available,
    optimizer_class,
    zero_config,
    zero_stage,
)

ROOT = Path(__file__).resolve().parents[1]


def _trainer(cfg: Any) -> TrainerConfig:
    return typed(cfg.trainer, TrainerConfig)


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail(
            "deepspeed is a dev dependency of these tests: `pip install wheel && DS_BUILD_OPS=0 "
            "pip install --no-build-isolation -c constraints.txt deepspeed==0.19.8`"
        )


def write_deepspeed_folder(
    path: Path, stage: int, world: int = 2, bf16: bool = False, step: int = 5
) -> Path:
    """A checkpoint folder laid out exactly as Lightning's DeepSpeedStrategy.save_checkpoint
    writes it through `engine.save_checkpoint(path, tag="checkpoint", client_state=...)`."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    ds_config = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    client = {"epoch": 0, "global_step": step, "loops": {}, "callbacks": {}, "vlmlab": {"rng": 1}}
    module = {"model.connector.weight": torch.randn(4, 4)}

    def model_states(shape_only: bool) -> dict[str, Any]:
        return {
            "module": {k: torch.empty(0) if shape_only else v for k, v in module.items()},
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": [{"model.connector.weight": torch.Size([4, 4])}],
            "dp_world_size": world,
            "mp_world_size": 1,
            "ds_config": ds_config,
            "ds_version": "0.19.8",
            **client,
        }

    if stage == 3:  # every data-parallel rank writes its partition's model states
        for rank in range(world):
            torch.save(model_states(True), tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    else:  # data-parallel rank 0 writes the module
        torch.save(model_states(False), tag / "mp_rank_00_model_states.pt")
    prefix = "bf16_" if bf16 else ""
    for rank in range(world):
        optim = {"optimizer_state_dict": {"fp32_flat": torch.randn(8)}, "ds_version": "0.19.8"}
        torch.save(optim, tag / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        (path / script).write_text("# DeepSpeed's recovery script\n")
    (path / "latest").write_text("checkpoint")  # rank 0, after every other file
    return path


@pytest.mark.parametrize(("stage", "bf16"), [(1, False), (2, True), (3, False), (3, True)])
def test_deepspeed_folders_are_recognised_and_torn_ones_refused(
    tmp_path: Path, stage: int, bf16: bool
) -> None:
    whole = write_deepspeed_folder(tmp_path / "whole.ckpt", stage, bf16=bf16)
    assert checkpoints.is_deepspeed_checkpoint(whole)
    assert checkpoints.is_loadable(whole)
    tag = whole / "checkpoint"
    model_files = sorted(tag.glob("*model_states.pt"))
    optim_files = sorted(tag.glob("*optim_states.pt"))

    def torn(name: str, damage: Any) -> Path:
        folder = write_deepspeed_folder(tmp_path / f"{name}.ckpt", stage, bf16=bf16)
        damage(folder / "checkpoint")
        return folder

    # model states missing (a rank killed before writing), for stage 3 only the last rank's
    missing_model = torn("no_model", lambda t: (t / model_files[-1].name).unlink())
    # one rank's optimizer partition missing, or cut short mid-write
    missing_optim = torn("no_optim", lambda t: (t / optim_files[-1].name).unlink())

    def truncate(t: Path) -> None:
        target = t / optim_files[0].name
        target.write_bytes(target.read_bytes()[:100])

    truncated_optim = torn("cut_optim", truncate)
    for folder in (missing_model, missing_optim, truncated_optim):
        assert checkpoints.is_deepspeed_checkpoint(folder)
        assert not checkpoints.is_loadable(folder), folder.name
    # `latest` is written last: without it the save did not finish
    no_latest = torn("no_latest", lambda t: (t.parent / "latest").unlink())
    assert not checkpoints.is_loadable(no_latest)


def test_newest_loadable_picks_the_deepspeed_folder_and_falls_back_to_prev(
    tmp_path: Path,
) -> None:
    prev = write_deepspeed_folder(tmp_path / "last.ckpt.prev", 2, step=4)
    last = write_deepspeed_folder(tmp_path / "last.ckpt", 2, step=8)
    staged = write_deepspeed_folder(tmp_path / "last.ckpt.tmp", 2, step=12)
    older, newer = 1_700_000_000, 1_700_000_100
    os.utime(prev / "latest", (older, older))
    os.utime(last / "latest", (newer, newer))
    os.utime(staged / "latest", (newer + 100, newer + 100))  # an unfinished swap never wins
    assert checkpoints.newest_loadable(tmp_path) == last
    (last / "checkpoint" / "mp_rank_00_model_states.pt").unlink()  # torn
    assert checkpoints.newest_loadable(tmp_path) == prev


def test_zero_stage_and_the_offload_optimizer(compose_cfg: Any) -> None:
    assert zero_stage(_trainer(compose_cfg("trainer=deepspeed_zero2"))) == 2
    assert zero_stage(_trainer(compose_cfg("trainer=deepspeed_zero3"))) == 3
    assert zero_stage(_trainer(compose_cfg("trainer=deepspeed_zero3_offload"))) == 3
    assert zero_stage(_trainer(compose_cfg("trainer=ddp"))) is None
    assert zero_stage(_trainer(compose_cfg("trainer=fsdp_cpu"))) is None
    assert optimizer_class(_trainer(compose_cfg("trainer=deepspeed_zero3"))) is None  # torch AdamW
    assert optimizer_class(_trainer(compose_cfg("trainer=ddp"))) is None
    offload = _trainer(compose_cfg("trainer=deepspeed_zero3_offload"))
    if deepspeed_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        assert optimizer_class(offload) is DeepSpeedCPUAdam
    else:
        with pytest.raises(ConfigError, match=r"trainer\.deepspeed\.offload_optimizer"):
            optimizer_class(offload)


def test_gather_trainable_of_plain_parameters_is_unchanged(tiny_model: Any) -> None:
    model, _ = tiny_model
    for p in model.parameters():
        p.requires_grad_(False)
    model.connector.requires_grad_(True)
    out = checkpoints.gather_trainable(model)
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(out) == set(expected) and out
    for name, tensor in out.items():
        assert not checkpoints.is_zero3_parameter(expected[name])
        assert torch.equal(tensor, expected[name].detach())
    assert checkpoints.gather_trainable(model, keep=False) == {}


# ---- with DeepSpeed installed: real engines on CPU ----------------------------------------


def test_the_presets_are_valid_deepspeed_configs(compose_cfg: Any) -> None:
    _require_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    for preset in ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"):
        config = zero_config(_trainer(compose_cfg(f"trainer={preset}")), 16)
        # what Lightning adds (DeepSpeedStrategy._format_config) for bf16-mixed, accumulation 4
        config.update(
            {"bf16": {"enabled": True}, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0}
        )
        parsed = DeepSpeedConfig(config)  # pydantic models with extra="forbid": typos raise
        assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]
        offload = parsed.zero_config.offload_optimizer
        assert (offload is not None) == (preset == "deepspeed_zero3_offload")


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    import deepspeed
    import lightning as L
    from vlmlab import checkpoints
    from vlmlab.tracking.callbacks import GradNorm
    from vlmlab.training.deepspeed import deepspeed_strategy, deepspeed_strategy_class

    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    report = {}
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 2}

    class Tiny(L.LightningModule):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(0)
            self.frozen = torch.nn.Linear(8, 16)  # the "LLM": equal in every run
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(16, 4)  # the "connector": trains
            self.frozen.requires_grad_(False)
            self.strict_loading = False  # as VLMModule: checkpoints hold trainable weights only
        def training_step(self, batch, batch_idx):
            loss = self.head(self.frozen(batch)).pow(2).mean()
            self.log("train/loss", loss)
            return loss
        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    class OnCPU(deepspeed_strategy_class()):
        def setup_environment(self):  # the only CUDA-only guard; DeepSpeed runs on CPU + gloo
            from lightning.pytorch.strategies.ddp import DDPStrategy
            DDPStrategy.setup_environment(self)

    def trainer(max_steps):
        strategy = deepspeed_strategy(config, strategy_class=OnCPU,
                                      parallel_devices=[torch.device("cpu", 0)])  # DeepSpeed's rank
        report["config_copied"] = strategy.config is not config
        return L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=max_steps,
                         accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradNorm()])

    data = torch.utils.data.DataLoader(torch.randn(64, 8), batch_size=2)
    first = trainer(3)
    model = Tiny(1)
    first.fit(model, data)
    engine_norm = first.strategy.deepspeed_engine.get_global_grad_norm()
    report["engine_norm"] = float(engine_norm)
    report["logged_norm"] = float(first.callback_metrics.get("train/grad_norm", float("nan")))
    report["p_grad_empty"] = all(p.grad is None for p in model.parameters())
    report["numel"] = {n: p.numel() for n, p in model.named_parameters()}
    # the final-checkpoint path: full trainable weights, gathered from ZeRO-3 partitions
    gathered = checkpoints.gather_trainable(model)
    report["gathered"] = {n: list(t.shape) for n, t in gathered.items()}
    torch.save(gathered, out / "gathered.pt")
    ckpt = out / "resume" / "last.ckpt"
    first.save_checkpoint(ckpt)
    first.save_checkpoint(ckpt)  # the second save keeps the first as last.ckpt.prev
    report["entries"] = sorted(p.name for p in ckpt.parent.iterdir())
    report["loadable"] = [checkpoints.is_loadable(ckpt), checkpoints.is_loadable(ckpt.parent / "last.ckpt.prev")]
    report["newest"] = str(checkpoints.newest_loadable(ckpt.parent))
    states = sorted((ckpt / "checkpoint").glob("*model_states.pt"))
    report["saved_module_keys"] = sorted(torch.load(states[0], weights_only=False)["module"])
    report["files"] = sorted(p.name for p in (ckpt / "checkpoint").iterdir())
    # resume: a fresh model (other trainable init) continues from the newest loadable folder
    second = trainer(5)
    resumed = Tiny(2)
    second.fit(resumed, data, ckpt_path=str(checkpoints.newest_loadable(ckpt.parent)))
    report["resumed_step"] = second.global_step
    json.dump(report, open(out / "report.json", "w"))
    """
)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def engine_run(request: Any, tmp_path_factory: Any) -> dict[str, Any]:
    """One real Lightning + DeepSpeed fit on CPU per ZeRO stage (a subprocess: DeepSpeed sets
    up torch.distributed and global state)."""
    _require_deepspeed()
    out = tmp_path_factory.mktemp(f"ds{request.param}")
    script = out / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MASTER_PORT": str(29560 + request.param)}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(request.param)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((out / "report.json").read_text())
    report["stage"] = request.param
    report["out"] = out
    return report


def test_deepspeed_saves_are_atomic_trainable_only_and_resume(engine_run: dict[str, Any]) -> None:
    assert engine_run["config_copied"]
    assert engine_run["entries"] == ["last.ckpt", "last.ckpt.prev"]  # no .tmp left over
    assert engine_run["loadable"] == [True, True]
    assert engine_run["newest"].endswith("/last.ckpt")
    # exclude_frozen_parameters: the frozen "LLM" is not rewritten at every checkpoint
    assert engine_run["saved_module_keys"] == ["head.bias", "head.weight"]
    assert engine_run["resumed_step"] == 5


def test_zero3_final_weights_are_gathered(engine_run: dict[str, Any]) -> None:
    if engine_run["stage"] == 3:  # partitioned: the parameters themselves are empty
        assert engine_run["numel"]["head.weight"] == 0
    assert engine_run["gathered"] == {"head.weight": [4, 16], "head.bias": [4]}
    weights = torch.load(engine_run["out"] / "gathered.pt")
    assert all(t.abs().sum() > 0 for t in weights.values())


def test_grad_norm_comes_from_the_engine(engine_run: dict[str, Any]) -> None:
    assert engine_run["p_grad_empty"]  # why p.grad cannot be used under ZeRO
    assert engine_run["engine_norm"] > 0
    assert engine_run["logged_norm"] == pytest.approx(engine_run["engine_norm"], rel=1e-6)


def test_zero_offload_needs_deepspeeds_cpu_adam(compose_cfg: Any, tmp_path: Path) -> None:
    """DeepSpeed refuses torch AdamW with optimizer offload; `optimizer_class` gives what it
    accepts (DeepSpeedCPUAdam compiles its C++ kernel on first use: slow the first time)."""
    _require_deepspeed()
    config = zero_config(_trainer(compose_cfg("trainer=deepspeed_zero3_offload")), 16)
    config["zero_optimization"]["offload_param"]["pin_memory"] = False  # no CUDA host pinning
    config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = tmp_path / "offload.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            import torch
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
            import deepspeed
            from deepspeed.runtime.zero.utils import ZeRORuntimeException
            from vlmlab.config import compose
            from vlmlab.schema import TrainerConfig, typed
            from vlmlab.training.deepspeed import optimizer_class
            deepspeed.init_distributed("gloo")
            config = json.load(open(sys.argv[1]))
            cls = optimizer_class(typed(compose(["trainer=deepspeed_zero3_offload"]).trainer, TrainerConfig))
            result = {}
            for name, opt in (("torch", torch.optim.AdamW), ("ours", cls)):
                model = torch.nn.Linear(8, 4)
                try:
                    engine, *_ = deepspeed.initialize(
                        model=model, optimizer=opt(model.parameters(), lr=1e-3),
                        config=dict(config), model_parameters=list(model.parameters()))
                    loss = engine(torch.randn(2, 8)).pow(2).mean()
                    engine.backward(loss)
                    engine.step()
                    result[name] = "ok"
                except ZeRORuntimeException as err:
                    result[name] = str(err)[:80]
            result["cls"] = cls.__name__
            print(json.dumps(result))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "config.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"] == "DeepSpeedCPUAdam"
    assert "ZeRO-Offload with a client provided optimizer" in result["torch"]
    assert result["ours"] == "ok"


FAILING_SAVE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    out, rank, port = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import lightning as L
    from tests.helpers import save_twice_failing_on_rank_1
    from vlmlab.training.deepspeed import deepspeed_strategy, deepspeed_strategy_class

    config = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "train_micro_batch_size_per_gpu": 2}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(256, 256)
        def training_step(self, batch, batch_idx):
            return self.head(batch).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class OnCPU(deepspeed_strategy_class()):
        def setup_environment(self):
            from lightning.pytorch.strategies.ddp import DDPStrategy
            DDPStrategy.setup_environment(self)

    cpus = [torch.device("cpu", 0), torch.device("cpu", 1)]
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False,
                        strategy=deepspeed_strategy(config, strategy_class=OnCPU,
                                                    parallel_devices=cpus),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(8, 256), batch_size=2))
    save_twice_failing_on_rank_1(trainer, out)  # rank 1's ZeRO optimizer file fails
    """
)


@pytest.mark.slow
def test_a_save_failing_on_one_of_two_deepspeed_ranks_fails_every_rank(tmp_path: Path) -> None:
    """2 real DeepSpeed ZeRO-2 ranks on CPU; rank 1 cannot write its file of the second save.
    Before DeferredWrites both hung at DeepSpeed's barriers until killed; now every rank raises
    CheckpointWriteError naming the folder, the staged folder is removed and the first
    checkpoint stays complete and loadable."""
    _require_deepspeed()
    script = tmp_path / "failing_save.py"
    script.write_text(FAILING_SAVE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(rank), "29583"],
            env=env,
            stdout=subprocess.PIPE,  # a pipe: rank 1's file size limit must not hit its log
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in ranks:
        try:
            outputs.append(proc.communicate(timeout=240)[0])  # a hang ends here
        finally:
            for other in ranks:
                if other.poll() is None and proc.returncode is None:
                    other.kill()
    assert [proc.returncode for proc in ranks] == [3, 3], "\n".join(o[-3000:] for o in outputs)
    target = assert_every_rank_failed(tmp_path)
    assert checkpoints.is_loadable(target)  # the first save, whole
    assert (target / "latest").read_text() == "checkpoint"
    assert sorted(p.name for p in (target / "checkpoint").iterdir()) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
