"""Embedding dedup throughput of `vlmlab curate` on CPU: images/s and peak memory at N synthetic
images, and what that means for LLaVA-1.5's 665K mix.

Stages timed separately (image generation excluded): (1) embed: JPEG decode, the encoder's
pad/resize/normalise, forward, mean-pool, normalise (the pipeline's `embed_images`, reading
with --workers threads); (2) search: the blocked exact cosine search (`similar_pairs`) over all
N^2/2 pairs, plus clustering (`semantic_duplicates`). Embedding is linear in N, the search
quadratic: the 665K extrapolation scales them so. Peak memory: the process's max RSS (ru_maxrss)
and the embedding matrix. Every 50th image is a resized copy of another, so the run also
reports how many copies were found.

    python benchmarks/curate.py [--n 100000] [--encoder tiny] [--workers 2] [--block 4096]

`--encoder clip336` builds CLIP-L/14-336 with random weights (pretrained=false: no download;
speed does not depend on the weights): use a small --n with it.
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from vlmlab.curate.dedup import Candidate, semantic_duplicates
from vlmlab.curate.embed import build_image_encoder, embed_images
from vlmlab.curate.settings import compose_curate, encoder_dict
from vlmlab.data.synthetic_llava import make_image

FULL = 665_000


def _write_images(folder: Path, n: int, size: int) -> list[str]:
    rng = random.Random(0)
    names = []
    for i in range(n):
        name = f"{i:07d}.jpg"
        if i % 50 == 49:  # a resized copy of an earlier image: something to find
            from PIL import Image

            with Image.open(folder / names[i - 25]) as src:
                src.resize((size // 2, size // 2)).save(folder / name, quality=90)
        else:
            make_image(rng, size, size).save(folder / name, quality=90)
        names.append(name)
    return names


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="synthetic images")
    parser.add_argument("--encoder", default="tiny", help="encoder preset (conf/encoder)")
    parser.add_argument("--size", type=int, default=96, help="synthetic image side (px)")
    parser.add_argument("--workers", type=int, default=2, help="image reading threads")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--block", type=int, default=4096, help="similarity block")
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--data-dir", help="reuse images written by an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    folder = Path(args.data_dir or tempfile.mkdtemp(prefix="curate_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = sorted(p.name for p in folder.glob("*.jpg"))
    if len(names) < args.n:
        names = _write_images(folder, args.n, args.size)
    names = names[: args.n]
    print(
        f"{args.n} images of {args.size} px in {folder} ({time.perf_counter() - start:.0f} s to write)"
    )

    cfg = compose_curate([f"encoder={args.encoder}", "encoder.pretrained=false"], "tiny")
    encoder = build_image_encoder(encoder_dict(cfg.encoder))
    rss_before = _rss_gib()
    timings: dict[str, float] = {}

    def embed(paths: list[str]) -> torch.Tensor:
        t0 = time.perf_counter()
        vectors = embed_images([folder / p for p in paths], encoder, args.batch_size, args.workers)
        timings["embed"] = time.perf_counter() - t0
        return vectors

    items = [
        Candidate(i, i + 1, name, (name, ""), name, name, sha256=name)
        for i, name in enumerate(names)
    ]
    t0 = time.perf_counter()
    dups, _ = semantic_duplicates(items, embed, args.threshold, args.block, use_faiss=True)
    total = time.perf_counter() - t0
    search = total - timings["embed"]
    dim = int(encoder.hidden_size)
    n = args.n
    copies = n // 50
    found = sum(1 for d in dups if d.index % 50 == 49)
    matrix_gib = n * dim * 4 / 2**30
    print(
        f"encoder {args.encoder} (width {dim}), {torch.get_num_threads()} torch threads, "
        f"{args.workers} reading threads"
    )
    print(f"embed : {timings['embed']:.1f} s = {n / timings['embed']:.3g} images/s")
    print(f"search: {search:.1f} s for {n * (n - 1) / 2:.3g} pairs (block {args.block})")
    print(f"total : {total:.1f} s = {n / total:.3g} images/s end to end")
    print(f"found {found} of {copies} planted resized copies; {len(dups)} duplicates in all")
    print(
        f"peak RSS {_rss_gib():.2f} GiB (before the dedup {rss_before:.2f} GiB); "
        f"embedding matrix {matrix_gib * 1024:.1f} MiB"
    )
    scale = FULL / n
    embed_full = timings["embed"] * scale
    search_full = search * scale**2
    print(
        f"extrapolated to {FULL}: embed {embed_full / 3600:.3g} h (linear) + search "
        f"{search_full / 3600:.3g} h (quadratic) on this CPU; embedding matrix "
        f"{FULL * dim * 4 / 2**30:.2f} GiB (float32), similarity block "
        f"{args.block**2 * 4 / 2**20:.0f} MiB"
    )
    if n < 10_000:
        print("(the search extrapolation is overhead-dominated below --n 10000)")


if __name__ == "__main__":
    main()
