"""Resume from FSDP2 sharded checkpoints that hold trainable weights only (slow, 2 ranks).

Checkpoints of a frozen-LLM stage must not rewrite the frozen model at every save
(`AtomicModelParallelStrategy.lightning_module_state_dict` ignores frozen parameters); the
load side must then read only those keys. A stage stopped after 2 steps and resumed to 4
must end on the weights of an uninterrupted 4-step run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_every_rank_failed, save_twice_failing_on_rank_1
from tests.test_scale import final_weights, run_train

RUN = (
    "trainer=fsdp_cpu",
    "llm.dtype=bfloat16",
    "trainer.precision=bf16-mixed",
    "stage=1",
    "stage.init_from=null",
    "stage.evaluate=false",
    "data.batch_size=4",
    "stage.global_batch_size=8",
    "checkpoint.every_n_steps=1",
    "logger=none",
)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Callable[[], Path]:
    """One 2-rank run stopped after 2 steps (its samples recorded), shared by the resume tests:
    each calls the returned function, which puts the run's root back as it was when it stopped
    and returns it (the same root: paths.root is part of the run key that resume=auto uses)."""
    root = tmp_path_factory.mktemp("fsdp") / "run"
    run_train(root, data_root, *RUN, *stop_run(root), "trainer.max_steps=2")
    kept = root.with_name("stopped")
    shutil.copytree(root, kept)

    def restore() -> Path:
        shutil.rmtree(root)
        shutil.copytree(kept, root)
        return root

    return restore


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """The same 2-rank run, not interrupted: its epoch of 6 steps."""
    root = tmp_path_factory.mktemp("fsdp") / "straight"
    run_train(root, data_root, *RUN, *stop_run(root))
    return root


def stop_run(root: Path) -> tuple[str, ...]:
    """The overrides the stopped run and every run compared with it share."""
    return ("data.num_workers=1", f"debug.record_samples={root / 'samples.jsonl'}")


def _steps(root: Path) -> dict[int, list[str]]:
    """The sample ids each optimizer step trained (over ranks and micro-batches), sorted."""
    from vlmlab.training.audit import read_records

    steps: dict[int, list[str]] = {}
    for record in read_records(root / "samples.jsonl"):
        steps.setdefault(record["step"], []).extend(record["ids"])
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.mark.slow
def test_fsdp_sharded_resume_of_a_frozen_llm_stage(
    stopped: Callable[[], Path], straight: Path, data_root: Path
) -> None:
    root = stopped()
    (last,) = root.glob("resume/*/last.ckpt")
    assert last.is_dir()
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    frozen_llm_bytes = 2 * 1_000_000  # the tiny bf16 LLM alone is ~1M parameters
    assert size < frozen_llm_bytes, size  # connector + optimizer state only
    for old in root.glob("checkpoints/*"):  # only the resumed run's final weights remain
        shutil.rmtree(old)
    run_train(root, data_root, *RUN, *stop_run(root), "resume=auto")
    expected, resumed = final_weights(straight), final_weights(root)
    assert expected.keys() == resumed.keys() and expected
    for key, tensor in expected.items():
        assert torch.equal(resumed[key], tensor), key


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_at_another_world_size(
    stopped: Callable[[], Path], straight: Path, data_root: Path
) -> None:
    """Stopped at 2 FSDP ranks after 2 steps, resumed at 1 rank with 2 workers (the shards
    re-split on load; data.elastic=exact: the one rank replays the 2-rank run's micro-batches,
    accumulation 2): every step trains the samples of the uninterrupted 2-rank run's step, and
    the weights equal its weights up to the order of fp32 reductions (2 ranks' reduce-scatter
    vs 2 accumulated micro-batches: measured max |diff| below 1e-8)."""
    root = stopped()
    assert (next(root.glob("resume/*/last.ckpt")) / "meta.pt").is_file()  # sharded
    for old in root.glob("checkpoints/*"):
        shutil.rmtree(old)
    resume = ("trainer.devices=1", "data.num_workers=2", "resume=auto")
    run_train(root, data_root, *RUN, *stop_run(root), *resume)
    steps = _steps(root)
    assert steps == _steps(straight) and len(steps) == 6
    assert sorted(i for ids in steps.values() for i in ids) == sorted(
        {i for ids in steps.values() for i in ids}
    )  # 48 samples, each once
    expected, resumed = final_weights(straight), final_weights(root)
    assert expected.keys() == resumed.keys() and expected
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


# ---- a sharded save that fails on one rank (slow, 2 gloo ranks) -------------------------------


def _save_fails_on_rank_1(out: Path) -> None:
    """Run as `python tests/test_fsdp_resume.py <out>` (Lightning relaunches it for rank 1).

    A tiny FSDP2 module saves a sharded checkpoint, then saves again with rank 1 limited to
    1 kB per file (RLIMIT_FSIZE: a real EFBIG from the kernel). Each rank writes what it raised.
    """
    import lightning as L
    from torch.distributed.fsdp import fully_shard

    from vlmlab.training.strategy import model_parallel_strategy

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(256, 256)

        def configure_model(self) -> None:
            assert self.device_mesh is not None
            fully_shard(self.layer, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            return self.layer(batch).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(torch.randn(4, 256), batch_size=2)

    strategy = model_parallel_strategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny())
    save_twice_failing_on_rank_1(trainer, out)


@pytest.mark.slow
def test_sharded_save_failing_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    """No rank waits at a barrier for a rank that gave up: all raise CheckpointWriteError
    naming the folder, the staged folder is removed and the previous checkpoint stays."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # the script imports `tests.`
        capture_output=True,
        text=True,
        timeout=240,  # a hang (the old behaviour) ends here
    )
    assert done.returncode != 0
    target = assert_every_rank_failed(tmp_path)
    assert (target / "meta.pt").is_file()  # the previous checkpoint is kept
    meta = torch.load(target / "meta.pt", weights_only=True)
    assert meta["global_step"] == 1


if __name__ == "__main__":
    import sys

    _save_fails_on_rank_1(Path(sys.argv[1]))
