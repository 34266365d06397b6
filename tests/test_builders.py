"""The recipe's builders on their own: a data-source kind and a logger are chosen from YAML
(a new one is one module + one YAML), and `build_callbacks` leaves rank-0 generation out when
weights are sharded."""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.conftest import REPO
from vlmlab.data.prepare import resolve_dataset
from vlmlab.errors import ConfigError
from vlmlab.schema import DataConfig, EvalConfig, typed
from vlmlab.train import train

PACKAGE = "vlmlab_ext_sources"

FLAT_SOURCE = '''
from pathlib import Path


class FlatSource:
    """Shard folders named by `data.sets`, under `data.root` (no generation, no held-out)."""

    def __init__(self, data_cfg):
        self.root = Path(data_cfg.root)
        self.sets = dict(data_cfg.sets)

    def set_dir(self, name, key):
        return self.root / self.sets[name]

    def resolve(self, dataset):
        return {
            "shard_dir": self.set_dir(dataset, "stage.dataset"),
            "sources": None,
            "heldout": None,
            "image_root": None,
            "prepare": None,
            "synthetic_root": None,
        }
'''

CSV_LOGGER = """
from lightning.pytorch.loggers import CSVLogger


def create(settings, run):
    return CSVLogger(save_dir=str(run.root / "csv"), name=settings.experiment_name)
"""


@pytest.fixture
def extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of conf/ (VLMLAB_CONF) and a temp package on sys.path."""
    root = tmp_path / "ext"
    shutil.copytree(REPO / "conf", root / "conf")
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("VLMLAB_CONF", str(root / "conf"))
    yield root
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_a_new_data_source_is_one_module_and_one_yaml(
    extension: Path, compose_cfg: Callable[..., DictConfig], data_root: Path
) -> None:
    shapes = resolve_dataset(typed(compose_cfg().data, DataConfig), "align")
    assert shapes["prepare"] is not None
    shards = Path(shapes["prepare"]()) / "shards"  # the tiny shapes shards, as a plain folder
    (extension / PACKAGE / "flat.py").write_text(textwrap.dedent(FLAT_SOURCE))
    (extension / "conf" / "data" / "flat.yaml").write_text(
        textwrap.dedent(f"""\
            defaults:
              - tiny
              - _self_
            name: flat
            _target_: {PACKAGE}.flat.FlatSource
            sets: {{align: align, instruct: instruct}}
            """)
    )
    cfg = compose_cfg("data=flat", f"data.root={shards}", "stage=1", "logger=none")
    dataset = resolve_dataset(typed(cfg.data, DataConfig), "align")
    assert dataset["shard_dir"] == shards / "align" and dataset["heldout"] is None
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"]) and result["complete"]

    bad = compose_cfg("data=flat", f"data._target_={PACKAGE}.flat.NoSuchSource")
    with pytest.raises(ConfigError, match=r"data\._target_"):
        resolve_dataset(typed(bad.data, DataConfig), "align")


def test_a_logger_is_chosen_by_kind_from_yaml(
    extension: Path, compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    (extension / PACKAGE / "csvlog.py").write_text(textwrap.dedent(CSV_LOGGER))
    (extension / "conf" / "logger" / "csv.yaml").write_text(
        f"kind: {PACKAGE}.csvlog.create\nexperiment_name: ext\nsamples: 0\n"
    )
    result = train(compose_cfg("logger=csv", "stage=1", "connector=linear"))
    (metrics,) = (tmp_path / "csv" / "ext").glob("version_*/metrics.csv")
    assert "train/loss" in metrics.read_text().splitlines()[0]
    assert "stage.optim.lr" in (metrics.parent / "hparams.yaml").read_text()
    assert result["checkpoint"] is not None

    with pytest.raises(ConfigError, match=r"logger\.kind.*'mlflow', 'none'"):
        train(compose_cfg("logger.kind=wandb", "stage=1"))


@pytest.mark.parametrize("sharded", [False, True])
def test_build_callbacks_orders_eval_before_its_logging_and_skips_it_when_sharded(
    tiny_model: tuple, compose_cfg: Callable[..., DictConfig], tmp_path: Path, sharded: bool
) -> None:
    from vlmlab.eval.callback import BenchmarkEval, SampleAnswers
    from vlmlab.tracking.callbacks import LogEvalResults, LogSamples
    from vlmlab.train import CallbackSettings, build_callbacks

    model, _ = tiny_model
    settings = CallbackSettings(
        resume_dir=tmp_path / "resume",
        run_key="k",
        every_n_steps=5,
        sharded=sharded,
        tracked=True,
        eval_dir=tmp_path / "eval",
        evaluate=True,
        eval=typed(compose_cfg("eval=tiny").eval, EvalConfig),
        samples=2,
    )
    dataset = {
        "shard_dir": tmp_path,
        "sources": None,
        "heldout": tmp_path / "heldout.json",
        "image_root": tmp_path,
        "prepare": None,
        "synthetic_root": tmp_path,
    }
    built = build_callbacks(settings, model, None, dataset)  # type: ignore[arg-type]
    kinds = [type(c) for c in built.callbacks]
    if sharded:  # rank-0-only generation would hang the other ranks' gathers
        assert built.evaluation is None
        assert not {BenchmarkEval, LogEvalResults, SampleAnswers, LogSamples} & set(kinds)
    else:  # each result is logged by the tracking callback placed right after its producer
        assert isinstance(built.evaluation, BenchmarkEval)
        assert kinds.index(LogEvalResults) == kinds.index(BenchmarkEval) + 1
        assert kinds.index(LogSamples) == kinds.index(SampleAnswers) + 1
    assert built.callbacks[-1] is built.recorder  # no extra callbacks configured


def test_typed_data_settings_nest_their_groups(compose_cfg: Callable[..., DictConfig]) -> None:
    from vlmlab.schema import DataConfig, HeldoutConfig, MixtureSourceConfig

    data = typed(compose_cfg("data=tiny_mix").data, DataConfig)
    assert isinstance(data.heldout, HeldoutConfig) and data.heldout.max_samples == 12
    assert data.mixtures is not None
    (vqa, *_) = data.mixtures["instruct"]
    assert isinstance(vqa, MixtureSourceConfig) and (vqa.set, vqa.weight) == ("instruct", 0.5)
    assert (data.batch_size, data.group_by_length, data.mixture_size) == (8, True, 40)
