"""Typed config at the edge: `schema.validate` rejects every misspelt key at once, names the
closest valid key, and accepts every shipped preset and every experiment x stage."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmlab import schema
from vlmlab.config import compose
from vlmlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# every config group folder of conf/ except hydra's own and the per-stage recipes
# conf/curate and conf/generate are `vlmlab curate`/`generate`'s own trees (their tests compose them)
GROUPS = sorted(
    p.name
    for p in CONF.iterdir()
    if p.is_dir() and p.name not in ("hydra", "recipe", "curate", "generate")
)
PRESETS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))
STAGES = sorted(f.stem for f in (CONF / "stage").glob("*.yaml"))

TYPOS = """# @package _global_
defaults:
  - demo
  - _self_
llm:
  tempalte: vicuna_v1
stage:
  optim:
    lrr: 1.0e-3
data:
  batchsize: 4
"""
EXPECTED = (
    "llm.tempalte: unknown key (did you mean 'template'?)",
    "stage.optim.lrr: unknown key (did you mean 'lr'?)",
    "data.batchsize: unknown key (did you mean 'batch_size'?)",
)


@pytest.fixture
def tmp_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of conf/ that `config.conf_dir()` (and `python train.py`) use via $VLMLAB_CONF."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    monkeypatch.setenv("VLMLAB_CONF", str(conf))
    return conf


def _base(tmp_path: Path) -> list[str]:
    return [f"paths.root={tmp_path}", "logger=none"]


def test_misspelt_keys_are_listed_at_once_with_closest_keys(tmp_conf: Path, tmp_path: Path) -> None:
    (tmp_conf / "experiment" / "typos.yaml").write_text(TYPOS)
    with pytest.raises(ConfigError) as err:
        compose([*_base(tmp_path), "experiment=typos", "stage=1"])
    message = str(err.value)
    for line in EXPECTED:
        assert line in message, message
    assert "3 config problem(s)" in message
    assert "conf/experiment/typos.yaml" in message


def test_train_py_exits_2_on_misspelt_keys_before_building(tmp_conf: Path, tmp_path: Path) -> None:
    (tmp_conf / "experiment" / "typos.yaml").write_text(TYPOS)
    root = tmp_path / "runs"
    env = {**os.environ, "VLMLAB_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=typos", "stage=1", "logger=none"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    for line in EXPECTED:
        assert line in output, output[-3000:]
    assert "Traceback" not in output
    # nothing was built or written: no checkpoints, no data, no resume state
    assert not (root / "checkpoints").exists() and not (root / "data").exists()
    assert not (root / "resume").exists()


@pytest.mark.parametrize(
    ("stage", "override", "key"),
    [
        ("2", "llm.template=vicuna_v2", "llm.template"),
        ("1", "stage.template=plane", "stage.template"),
    ],
)
def test_an_unknown_template_name_fails_before_any_model_is_built(
    stage: str, override: str, key: str, tmp_path: Path
) -> None:
    """A template name is a registry entry: a typo names the key and the closest template."""
    from vlmlab.train import train

    cfg = compose([*_base(tmp_path), f"stage={stage}", "logger=none", override])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.key == key
    assert ("vicuna_v1" if key == "llm.template" else "plain") in str(err.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()


def test_stage_overrides_in_an_experiment_points_to_recipes(tmp_conf: Path, tmp_path: Path) -> None:
    (tmp_conf / "experiment" / "old.yaml").write_text(
        "# @package _global_\nstage_overrides:\n  '1': {stage: {epochs: 2}}\n"
    )
    with pytest.raises(ConfigError, match=r"stage_overrides: .*conf/recipe/<experiment>/<stage>"):
        compose([*_base(tmp_path), "experiment=old"])


@pytest.mark.parametrize("group", sorted(schema.GROUP_SCHEMAS))
def test_a_typo_in_every_group_is_caught(group: str, tmp_path: Path) -> None:
    key = dataclasses.fields(schema.GROUP_SCHEMAS[group])[0].name
    typo = key[:-1] + key[-1] * 2 + "x"
    with pytest.raises(
        ConfigError, match=rf"{group}\.{typo}: unknown key \(did you mean '{key}'\?\)"
    ):
        compose([*_base(tmp_path), f"+{group}.{typo}=1"])


@pytest.mark.parametrize(
    "override",
    [
        "+stage.lora.rr=4",
        "+stage.param_groups.0.lrr=1",
        "+trainer.fsdp.wrapp=[llm]",
        "+trainer.deepspeed.stagee=2",
        "+data.generator.num_imagess=4",
        "+data.heldout.batchsize=4",
        "+encoder.transform.aspectt=pad",
        "+checkpoint.every_n_step=5",
        "+seeed=1",
    ],
)
def test_nested_typos_are_caught(override: str, tmp_path: Path) -> None:
    extra = {
        "+stage.lora.rr=4": ["stage=2_lora"],
        "+stage.param_groups.0.lrr=1": ["stage=2_lora"],
        "+trainer.fsdp.wrapp=[llm]": ["trainer=fsdp_cpu"],
        "+trainer.deepspeed.stagee=2": ["trainer=deepspeed_zero2"],
    }.get(override, [])
    key = override.removeprefix("+").split("=")[0].replace(".0.", "[0].")
    with pytest.raises(ConfigError, match=re.escape(f"{key}: unknown key")):
        compose([*_base(tmp_path), *extra, override])


def test_free_form_nodes_take_any_key(tmp_path: Path) -> None:
    cfg = compose(
        [
            *_base(tmp_path),
            "+llm.config.rope_scaling={type: linear, factor: 2.0}",
            "+llm.tokenizer.legacy=false",
            "+encoder.timm_kwargs.dynamic_img_size=true",
            "+trainer.limit_val_batches=0",  # any other lightning.Trainer argument
        ]
    )
    assert cfg.llm.tokenizer.legacy is False


def test_trainer_keys_vlmlab_sets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs: set by vlmlab.*stage\.epochs"):
        compose([*_base(tmp_path), "+trainer.max_epochs=3"])


def test_connector_keys_come_from_its_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose([*_base(tmp_path), "connector=resampler", "+connector.num_querys=8"])
    assert "connector.num_querys: unknown key (did you mean 'num_queries'?)" in str(err.value)
    with pytest.raises(ConfigError, match=r"connector\.in_features: set by vlmlab"):
        compose([*_base(tmp_path), "+connector.in_features=8"])


def test_a_new_connector_needs_no_schema_edit(
    tmp_conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "scaled_connector.py").write_text(
        "from torch import nn\n\n"
        "class ScaledConnector(nn.Module):\n"
        "    def __init__(self, in_features: int, out_features: int, gain: float = 1.0) -> None:\n"
        "        super().__init__()\n"
        "        self.proj = nn.Linear(in_features, out_features)\n"
        "        self.gain = gain\n"
    )
    monkeypatch.syspath_prepend(str(package))
    (tmp_conf / "connector" / "scaled.yaml").write_text(
        "_target_: scaled_connector.ScaledConnector\ngain: 2.0\ninit_seed: 0\n"
    )
    assert compose([*_base(tmp_path), "connector=scaled"]).connector.gain == 2.0
    with pytest.raises(ConfigError, match=r"connector.gian: unknown key \(did you mean 'gain'\?\)"):
        compose([*_base(tmp_path), "connector=scaled", "+connector.gian=1"])


@pytest.mark.parametrize(("group", "option"), PRESETS, ids=[f"{g}={o}" for g, o in PRESETS])
def test_every_shipped_preset_validates(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose([*_base(tmp_path), f"{group}={option}"])  # compose validates
    assert schema.problems(cfg) == []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_x_stage_validates(experiment: str, tmp_path: Path) -> None:
    for stage in STAGES:
        cfg = compose([*_base(tmp_path), f"experiment={experiment}", f"stage={stage}"])
        assert cfg.stage.name == stage
        assert "stage_overrides" not in cfg


def _parent_experiments(name: str) -> list[str]:
    data = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()) or {}
    return [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]


def _recipes(name: str) -> set[str]:
    return {f.stem for f in (CONF / "recipe" / name).glob("*.yaml")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_built_on_another_keeps_its_recipes(experiment: str) -> None:
    """Recipes are chosen by the experiment's own name: one built on another must carry them."""
    for parent in _parent_experiments(experiment):
        missing = _recipes(parent) - _recipes(experiment)
        assert not missing, f"conf/recipe/{experiment}/ lacks {sorted(missing)} of {parent}"


def test_recipe_folders_name_real_experiments_and_stages() -> None:
    for folder in (CONF / "recipe").iterdir():
        assert folder.name in EXPERIMENTS, folder
        assert _recipes(folder.name) <= set(STAGES), folder


# ---------------------------------------------------- the schema agrees with the code's own sets
def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_schema_matches_the_sets_the_code_checks() -> None:
    from vlmlab.data.shapes import ShapesSpec
    from vlmlab.models.image_transform import ImageTransform

    assert _fields(schema.GeneratorConfig) == {f.name for f in dataclasses.fields(ShapesSpec)}
    assert _fields(schema.ImageTransformConfig) == {
        f.name for f in dataclasses.fields(ImageTransform)
    } - {"size"}


def test_encoder_schema_is_what_either_backend_takes() -> None:
    from vlmlab.models.encoder import VLM_KEYS, HFVisionEncoder
    from vlmlab.models.timm_encoder import TimmVisionEncoder

    takes = set()
    for cls in (HFVisionEncoder, TimmVisionEncoder):
        takes |= set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert _fields(schema.EncoderConfig) == takes | {"_target_", "backend", *VLM_KEYS}


def test_trainer_schema_covers_lightning_trainer() -> None:
    import lightning as L

    from vlmlab.training import strategy

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    own = set(strategy.LIGHTNING_FIELDS)
    assert own <= _fields(schema.TrainerConfig) and own <= accepted
    assert schema.TrainerConfig.PASSTHROUGH | set(schema.TrainerConfig.RESERVED) | own == accepted
    # the other fields are vlmlab's and never reach L.Trainer
    ours = _fields(schema.TrainerConfig) - own
    assert ours == {
        "fsdp",
        "deepspeed",
        "peak_tflops",
        "emulate_ranks",
        "fail_after_nonfinite_steps",
        "extra_callbacks",
        "lightning",
    }


def test_code_below_the_entry_gets_typed_trainer_settings(compose_cfg: Any) -> None:
    """Lightning arguments given straight through are collected, vlmlab's own keys never
    reach L.Trainer, and a block the preset leaves out has the schema's defaults."""
    from vlmlab.training import strategy

    cfg = compose_cfg("trainer=fsdp_cpu", "+trainer.num_sanity_val_steps=0", tiny_data=False)
    trainer = schema.typed(cfg.trainer, schema.TrainerConfig)
    assert trainer.lightning == {"num_sanity_val_steps": 0}
    assert isinstance(trainer.fsdp, schema.FsdpConfig) and trainer.fsdp.wrap == ["llm", "encoder"]
    kwargs = strategy.trainer_kwargs(trainer, micro_batch=2)
    assert kwargs["num_sanity_val_steps"] == 0 and kwargs["devices"] == 2
    assert not set(kwargs) & {"fsdp", "deepspeed", "peak_tflops", "emulate_ranks", "lightning"}
    assert strategy.fsdp_settings(schema.TrainerConfig(strategy="fsdp")).wrap == ["llm", "encoder"]
    with pytest.raises(ConfigError, match=r"trainer\.fsdp\.wrap"):
        strategy.fsdp_settings(schema.typed({"fsdp": {"wrap": ["vision"]}}, schema.TrainerConfig))
