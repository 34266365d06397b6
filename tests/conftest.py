"""Shared fixtures: configs composed in-process with Hydra's compose API, tiny real data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads in tests, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# One torch thread per process (inherited by every train.py the tests start): the suite runs in
# 2 xdist workers on 2 cores, each often with a subprocess or 2 DDP ranks, and 2 spinning OpenMP
# threads per process oversubscribe the cores (measured: the demo test 759 s instead of ~200 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

REPO = Path(__file__).resolve().parents[1]

# The longest files first (measured with --durations), so that under `-n 2 --dist loadfile
# --no-loadscope-reorder` the long ones overlap with the many short ones instead of ending last.
LONG_FIRST = (
    "test_cli.py",  # the demo, end to end
    "test_sweeps.py",
    "test_tracking_outage.py",
    "test_fsdp_resume.py",
    "test_module_paths.py",
    "test_epoch_resume.py",
    "test_scale.py",
    "test_packing.py",
    "test_faults.py",
    "test_elastic_resume.py",
    "test_stage_recipes.py",
    "test_precision.py",
    "test_nonfinite.py",
    "test_generate_data.py",
    "test_gpu_smoke.py",
    "test_disk_full.py",
    "test_safe_loading.py",
    "test_anyres_training.py",
    "test_deepspeed.py",
    "test_slurm.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of LONG_FIRST first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))


# Small but real: 48 images -> 3 shards per set, 12 held-out questions.
TINY_DATA = [
    "data.generator.num_images=48",
    "data.generator.num_heldout=12",
    "data.samples_per_shard=16",
    "data.batch_size=8",
    "data.shuffle_buffer=16",
    "data.heldout.max_samples=12",
    "stage.global_batch_size=8",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri() -> object:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI into os.environ; keep tests isolated."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated tiny shapes dataset shared by the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def compose_cfg(tmp_path: Path, data_root: Path) -> Callable[..., DictConfig]:
    """compose_cfg(*overrides): the config `python train.py <overrides>` would run, rooted in tmp."""
    from vlmlab.config import compose

    def _compose(*overrides: str, tiny_data: bool = True) -> DictConfig:
        base = [f"paths.root={tmp_path}", f"data.root={data_root}"]
        return compose([*base, *(TINY_DATA if tiny_data else []), *overrides])

    return _compose


@pytest.fixture
def tiny_model(compose_cfg: Callable[..., DictConfig]):
    """A real random-init tiny VLM (CLIP-style encoder, MLP connector, Llama) and its tokenizer."""
    from vlmlab.models import build_vlm

    cfg = compose_cfg()
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm)
