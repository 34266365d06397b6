"""Generation speed with the KV cache vs recomputing the whole sequence, in the same run.

    python benchmarks/generation_kv_cache.py [--connector mlp] [--batch 8] [--new-tokens 48]

The same tiny random-init model, prompts (with images) and greedy settings; the baseline is
`use_cache=False` (every step runs the full sequence), measured in the same process. Prints
tokens/s of both and the ratio; both runs must produce the same tokens. Timings on a shared
machine are noisy: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from vlmlab.config import compose
from vlmlab.eval.generate import GenerationConfig, Generator, Request, generate_ids
from vlmlab.models import build_vlm
from vlmlab.text.templates import Turn, get_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connector", default="mlp")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = compose([f"connector={args.connector}", "+llm.config.initializer_range=0.1"])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    gen = Generator(
        model,
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.encoder.image_transform,
    )
    rng = np.random.default_rng(0)
    requests = [
        Request(
            [Turn("human", "<image>\nDescribe the image." + " Please." * int(i % 3))],
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        )
        for i in range(args.batch)
    ]
    prompts = [gen.prompt_ids(r) for r in requests]
    pixels = torch.stack([gen.image_transform(r.image) for r in requests])

    def run(use_cache: bool) -> tuple[float, list[list[int]]]:
        config = GenerationConfig(max_new_tokens=args.new_tokens, use_cache=use_cache)
        best, out = float("inf"), []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = generate_ids(model, prompts, pixels, config, tokenizer.pad_token_id)
            best = min(best, time.perf_counter() - start)
        return best, out

    run(True)  # warm-up
    no_cache, reference = run(False)
    cache, tokens = run(True)
    assert tokens == reference, "the KV cache changed the generated tokens"
    total = args.batch * args.new_tokens
    print(f"prompt tokens per row: {max(len(p) for p in prompts)}, new tokens: {args.new_tokens}")
    print(f"baseline (use_cache=False): {total / no_cache:8.1f} tokens/s")
    print(f"KV cache (use_cache=True):  {total / cache:8.1f} tokens/s")
    print(f"speed-up: {no_cache / cache:.2f}x (same tokens)")


if __name__ == "__main__":
    main()
