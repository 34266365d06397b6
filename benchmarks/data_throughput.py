"""Data loading throughput: LLaVA's own loading path vs vlmlab shards, in the same run.

(a) baseline, what LLaVA-1.5's `LazySupervisedDataset` does: a map-style Dataset over the JSON
    list and the image folder; PIL open + convert, expand2square with the mean colour,
    transformers `CLIPImageProcessor` at 336 px, the conversation template and tokenisation,
    a torch DataLoader (shuffled) and LLaVA's collator (text-only samples get a zero image);
(b) ours: the same data converted by `vlmlab shards`, streamed by VLMDataModule/ShardStream
    with the encoder's ImageTransform at 336 px, the same template and tokenizer, our collate.

Same samples, worker count, batch size and tokenizer; the first batches (worker start-up) are
excluded. Prints samples/s of both and the ratio (target: ours >= 2x). Timings on a shared
machine are noisy: compare ratios from one run, not absolute numbers across runs.

    python benchmarks/data_throughput.py [--samples 2000] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlmlab.data import convert
from vlmlab.data.convert import encoder_transform
from vlmlab.data.datamodule import VLMDataModule
from vlmlab.data.synthetic_llava import write_llava_dataset
from vlmlab.data.tokenize import TextEncoder
from vlmlab.models.image_transform import ImageTransform, expand_to_square
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import get_template

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LlavaStyleDataset(Dataset):
    """LLaVA-1.5's LazySupervisedDataset.__getitem__ (train.py), step for step."""

    def __init__(self, json_path: Path, image_root: Path, processor: Any, encoder: TextEncoder):
        self.records = json.loads(json_path.read_text())
        self.image_root = image_root
        self.processor = processor
        self.encoder = encoder
        self.size = processor.crop_size["height"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        if "image" in record:
            image = Image.open(os.path.join(self.image_root, record["image"])).convert("RGB")
            fill = tuple(int(x * 255) for x in self.processor.image_mean)
            image = expand_to_square(image, fill)  # LLaVA's expand2square, same arithmetic
            pixels = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        else:
            pixels = torch.zeros(3, self.size, self.size)  # LLaVA: zero image for text-only
        conversations = copy.deepcopy(record["conversations"])
        out = self.encoder.encode(conversations, has_image="image" in record)
        return {"input_ids": out["input_ids"], "labels": out["labels"], "image": pixels}


class LlavaCollator:
    """LLaVA's DataCollatorForSupervisedDataset."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, instances: list[dict[str, Any]]) -> dict[str, Any]:
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad([x["input_ids"] for x in instances], True, self.pad_token_id)
        labels = pad([x["labels"] for x in instances], True, IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": input_ids.ne(self.pad_token_id),
            "images": torch.stack([x["image"] for x in instances]),
        }


def samples_per_second(batches: Iterable[dict[str, Any]], warmup: int) -> tuple[float, int]:
    """Throughput after the first `warmup` batches (worker start-up, first file opens)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["input_ids"])
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--tokenizer", default="pkg://tiny_tokenizer")
    parser.add_argument("--template", default="vicuna_v1")
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument(
        "--baseline-processor",
        choices=("torchvision", "pil"),
        default="torchvision",
        help="transformers 5's CLIPImageProcessor (torchvision) or CLIPImageProcessorPil "
        "(the numpy/PIL processor LLaVA-1.5 was trained with)",
    )
    parser.add_argument(
        "--presize", default="clip336", help="encoder preset for the presized shards"
    )
    parser.add_argument("--data-dir", type=Path, help="reuse generated data here (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one thread per worker process, as in LLaVA's data workers

    root = args.data_dir or Path(tempfile.mkdtemp(prefix="vlmlab-bench-"))
    json_path, images = root / "llava.json", root / "images"
    if not json_path.is_file():
        start = time.perf_counter()
        write_llava_dataset(root, args.samples, size=(640, 480), image_format="jpg")
        print(
            f"generated {args.samples} 640x480 JPEG samples in {time.perf_counter() - start:.1f}s"
        )
    shards, presized = root / "shards", root / "shards-presized"
    for out, extra in ((shards, []), (presized, ["--presize", args.presize])):
        start = time.perf_counter()
        code = convert.main(
            [
                *(str(json_path), "--image-root", str(images), "--out", str(out)),
                *("--samples-per-shard", "100", "--workers", str(max(1, args.workers))),
                *("--tokenizer", args.tokenizer, "--template", args.template),
                *("--image-tokens", str(args.image_tokens), *extra),
            ]
        )
        assert code == 0, "conversion failed"
        took = time.perf_counter() - start
        print(f"vlmlab shards {' '.join(extra)} (one-off, not in the ratio): {took:.1f}s")

    tokenizer = build_tokenizer({"name_or_path": args.tokenizer})
    encoder = TextEncoder(
        tokenizer,
        get_template(args.template, tokenizer.eos_token),
        args.image_tokens,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        max_length=4096,
    )
    size = {"shortest_edge": args.size}
    crop = {"height": args.size, "width": args.size}
    if args.baseline_processor == "pil":
        from transformers import CLIPImageProcessorPil as Processor
    else:
        from transformers import CLIPImageProcessor as Processor
    processor = Processor(
        size=size, crop_size=crop, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    baseline = DataLoader(
        LlavaStyleDataset(json_path, images, processor, encoder),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=LlavaCollator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(0),
    )
    transform = ImageTransform(size=args.size, mean=CLIP_MEAN, std=CLIP_STD)
    if encoder_transform(args.presize) != transform:
        parser.error(f"--presize {args.presize} is not the {args.size} px CLIP transform")

    def ours(shard_dir: Path) -> DataLoader:
        module = VLMDataModule(
            shard_dir,
            encoder,
            transform,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle_buffer=1000,
        )
        return module.train_dataloader()

    print(
        f"workers={args.workers} batch={args.batch_size} size={args.size} "
        f"tokenizer={args.tokenizer} baseline processor={Processor.__name__}"
    )
    base_rate, base_n = samples_per_second(baseline, args.warmup_batches)
    print(f"baseline (LLaVA map-style):      {base_rate:8.1f} samples/s ({base_n} timed)")
    for name, shard_dir in (("ours (original images)", shards), ("ours (--presize)", presized)):
        rate, n = samples_per_second(ours(shard_dir), args.warmup_batches)
        print(
            f"{name + ':':<32} {rate:8.1f} samples/s ({n} timed), {rate / base_rate:.2f}x baseline"
        )
    print("target: ours >= 2x baseline")


if __name__ == "__main__":
    main()
