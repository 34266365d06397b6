"""benchmarks/gpu_smoke.py: ready for the day a GPU is lent. On CPU it skips cleanly, every
preset's command composes into a valid config, and `--cpu-check` runs its own plumbing (the
probe callback, the result table) through real trainers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO
from vlmlab.config import compose

SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skips_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real smoke test")
    assert _script().main([]) == 0
    assert "skipped (no CUDA device" in capsys.readouterr().out


def test_every_preset_command_composes(tmp_path: Path) -> None:
    smoke = _script()
    table = smoke.presets(8, "flash_attention_2")
    assert set(table) == {
        "reference", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "2_lora", "2_qlora",
    }  # fmt: skip
    for name, overrides in table.items():
        command = smoke.command(name, overrides, tmp_path, 5, 989.0)
        assert command[1] == "train.py"
        cfg = compose(command[2:])
        assert cfg.trainer.max_steps == 5 and cfg.llm.config.hidden_size == 4096
        assert cfg.trainer.extra_callbacks[0]["_target_"] == "gpu_smoke.SmokeProbe"
        if name != "reference":
            assert cfg.trainer.precision == "bf16-mixed" and cfg.llm.dtype == "bfloat16"
            assert cfg.llm.attn_implementation == "flash_attention_2"
        else:
            assert cfg.trainer.precision == "32-true" and cfg.llm.dtype == "float32"


@pytest.mark.slow
def test_cpu_check_runs_the_plumbing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-check", "--steps", "5", "--root", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.endswith("  ok")]
    assert [r[0] for r in rows] == ["reference", "fsdp"]
    assert float(rows[1][-2]) == pytest.approx(1.0, abs=0.05)  # bf16 FSDP loss / fp32 loss
