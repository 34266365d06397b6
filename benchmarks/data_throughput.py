"""Data loading throughput: LLaVA's own loading path vs vlmlab shards, in the same run.

(a) baseline, what LLaVA-1.5's `LazySupervisedDataset` does: a map-style Dataset over the JSON
    list and the image folder; PIL open + convert, expand2square with the mean colour,
    transformers `CLIPImageProcessor` at 336 px, the conversation template and tokenisation,
    a torch DataLoader (shuffled) and LLaVA's collator (text-only samples get a zero image);
(b) ours: the same data converted by `vlmlab shards`, streamed by VLMDataModule/ShardStream
    with the encoder's ImageTransform at 336 px, the same template and tokenizer, our collate;
    once with the original JPEGs in the shards, once with `--presize` shards.

Also, in the same run: the bare image path of one process (decode + pad + resize + normalise
of the shards' JPEG bytes, already in memory, nothing else), whose rate times the worker count
is the limit of the JPEG path, and the CPU seconds per sample of each loader (main process and
its workers, over the whole epoch). Same samples, worker count, batch size and tokenizer; the
first batches (worker start-up) are excluded from the rates. Timings on a shared machine are
noisy: compare ratios from one run, not absolute numbers across runs.

    python benchmarks/data_throughput.py [--samples 2000] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from vlmlab.data.validate import decode_image
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
        return {
            "input_ids": out["input_ids"],
            "labels": out["labels"],
            "image": pixels,
            "has_image": "image" in record,
        }


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
            "num_images": sum(x["has_image"] for x in instances),  # text-only: a zero image
        }


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers are joined,
    hence counted, when their iterator is exhausted)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Rate:
    samples_per_s: float
    images_per_s: float
    timed: int  # samples after the warm-up batches
    cpu_per_sample: float  # seconds, main process + workers, whole epoch


def measure(
    batches: Iterable[dict[str, Any]], warmup: int, images_of: Callable[[dict[str, Any]], int]
) -> Rate:
    """Throughput after the first `warmup` batches (worker start-up, first file opens)."""
    cpu = cpu_seconds()
    iterator = iter(batches)
    total = images = 0
    for _ in range(warmup):
        total += len(next(iterator)["input_ids"])
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["input_ids"])
        images += images_of(batch)
    seconds = time.perf_counter() - start
    del iterator  # joins the workers, so their CPU time is counted
    return Rate(count / seconds, images / seconds, count, (cpu_seconds() - cpu) / (total + count))


def bare_image_rate(payloads: list[bytes], transform: ImageTransform) -> tuple[float, float]:
    """(images/s, CPU s/image) of one process doing only the image work of the JPEG path:
    decode + pad + resize + normalise, from bytes in memory."""
    cpu, start = time.process_time(), time.perf_counter()
    for payload in payloads:
        transform(decode_image(payload, orient=False))
    seconds = time.perf_counter() - start
    return len(payloads) / seconds, (time.process_time() - cpu) / len(payloads)


def jpeg_payloads(shard_dir: Path, count: int) -> list[bytes]:
    """The first `count` JPEGs of the shards, as bytes."""
    import webdataset as wds

    urls = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    found: list[bytes] = []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        if "jpg" in sample:
            found.append(sample["jpg"])
        if len(found) == count:
            break
    return found


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
        "--bare-images", type=int, default=200, help="JPEGs timed for the bare image path"
    )
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
    payloads = jpeg_payloads(shards, args.bare_images)
    bare = [bare_image_rate(payloads, transform)]  # again at the end: the load drifts
    rates = {"baseline (LLaVA map-style)": measure(baseline, args.warmup_batches, _llava_images)}
    for name, shard_dir in (("ours (original JPEG)", shards), ("ours (--presize)", presized)):
        rates[name] = measure(ours(shard_dir), args.warmup_batches, _our_images)
    bare.append(bare_image_rate(payloads, transform))
    bare_rate = sum(rate for rate, _ in bare) / len(bare)
    bare_cpu = sum(cpu for _, cpu in bare) / len(bare)
    limit = args.workers * bare_rate
    print(
        f"bare image path, 1 process (decode+pad+resize+normalise, {len(payloads)} JPEGs): "
        f"{bare_rate:.1f} images/s ({' / '.join(f'{r:.1f}' for r, _ in bare)}), "
        f"{bare_cpu * 1e3:.2f} ms CPU per image"
    )
    print(
        f"limit of the JPEG path: {args.workers} workers x {bare_rate:.1f} = {limit:.1f} images/s"
    )
    base = rates["baseline (LLaVA map-style)"]
    print(f"{'loader':<28} {'samples/s':>9} {'images/s':>9} {'vs base':>8} {'CPU ms/sample':>14}")
    for name, rate in rates.items():
        print(
            f"{name:<28} {rate.samples_per_s:9.1f} {rate.images_per_s:9.1f} "
            f"{rate.samples_per_s / base.samples_per_s:7.2f}x {rate.cpu_per_sample * 1e3:14.2f}"
        )
    jpeg = rates["ours (original JPEG)"]
    print(
        f"ours (original JPEG) / limit: {jpeg.images_per_s / limit:.2f} "
        f"({jpeg.images_per_s:.1f} of {limit:.1f} images/s; target >= 0.70)"
    )
    images_share = jpeg.images_per_s / jpeg.samples_per_s
    print(
        f"CPU per image: bare {bare_cpu * 1e3:.2f} ms, ours (original JPEG) "
        f"{jpeg.cpu_per_sample / images_share * 1e3:.2f} ms (all its work per sample / images per "
        f"sample {images_share:.2f})"
    )


def _llava_images(batch: dict[str, Any]) -> int:
    return int(batch["num_images"])


def _our_images(batch: dict[str, Any]) -> int:
    pixels = batch["pixel_values"]
    return 0 if pixels is None else int(pixels.shape[0])


if __name__ == "__main__":
    main()
