"""AnyRes training across processes (issue 14, acceptance 3): `python train.py
encoder.image=anyres` with 2 CPU ranks under DDP and under FSDP (trainer=fsdp_cpu) on images of
14 shapes (1:4 to 4:1, 34 to 88 tokens each), text-only samples and one unusable 100:1 panorama
(a counted skip on whichever rank reads it). Each run completes; over the epoch every good
sample is trained exactly once across the ranks and both ranks run the same number of batches
(the wave-1 guarantees: uneven skips and grids must not make one rank wait for the other).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.test_anyres_data import _pixels, _save, write_mixed_shapes
from vlmlab.data.split import batches_per_rank

REPO = Path(__file__).resolve().parents[1]
SHARDS = [9, 7, 8, 9]  # 33 samples: 28 images, 4 text-only, 1 panorama


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(data.root for data=llava15 with the shards as its `instruct` set, the good ids)."""
    root = tmp_path_factory.mktemp("anyres_training")
    panorama = ("panorama.png", _save(_pixels((1000, 10), 4), "PNG"))
    _, sizes = write_mixed_shapes(root, root / "mix665k", SHARDS, extra=(panorama,))
    return root, sorted(sizes)


def _train(root: Path, data_root: Path, *overrides: str) -> None:
    """`python train.py` on the mixed shards (data=llava15 reads `data.root`/mix665k)."""
    env = {**os.environ, "VLMLAB_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        f"paths.root={root}",
        "data=llava15",
        f"data.root={data_root}",
        "data.num_workers=1",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "data.group_megabatch=2",
        "data.max_length=256",
        "encoder.image=anyres",
        "stage=2",
        "stage.init_from=null",
        "stage.evaluate=false",
        "stage.global_batch_size=8",
        "logger=none",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", [["trainer.strategy=ddp", "trainer.devices=2"], ["trainer=fsdp_cpu"]]
)
def test_anyres_mixed_shapes_train_exactly_once_on_two_ranks(
    mixed_data: tuple[Path, list[str]], tmp_path: Path, strategy: list[str]
) -> None:
    from vlmlab.training.audit import read_records

    data_root, good = mixed_data
    record = tmp_path / "samples.jsonl"
    _train(tmp_path, data_root, *strategy, f"debug.record_samples={record}")
    ranks = [read_records(record, rank) for rank in (0, 1)]
    planned = batches_per_rank(sum(SHARDS), 2, 4)
    assert [len(lines) for lines in ranks] == [planned, planned]  # equal batch counts
    trained = Counter(i for lines in ranks for line in lines for i in line["ids"])
    assert sorted(trained) == good and set(trained.values()) == {1}  # exactly once
    losses = [line["step_loss"] for lines in ranks for line in lines if "step_loss" in line]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, trained
    assert list((tmp_path / "checkpoints").glob("*/trainable.safetensors"))  # it completed
