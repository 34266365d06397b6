"""The Hydra config tree: every option composes and resolves; CLI choice handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from vlmlab.config import conf_dir, quote_numeric_choices

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = [
    "encoder",
    "connector",
    "llm",
    "stage",
    "data",
    "trainer",
    "logger",
    "paths",
    "experiment",
]
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def _resolve(cfg: DictConfig) -> dict:
    """Resolve everything but the `hydra` node (it holds runtime-only interpolations)."""
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def test_conf_dir_is_this_repo() -> None:
    assert conf_dir() == CONF.resolve()
    # the group registry is what the tests iterate: no group is empty
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), group
    assert ("stage", "1") in OPTIONS and ("stage", "2") in OPTIONS and ("stage", "lm") in OPTIONS


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(compose_cfg, group: str, option: str) -> None:
    # tiny_data=False: the shapes-only TINY_DATA overrides do not apply to other data sets
    cfg = compose_cfg(f"{group}={option}", tiny_data=False)
    assert cfg.hydra.runtime.choices[group] == option
    job = _resolve(cfg)
    assert "hydra" not in job
    assert {"encoder", "connector", "llm", "stage", "data", "trainer", "logger", "paths"} <= set(
        job
    )
    if group == "stage":
        assert job["stage"]["name"] == option
        assert isinstance(job["stage"]["name"], str)
        assert job["stage"]["train"]
        if option in ("2", "lm"):
            assert job["stage"]["template"] == job["llm"]["template"]
    if group == "encoder":
        assert job["encoder"]["_target_"] == "vlmlab.models.encoder.build_encoder"
    if group == "connector":
        assert job["connector"]["_target_"].startswith("vlmlab.models.connectors.")
    if group == "llm":
        assert job["llm"]["config"]["model_type"] in {"llama", "mistral", "qwen2", "phi3"}


@pytest.mark.parametrize(
    ("overrides", "previous"),
    [((), None), (("experiment=demo",), "lm"), (("llm.warmup_stage=lm",), "lm")],
)
def test_stage1_previous_follows_llm_warmup_stage(compose_cfg, overrides, previous) -> None:
    job = _resolve(compose_cfg(*overrides, "stage=1"))
    assert job["stage"]["previous"] == previous


def test_paths_are_rooted_in_paths_root(compose_cfg, tmp_path: Path) -> None:
    job = _resolve(compose_cfg(tiny_data=False))
    assert job["paths"]["root"] == str(tmp_path)
    assert job["paths"]["data_dir"] == f"{tmp_path}/data"


def test_quote_numeric_choices() -> None:
    got = quote_numeric_choices(["stage=2", "stage=1,2", "seed=1,2", "connector=mlp"])
    assert got == ["stage='2'", "stage='1','2'", "seed=1,2", "connector=mlp"]
    assert quote_numeric_choices(["+stage=1", "data.batch_size=4", "stage=lm"]) == [
        "+stage='1'",
        "data.batch_size=4",
        "stage=lm",
    ]


def _train_py(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLMLAB_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("VLMLAB_CONF", None)
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_py_prints_job_config(tmp_path: Path) -> None:
    proc = _train_py("connector=mlp", "stage=2", "--cfg", "job", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "connector:" in proc.stdout
    assert "name: '2'" in proc.stdout
    assert "vlmlab.models.connectors.mlp.MLPConnector" in proc.stdout
    printed = OmegaConf.create(proc.stdout)
    assert printed.stage.name == "2"
    assert printed.stage.title == "instruct"
    assert "hydra" not in printed
    assert not any(tmp_path.iterdir()), "--cfg job must not run anything"


def test_train_py_rejects_unknown_choice(tmp_path: Path) -> None:
    proc = _train_py("connector=mpl", "--cfg", "job", tmp_path=tmp_path)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "mpl" in output
    assert "linear" in output and "mlp" in output
    assert "connector:" not in proc.stdout


def _demo_recipe(stage: str) -> tuple[float, int]:
    """(lr, epochs) that conf/recipe/demo/<stage>.yaml (the demo's per-stage delta) declares."""
    delta = OmegaConf.load(CONF / "recipe" / "demo" / f"{stage}.yaml").stage
    return delta.optim.lr, delta.epochs


@pytest.mark.parametrize("stage", ["lm", "1", "2"])
def test_demo_recipe_is_picked_per_stage(compose_cfg, stage: str) -> None:
    lr, epochs = _demo_recipe(stage)
    own = OmegaConf.load(CONF / "stage" / f"{stage}.yaml")
    assert lr != own.optim.lr  # the recipe really overrides the stage's own default
    cfg = compose_cfg("experiment=demo", f"stage={stage}")
    assert cfg.stage.name == stage
    assert cfg.stage.epochs == epochs
    assert cfg.stage.optim.lr == pytest.approx(lr)
    # the rest of the stage's optim is kept
    assert cfg.stage.optim.schedule == own.optim.schedule
    assert cfg.llm.warmup_stage == "lm"


def test_demo_stage2_values(compose_cfg) -> None:
    cfg = compose_cfg("experiment=demo", "stage=2")
    assert cfg.stage.epochs == 4
    assert cfg.stage.optim.lr == pytest.approx(1.5e-3)
    assert cfg.stage.template == "vicuna_v1"
    assert cfg.hydra.runtime.choices["experiment"] == "demo"


def test_command_line_wins_over_the_experiments_stage_values(compose_cfg) -> None:
    """The recipe is composed before the command line: `stage.epochs=1` is what runs."""
    assert compose_cfg("experiment=demo", "stage=1").stage.epochs == 3
    cfg = compose_cfg("experiment=demo", "stage=1", "stage.epochs=1")
    assert cfg.stage.epochs == 1
    assert cfg.stage.optim.lr == pytest.approx(3.0e-3)  # the rest of the recipe still applies


def test_a_sweep_over_stages_picks_each_stages_recipe(compose_cfg) -> None:
    """`-m experiment=demo stage=1,2`: Hydra's sweeper splits the jobs, each composes its recipe."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        quote_numeric_choices(["experiment=demo", "stage=1,2"])
    )
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    got = {}
    for job in jobs:
        cfg = compose_cfg(*job)
        got[cfg.stage.name] = (cfg.stage.epochs, cfg.stage.optim.lr)
    assert got == {"1": (3, pytest.approx(3.0e-3)), "2": (4, pytest.approx(1.5e-3))}


@pytest.mark.parametrize(("stage", "batch_size"), [("1", 32), ("2", 16)])
def test_cfg_job_prints_the_stage_values_that_run(
    tmp_path: Path, stage: str, batch_size: int
) -> None:
    proc = _train_py("experiment=llava15_7b", f"stage={stage}", "--cfg", "job", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.data.batch_size == batch_size
    assert "stage_overrides" not in printed
