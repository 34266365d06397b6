"""Padding fraction with and without length grouping, on the synthetic shapes mixture.

    python benchmarks/padding.py [--images 600] [--batch-size 16] [--megabatch 16] [--world 1]

Streams one epoch of the 50/30/20 shapes mixture (VQA / captions / text-only, as
conf/data/shapes_mix.yaml) through the real DataModule path (shards, tokenizer, template, image
transform, collate) twice: `data.group_by_length=false` (the baseline, measured in the same run)
and `true`. Padding fraction = pad tokens / all tokens of the batches. Target: grouped <= 1/3 of
the baseline. Exit status 1 when the target is missed. It also checks that both runs saw every
sample exactly once with the same number of batches per rank.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1 / 3


def measure(args: argparse.Namespace, root: Path, grouped: bool) -> dict[str, float]:
    from vlmlab.config import compose
    from vlmlab.data.datamodule import VLMDataModule
    from vlmlab.data.prepare import ensure_shapes, resolve_dataset
    from vlmlab.data.tokenize import TextEncoder
    from vlmlab.models import build_vlm
    from vlmlab.schema import DataConfig, typed

    cfg = compose(
        [
            f"paths.root={root}",
            f"data.root={root / 'data'}",
            "data=shapes_mix",
            f"data.generator.num_images={args.images}",
            "data.generator.num_heldout=0",
            f"data.samples_per_shard={max(1, args.images // 8)}",
            f"data.mixture_size={args.images}",
            "stage=2",
        ]
    )
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    ensure_shapes(typed(cfg.data, DataConfig))
    dataset = resolve_dataset(typed(cfg.data, DataConfig), "instruct")
    text_encoder = TextEncoder.for_model(
        model, tokenizer, str(cfg.stage.template), int(cfg.data.max_length)
    )
    pad = tokens = samples = 0
    batch_counts = []
    seen: list[str] = []
    started = time.perf_counter()
    for rank in range(args.world):
        dm = VLMDataModule(
            None,
            text_encoder,
            model.encoder.image_transform,
            batch_size=args.batch_size,
            shuffle_buffer=int(cfg.data.shuffle_buffer),
            seed=args.seed,
            sources=dataset["sources"],
            mixture_size=int(cfg.data.mixture_size),
            group_by_length=grouped,
            group_megabatch=args.megabatch,
        )
        dm._world = lambda rank=rank: (rank, args.world)  # type: ignore[method-assign]
        batches = list(dm.train_dataloader())
        batch_counts.append(len(batches))
        for batch in batches:
            pad += batch["num_pad_tokens"]
            tokens += batch["num_tokens"]
            samples += len(batch["ids"])
            seen += batch["ids"]
    return {
        "padding_fraction": pad / tokens,
        "samples": samples,
        "unique": len(set(seen)),
        "batches_per_rank": batch_counts,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="shapes images per set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--megabatch", type=int, default=16, help="batches sorted together")
    parser.add_argument("--world", type=int, default=1, help="ranks to simulate (one by one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = measure(args, Path(tmp), grouped=False)
        grouped = measure(args, Path(tmp), grouped=True)
    for name, result in (("without grouping", base), ("group_by_length", grouped)):
        print(
            f"{name:>17}: padding fraction {result['padding_fraction']:.4f}  "
            f"samples {result['samples']} (unique {result['unique']})  "
            f"batches/rank {result['batches_per_rank']}  {result['seconds']:.1f}s"
        )
    ratio = grouped["padding_fraction"] / base["padding_fraction"]
    same = base["batches_per_rank"] == grouped["batches_per_rank"] and (
        base["samples"] == grouped["samples"] == base["unique"] == grouped["unique"]
    )
    print(f"ratio grouped / baseline: {ratio:.3f} (target <= {TARGET:.3f})")
    print(f"exactly once and equal batch counts in both runs: {same}")
    ok = ratio <= TARGET and same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
