"""Stage 1 from the frozen-encoder feature cache vs from pixels, in the same run, on CPU.

A ViT-B/16-sized random encoder (`encoder=siglip224 encoder.pretrained=false`: SigLIP base/16
at 224 px, 86 M parameters, 196 patches) and the small LLM (`llm=tiny`), stage 1 (connector
only, encoder frozen) on the synthetic shapes data. Measured:

(a) steps/s of stage-1 training from pixels vs from the cache (optimizer steps after the first,
    timed by a callback inside `trainer.fit`, so start-up is excluded), per job;
(b) the wall time of a 3-job connector sweep (linear, mlp, resampler; the jobs run one after
    another in one process, as Hydra's basic launcher runs them) without the cache and with a
    cold cache (its first job computes the features, the others read them).

    python benchmarks/feature_cache.py [--images 96] [--batch-size 8] [--out DIR]

Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from vlmlab.config import compose
from vlmlab.train import train

CONNECTORS = ("linear", "mlp", "resampler")


class StepTimer(L.Callback):
    """Seconds from the end of the first optimizer step to the end of the last: steps/s
    without start-up, data-loader warm-up or the final checkpoint write."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.first: float | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps += 1
        if self.first is None:
            self.first = time.perf_counter()
            self.steps = 0
        self.last = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        seconds = self.last - (self.first or self.last)
        self.out.write_text(json.dumps({"steps": self.steps, "seconds": seconds}))


def job(
    root: Path, data_root: Path, connector: str, features: str, args: argparse.Namespace
) -> dict[str, Any]:
    timer = root / f"timer-{connector}-{features}.json"
    overrides = [
        f"paths.root={root / features / connector}",
        f"data.root={data_root}",
        "data=tiny",
        f"data.generator.num_images={args.images}",
        f"data.batch_size={args.batch_size}",
        f"stage.global_batch_size={args.batch_size}",
        "encoder=siglip224",
        "encoder.pretrained=false",
        "llm=tiny",
        f"connector={connector}",
        "stage=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"data.features={features}",
        f"trainer.extra_callbacks=[{{_target_: __main__.StepTimer, out: '{timer}'}}]",
    ]
    started = time.perf_counter()
    train(compose(overrides))
    wall = time.perf_counter() - started
    timed = json.loads(timer.read_text())
    return {
        "connector": connector,
        "features": features,
        "wall_s": wall,
        **timed,
        "steps_per_s": timed["steps"] / timed["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=96, help="stage-1 images (data=tiny generator)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.out or Path(tempfile.mkdtemp(prefix="feature-cache-bench-"))
    data_root = root / "data"
    # generate the shards once, outside the timings (both modes read the same shards)
    from vlmlab.data.prepare import resolve_dataset
    from vlmlab.schema import DataConfig, typed

    cfg = compose(
        [
            f"data.root={data_root}",
            "data=tiny",
            f"data.generator.num_images={args.images}",
            "stage=1",
        ]
    )
    resolve_dataset(typed(cfg.data, DataConfig), "align")["prepare"]()

    results: dict[str, list[dict[str, Any]]] = {}
    sweeps: dict[str, float] = {}
    for mode in ("off", "require"):  # pixels first; then the cache, cold
        started = time.perf_counter()
        results[mode] = [job(root, data_root, c, mode, args) for c in CONNECTORS]
        sweeps[mode] = time.perf_counter() - started
    report = {
        "images": args.images,
        "batch_size": args.batch_size,
        "jobs": results,
        "sweep_wall_s": {"pixels": sweeps["off"], "cache_cold": sweeps["require"]},
        "sweep_speedup": sweeps["off"] / sweeps["require"],
        "steps_per_s": {
            c: {
                "pixels": p["steps_per_s"],
                "cache": f["steps_per_s"],
                "ratio": f["steps_per_s"] / p["steps_per_s"],
            }
            for c, p, f in zip(CONNECTORS, results["off"], results["require"])
        },
    }
    print(json.dumps(report, indent=1))
    print()
    print("| connector | steps/s pixels | steps/s cache | ratio |")
    print("|---|---|---|---|")
    for c, r in report["steps_per_s"].items():
        print(f"| {c} | {r['pixels']:.2f} | {r['cache']:.2f} | {r['ratio']:.1f}x |")
    print(
        f"\n3-job sweep wall time: pixels {sweeps['off']:.1f} s, cache (cold, computed by its "
        f"first job) {sweeps['require']:.1f} s: {report['sweep_speedup']:.2f}x"
    )


if __name__ == "__main__":
    main()
