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

REPO = Path(__file__).resolve().parents[1]

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
