"""GPU smoke run of every training path users take, next to an fp32 reference.

    python benchmarks/gpu_smoke.py                 # all presets, N=30 steps each
    python benchmarks/gpu_smoke.py --only fsdp ddp --steps 10
    python benchmarks/gpu_smoke.py --dry-run       # print the commands (works on CPU)

Each preset trains a LLaVA-shaped small model (CLIP ViT-L/14-336 shapes with 4 layers, the
LLaVA-1.5 MLP connector, a 4-layer Llama at Vicuna-7B width and vocabulary) from random init
on the synthetic shapes data, stage 2 (connector + LLM), bf16 weights with `bf16-mixed`,
flash-attention 2 when the flash_attn package is there (else SDPA). One row per preset:
step time, peak GPU memory, MFU and the loss after N steps; the first row is the fp32
reference (32-true, SDPA, one GPU) measured in the same run, and every loss is shown as a
ratio to it. A preset that cannot run here (deepspeed or bitsandbytes missing) is listed as
skipped with the reason. Without a CUDA device the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# LLaVA-shaped, small: real widths, few layers, random init (no network).
MODEL = [
    "encoder=clip336",
    "encoder.pretrained=false",
    "encoder.config.num_hidden_layers=4",
    "encoder.dtype=bfloat16",
    "connector=mlp",
    "llm=tiny",
    "llm.dtype=bfloat16",
    "llm.config.hidden_size=4096",
    "llm.config.intermediate_size=11008",
    "llm.config.num_hidden_layers=4",
    "llm.config.num_attention_heads=32",
    "llm.config.num_key_value_heads=32",
    "llm.config.max_position_embeddings=4096",
    "llm.config.vocab_size=32064",
]
COMMON = [
    "stage.init_from=null",
    "stage.evaluate=false",
    "stage.optim.lr=2e-5",
    "stage.gradient_checkpointing=true",
    "data=shapes",
    "data.max_length=1024",
    "data.batch_size=8",
    "data.num_workers=2",
    "data.samples_per_shard=100",  # 20 shards: 8 GPUs x 2 workers each get one
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
]


def presets(devices: int, attn: str) -> dict[str, list[str]]:
    """name -> overrides; `reference` first (fp32, one GPU)."""
    bf16 = ["trainer.precision=bf16-mixed", f"llm.attn_implementation={attn}"]
    world = [f"trainer.devices={devices}", f"stage.global_batch_size={8 * devices}"]
    return {
        "reference": [
            "stage=2",
            "trainer=gpu",
            "trainer.devices=1",
            "stage.global_batch_size=8",
            "trainer.precision=32-true",
            "llm.dtype=float32",
            "encoder.dtype=float32",
            "llm.attn_implementation=sdpa",
        ],
        "ddp": ["stage=2", "trainer=ddp", *world, *bf16],
        "fsdp": ["stage=2", "trainer=fsdp", *world, *bf16],
        "deepspeed_zero2": ["stage=2", "trainer=deepspeed_zero2", *world, *bf16],
        "deepspeed_zero3": ["stage=2", "trainer=deepspeed_zero3", *world, *bf16],
        "2_lora": ["stage=2_lora", "trainer=ddp", *world, *bf16],
        # QLoRA quantizes pretrained weights: a random-init copy saved by `save_base_llm`
        "2_qlora": ["stage=2_qlora", "trainer=ddp", *world, *bf16, "llm.pretrained=true"],
    }


def save_base_llm(folder: Path) -> None:
    """The small LLM of MODEL, random init, saved as a pretrained folder (QLoRA loads it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return
    numbers = {
        o.split("=")[0].split(".")[-1]: o.split("=")[1]
        for o in MODEL
        if o.startswith("llm.config.")
    }
    config = AutoConfig.for_model("llama", **{k: int(v) for k, v in numbers.items()})
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)


def missing(name: str) -> str | None:
    """Why a preset can't run on this machine, or None."""
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed (pip install deepspeed)"
    if name == "2_qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed (pip install bitsandbytes)"
    return None


class SmokeProbe:
    """Lightning callback (built by Hydra from trainer.extra_callbacks): optimizer-step times,
    peak GPU memory, the last loss and MFU, written by rank 0 to `out` as JSON."""

    def __new__(cls, out: str) -> Any:
        import lightning as L
        import torch

        class _Probe(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.last_step = -1

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if trainer.global_step != self.last_step:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    self.times.append(time.perf_counter())
                    self.last_step = trainer.global_step

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                if not trainer.is_global_zero:
                    return
                gaps = [b - a for a, b in zip(self.times, self.times[1:])][3:]  # warm-up out
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
                Path(out).write_text(
                    json.dumps(
                        {
                            "steps": trainer.global_step,
                            "step_s": sum(gaps) / len(gaps) if gaps else float("nan"),
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30
                            if torch.cuda.is_available()
                            else float("nan"),
                            "loss": metrics.get("train/loss", float("nan")),
                            "mfu": metrics.get("perf/mfu", float("nan")),
                        }
                    )
                )

        return _Probe()


CPU_MODEL = [
    "llm.dtype=bfloat16",
    "encoder.dtype=bfloat16",
    "data.generator.num_images=64",
    "data.samples_per_shard=8",
]
CPU_REF = ["llm.dtype=float32", "encoder.dtype=float32", "stage.global_batch_size=8"]


def command(
    name: str,
    overrides: list[str],
    root: Path,
    steps: int,
    peak: float,
    model: list[str] = MODEL,
) -> list[str]:
    out = root / f"{name}.json"
    probe = f"[{{_target_:gpu_smoke.SmokeProbe,out:'{out}'}}]"
    return [
        sys.executable,
        "train.py",
        *COMMON,
        *model,
        *overrides,
        f"paths.root={root / name}",
        f"data.root={root / 'data'}",
        f"trainer.max_steps={steps}",
        f"trainer.peak_tflops={peak}",
        f"trainer.extra_callbacks={probe}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None, help="preset names (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 bf16 dense")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per preset")
    parser.add_argument("--root", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument(
        "--cpu-check",
        action="store_true",
        help="the script's own plumbing on CPU: tiny model, reference vs 2-rank fsdp_cpu",
    )
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    devices = min(torch.cuda.device_count(), 8) if cuda else 2
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    table = presets(devices, attn)
    model = MODEL
    if args.cpu_check:  # tiny model, CPU trainers: checks this script, not a GPU
        cuda, model = True, CPU_MODEL
        table = {
            "reference": ["stage=2", "trainer=cpu", "trainer.precision=32-true", *CPU_REF],
            "fsdp": [
                "stage=2",
                "trainer=fsdp_cpu",
                "trainer.precision=bf16-mixed",
                "stage.global_batch_size=16",
            ],
        }
    names = [
        "reference",
        *[n for n in table if n != "reference" and (not args.only or n in args.only)],
    ]
    root = Path(args.root or tempfile.mkdtemp(prefix="vlmlab-gpu-smoke-"))
    if args.dry_run:
        for name in names:
            print(shlex.join(command(name, table[name], root, args.steps, args.peak_tflops, model)))
        return 0
    if not cuda:
        print("gpu_smoke: skipped (no CUDA device on this machine)")
        return 0
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    device = "CPU (--cpu-check)" if args.cpu_check else torch.cuda.get_device_name(0)
    print(f"gpu_smoke: {device} x{devices}, attention {attn}, {args.steps} steps, root {root}")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        why = missing(name)
        if why:
            rows[name] = {"status": f"skipped: {why}"}
            continue
        started = time.time()
        overrides = table[name]
        if name == "2_qlora":
            save_base_llm(root / "base_llm")
            overrides = [*overrides, f"llm.name_or_path={root / 'base_llm'}"]
        try:
            proc = subprocess.run(
                command(name, overrides, root, args.steps, args.peak_tflops, model),
                cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            rows[name] = {"status": f"TIMEOUT after {args.timeout}s"}
            continue
        result = root / f"{name}.json"
        if proc.returncode != 0 or not result.is_file():
            output = proc.stdout + proc.stderr
            (root / f"{name}.log").write_text(output)
            errors = (
                [ln for ln in output.splitlines() if "rror" in ln] or output.splitlines() or ["?"]
            )
            last = errors[-1]
            rows[name] = {"status": f"FAILED rc={proc.returncode}: {last[:160]}"}
            continue
        rows[name] = {
            "status": "ok",
            **json.loads(result.read_text()),
            "wall_s": time.time() - started,
        }
        print(f"  {name}: done in {rows[name]['wall_s']:.0f}s", flush=True)
    ref_loss = rows.get("reference", {}).get("loss")
    print(
        f"\n{'preset':<18}{'step s':>9}{'peak GiB':>10}{'MFU':>8}{'loss':>9}{'/ fp32':>8}  status"
    )
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"{name:<18}{'':>44}  {row['status']}")
            continue
        ratio = row["loss"] / ref_loss if ref_loss else float("nan")
        print(
            f"{name:<18}{row['step_s']:>9.3f}{row['peak_gib']:>10.1f}{row['mfu']:>8.3f}"
            f"{row['loss']:>9.4f}{ratio:>8.3f}  ok"
        )
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    failed = [
        n for n, r in rows.items() if not (r["status"] == "ok" or r["status"].startswith("skipped"))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
