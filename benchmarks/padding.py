"""Padding fraction with and without length grouping, on the synthetic shapes mixture.

    python benchmarks/padding.py [--images 600] [--batch-size 16] [--megabatch 16] [--world 1]
                                 [--anyres] [--encoder tiny] [--max-length 256] [--shapes mixed]

Streams one epoch of the 50/30/20 shapes mixture (VQA / captions / text-only, as
conf/data/shapes_mix.yaml) through the real DataModule path (shards, tokenizer, template, image
processor, collate) twice: `data.group_by_length=false` (the baseline, measured in the same run)
and `true`. Padding fraction = pad tokens / all tokens of the batches. Target: grouped <= 1/3 of
the baseline. It also checks that both runs saw every sample exactly once with the same number
of batches per rank. Exit status 1 when a target is missed.

`--anyres` (issue 14, acceptance 3) also streams the same mixture with `encoder.image=anyres`
on images of mixed shapes (each image resized to one of nine aspect ratios from 1:4 to 4:1,
long side 64-400 px, drawn per image from the seed: tiny encoder, 34 to 88 tokens per image
instead of 16) and compares its grouped padding fraction with today's (`pad`, the fixed-size
64 px images): target anyres <= 1.10 x pad. `--encoder clip336 --max-length 4096` measures the
same at LLaVA-1.6's scale (576 tokens per pad image; 1,184 to 2,928 per anyres image); the model
is built on the meta device without weights (only its image processor and counter are used).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = 1 / 3
ANYRES_TARGET = 1.10  # grouped anyres / grouped pad
# Image shapes for the anyres runs: (aspects w:h, long side range in px)
SHAPES = {
    # every aspect from 1:4 to 4:1, small to mid-sized: many distinct token counts
    "mixed": (((1, 4), (1, 3), (1, 2), (3, 4), (1, 1), (4, 3), (2, 1), (3, 1), (4, 1)), (64, 400)),
    # photo-like (COCO, the bulk of LLaVA-NeXT's images): 4:3, 3:2, 16:9, square, portraits
    "photos": (((4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (1, 1)), (480, 1024)),
}


def mixed_shape_sets(
    sources: list[Any], out: Path, seed: int, per_shard: int, shapes: str = "mixed"
) -> list[Any]:
    """The sources' shapes sets again, every image resized to a drawn aspect and size."""
    from PIL import Image

    from vlmlab.data.shards import write_shards

    shapes_root = Path(sources[0].shard_dir).parent.parent  # <root>/shapes-<hash>/shards/<set>
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    reshaped = []
    for source in sources:
        name = Path(source.shard_dir).name
        records = json.loads((shapes_root / f"{name}.json").read_text())
        for record in records:
            image = record.get("image")
            if not image or (images / image).is_file():
                continue
            rng = random.Random(f"{seed}-{image}")
            aspects, (shortest, longest) = SHAPES[shapes]
            (w, h), long_side = rng.choice(aspects), rng.randint(shortest, longest)
            size = (
                (long_side, max(1, long_side * h // w))
                if w >= h
                else (long_side * w // h, long_side)
            )
            with Image.open(shapes_root / "images" / image) as original:
                original.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(images / image)
        write_shards(records, images, out / "shards" / name, per_shard)
        reshaped.append(dataclasses.replace(source, shard_dir=out / "shards" / name))
    return reshaped


def measure(
    args: argparse.Namespace, root: Path, grouped: bool, image: str = "pad"
) -> dict[str, Any]:
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
            f"encoder={args.encoder}",
            f"encoder.image={image}",
            f"data.max_length={args.max_length}",
            "stage=2",
        ]
    )
    # only the image processor, the token counter and the tokenizer are used: no weights
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta")
    ensure_shapes(typed(cfg.data, DataConfig))
    dataset = resolve_dataset(typed(cfg.data, DataConfig), "instruct")
    sources = dataset["sources"]
    assert sources is not None
    if image == "anyres":
        sources = mixed_shape_sets(
            sources, root / args.shapes, args.seed, max(1, args.images // 8), args.shapes
        )
    text_encoder = TextEncoder.for_model(
        model, tokenizer, str(cfg.stage.template), int(cfg.data.max_length)
    )
    pad = tokens = samples = 0
    batch_counts = []
    seen: list[str] = []
    skipped: dict[str, int] = {}
    image_tokens: list[int] = []
    started = time.perf_counter()
    for rank in range(args.world):
        dm = VLMDataModule(
            None,
            text_encoder,
            model.image_processor,
            batch_size=args.batch_size,
            shuffle_buffer=int(cfg.data.shuffle_buffer),
            seed=args.seed,
            sources=sources,
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
            image_tokens += batch["image_tokens"]
            for reason, count in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
    return {
        "padding_fraction": pad / tokens,
        "samples": samples,
        "unique": len(set(seen)),
        "batches_per_rank": batch_counts,
        "image_tokens": (min(image_tokens, default=0), max(image_tokens, default=0)),
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }


def report(name: str, result: dict[str, Any]) -> None:
    lo, hi = result["image_tokens"]
    print(
        f"{name:>26}: padding fraction {result['padding_fraction']:.4f}  "
        f"samples {result['samples']} (unique {result['unique']})  "
        f"batches/rank {result['batches_per_rank']}  image tokens {lo}-{hi}  "
        f"skipped {result['skipped'] or 0}  {result['seconds']:.1f}s"
    )


def once_and_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same batch counts per rank, and every sample seen once or counted as skipped."""
    planned = a["samples"] + sum(a["skipped"].values())
    return a["batches_per_rank"] == b["batches_per_rank"] and (
        b["samples"] == b["unique"] == planned - sum(b["skipped"].values())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="shapes images per set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--megabatch", type=int, default=16, help="batches sorted together")
    parser.add_argument("--world", type=int, default=1, help="ranks to simulate (one by one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--anyres", action="store_true", help="also anyres on mixed-shape images vs pad"
    )
    parser.add_argument("--encoder", default="tiny", help="encoder preset (conf/encoder)")
    parser.add_argument(
        "--shapes", choices=sorted(SHAPES), default="mixed", help="image shapes of the anyres runs"
    )
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = measure(args, Path(tmp), grouped=False)
        grouped = measure(args, Path(tmp), grouped=True)
        runs = {"pad, without grouping": base, "pad, group_by_length": grouped}
        if args.anyres:
            runs[f"anyres {args.shapes}, no grouping"] = measure(args, Path(tmp), False, "anyres")
            runs[f"anyres {args.shapes}, grouped"] = measure(args, Path(tmp), True, "anyres")
    for name, result in runs.items():
        report(name, result)
    ratio = grouped["padding_fraction"] / base["padding_fraction"]
    same = all(once_and_equal(base, r) for r in runs.values())
    print(f"ratio grouped / baseline: {ratio:.3f} (target <= {TARGET:.3f})")
    ok = ratio <= TARGET
    if args.anyres:
        anyres = runs[f"anyres {args.shapes}, grouped"]["padding_fraction"]
        vs_pad = anyres / grouped["padding_fraction"]
        print(f"grouped anyres / grouped pad: {vs_pad:.3f} (target <= {ANYRES_TARGET:.2f})")
        ok = ok and vs_pad <= ANYRES_TARGET
    print(f"exactly once and equal batch counts in every run: {same}")
    ok = ok and same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
