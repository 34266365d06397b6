"""Resume from FSDP2 sharded checkpoints that hold trainable weights only (slow, 2 ranks).

Checkpoints of a frozen-LLM stage must not rewrite the frozen model at every save
(`AtomicModelParallelStrategy.lightning_module_state_dict` ignores frozen parameters); the
load side must then read only those keys. A stage stopped after 2 steps and resumed to 4
must end on the weights of an uninterrupted 4-step run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_fsdp_sharded_resume_of_a_frozen_llm_stage(tmp_path: Path, data_root: Path) -> None:
    run_train(tmp_path / "straight", data_root, *RUN, "trainer.max_steps=4")
    stopped = tmp_path / "stopped"
    run_train(stopped, data_root, *RUN, "trainer.max_steps=2")
    (last,) = stopped.glob("resume/*/last.ckpt")
    assert last.is_dir()
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    frozen_llm_bytes = 2 * 1_000_000  # the tiny bf16 LLM alone is ~1M parameters
    assert size < frozen_llm_bytes, size  # connector + optimizer state only
    for old in stopped.glob("checkpoints/*"):  # only the resumed run's final weights remain
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    run_train(stopped, data_root, *RUN, "trainer.max_steps=4", "resume=auto")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(stopped)
    assert straight.keys() == resumed.keys() and straight
    for key, tensor in straight.items():
        assert torch.equal(resumed[key], tensor), key
