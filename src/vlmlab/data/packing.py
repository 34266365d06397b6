"""Online multimodal packing: whole samples into rows of at most `data.max_length` tokens.

Why here and in this unit: the stream already reads a worker's samples a look-ahead of k planned
batches at a time (`data.group_megabatch`, shared with length grouping). Packing that buffer
into rows (first-fit decreasing) and dealing the rows out to exactly those k batches keeps every
guarantee of the epoch plan: each sample in exactly one batch, the same batch count on every
rank, and an exact mid-epoch resume (the buffer is rebuilt from the same samples in the same
order, and packing is deterministic, so batch j of the buffer is the same batch again). The
loss is the global token mean over target tokens, so which row or micro-batch a sample sits in
does not change the gradient of the step it belongs to.

A packed row holds several samples back to back; `position_ids` restart at 0 for each sample
(and for the padding tail), which is what keeps samples apart in attention: transformers builds
the block-diagonal causal mask from restarting `position_ids` when no 2D mask is given (sdpa,
eager), and flash attention takes the sample boundaries as `cu_seq_lens` (varlen). No sample is
split; one longer than `max_length` never gets here (the text side skips and counts it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from vlmlab.text import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens.

    Longest first (ties by index, so the result depends on the input alone), each into the
    first row it fits; a length over `capacity` gets a row of its own (the caller skips those).
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        for r, total in enumerate(used):
            if total + n <= capacity:
                rows[r].append(index)
                used[r] += n
                break
        else:
            rows.append([index])
            used.append(n)
    return rows


def deal_rows(
    rows: list[list[int]], lengths: Sequence[int], num_batches: int, rng: random.Random
) -> list[list[list[int]]]:
    """The rows split into exactly `num_batches` batches of (nearly) equal row counts.

    Rows sorted longest first are cut into consecutive runs, so the rows of one batch have
    similar lengths and pad little to the longest of them (a batch is as wide as its longest
    row, not `max_length`); the batches' order is then shuffled (no long-to-short drift). A
    batch gets no row only when there are fewer rows than batches.
    """
    ordered = sorted(rows, key=lambda row: (-sum(lengths[i] for i in row), row))
    batches: list[list[list[int]]] = []
    start = 0
    for j in range(num_batches):
        count = len(ordered) // num_batches + (j < len(ordered) % num_batches)
        batches.append(ordered[start : start + count])
        start += count
    rng.shuffle(batches)
    return batches


def pack_batches(
    samples: list[dict[str, Any]], num_batches: int, capacity: int, rng: random.Random
) -> list[tuple[list[dict[str, Any]], list[int]]]:
    """Exactly `num_batches` packed batches: (samples in row order, samples per row).

    Rows hold at most `capacity` tokens, and at most the look-ahead's tokens per batch (but never
    less than its longest sample): short samples would otherwise fill fewer rows than there are
    batches, and the batches left without a row would be steps without data.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    per_batch = -(-sum(lengths) // max(1, num_batches))
    rows = first_fit_decreasing(lengths, min(capacity, max(per_batch, max(lengths, default=0))))
    out = []
    for batch in deal_rows(rows, lengths, num_batches, rng):
        out.append(([samples[i] for row in batch for i in row], [len(row) for row in batch]))
    return out


def packed_padding(lengths: Sequence[int], rows: Sequence[int]) -> tuple[int, int]:
    """(pad slots, all slots) of a packed batch: rows right-padded to the longest row."""
    totals, start = [], 0
    for count in rows:
        totals.append(sum(lengths[start : start + count]))
        start += count
    width = max(totals, default=0)
    return width * len(totals) - sum(totals), width * len(totals)


def collate_packed(
    samples: list[dict[str, Any]], rows: Sequence[int], pad_token_id: int
) -> dict[str, Any]:
    """Rows of back-to-back samples, right-padded to the longest row.

    `rows[r]` samples (in the order given) fill row r. Returns the tensors `collate` returns
    for a padded batch, with the same meanings per slot, plus `position_ids` (restarting at 0
    at every sample and at the padding tail), `cu_seq_lens` (int32 offsets of every segment,
    samples and padding tails, in the flattened (rows x width) batch, for flash attention's
    varlen path) and `max_seqlen`. `attention_mask` marks real tokens (the model does not pass
    it on: the segments are in `position_ids`). `target_index` never crosses a sample's end:
    the last token of a sample predicts nothing.
    """
    if sum(rows) != len(samples):
        raise ValueError(f"rows {list(rows)} hold {sum(rows)} samples, got {len(samples)}")
    lengths = [len(s["input_ids"]) for s in samples]
    totals, start = [], 0
    for count in rows:
        totals.append(sum(lengths[start : start + count]))
        start += count
    width = max(totals, default=0)
    num_rows = len(totals)
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((num_rows, width), dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    last = torch.zeros((num_rows, width), dtype=torch.bool)  # a sample's last token
    bounds: list[int] = [0]
    segments: list[int] = []
    k = 0
    for r, count in enumerate(rows):
        offset = 0
        for sample in samples[k : k + count]:
            n = len(sample["input_ids"])
            input_ids[r, offset : offset + n] = sample["input_ids"]
            labels[r, offset : offset + n] = sample["labels"]
            attention_mask[r, offset : offset + n] = 1
            position_ids[r, offset : offset + n] = torch.arange(n)
            last[r, offset + n - 1] = True
            segments.append(n)
            offset += n
        k += count
        if offset < width:  # the padding tail: a segment of its own
            position_ids[r, offset:] = torch.arange(width - offset)
            segments.append(width - offset)
    for n in segments:
        bounds.append(bounds[-1] + n)
    targets = (labels[:, 1:] != IGNORE_INDEX) & ~last[:, :-1]
    rows_, cols = targets.nonzero(as_tuple=True)
    target_index = rows_ * width + cols
    pad = num_rows * width - sum(lengths)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(segments, default=0),
        "target_index": target_index,
        "num_target_tokens": int(target_index.numel()),
        "num_pad_tokens": pad,
        "num_tokens": num_rows * width,
        "num_rows": num_rows,
    }
