"""Form batches from a megabatch of processed samples, optionally grouped by modality and length.

LLaVA-1.5 batches image and text-only samples separately and by similar length, which cuts
padding. Here a megabatch (the samples planned for k consecutive batches of one worker) is
sorted by (has image, length) and cut into k batches whose order is then shuffled: it works for
all-image, all-text and mixed data alike, and it keeps the batch count the epoch plan fixed, so
exactly-once and equal batches per rank hold with grouping on.

A sample's length already counts its images' tokens, each as many as the vision side reported
for that image (`TextEncoder.encode`), so images of different token counts group by their true
length; modality is read from those counts too, not from how the pixels travel.
"""

from __future__ import annotations

import random
from typing import Any


def fit_sizes(planned: list[int], available: int) -> list[int]:
    """Planned batch sizes reduced (largest first) to hold `available` samples after skips."""
    sizes = list(planned)
    for _ in range(sum(sizes) - available):
        sizes[max(range(len(sizes)), key=lambda i: (sizes[i], -i))] -= 1
    return sizes


def form_batches(
    samples: list[dict[str, Any]],
    planned: list[int],
    rng: random.Random,
    by_length: bool,
) -> list[list[dict[str, Any]]]:
    """Exactly `len(planned)` batches (some may be empty when every sample of one was bad)."""
    if len(samples) > sum(planned):
        raise ValueError(f"{len(samples)} samples for planned batches {planned}")
    sizes = fit_sizes(planned, len(samples))
    if by_length:
        samples = sorted(samples, key=lambda s: (has_image(s), len(s["input_ids"])))
    batches, start = [], 0
    for size in sizes:
        batches.append(samples[start : start + size])
        start += size
    if by_length:
        rng.shuffle(batches)  # no long-to-short drift within the epoch
    return batches


def has_image(sample: dict[str, Any]) -> bool:
    """Whether the sample holds images: its per-image token counts (`TextEncoder.encode`)."""
    return bool(sample.get("image_tokens"))


def padding_counts(lengths: list[int]) -> tuple[int, int]:
    """(pad tokens, total tokens) of a right-padded batch with these sequence lengths."""
    width = max(lengths, default=0)
    total = width * len(lengths)
    return total - sum(lengths), total
