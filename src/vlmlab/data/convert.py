"""`vlmlab shards`: LLaVA JSON/JSONL + image folder -> WebDataset tar shards + manifest.json.

Every entry is validated first (image opens, `<image>` tags, roles, tokenised length with the
real template), so bad data is reported before any shard exists, not discovered mid-training.
Output is a pure function of the input: shard boundaries follow the input order, tar members
carry fixed metadata, so any `--workers` gives byte-identical shards. A shard is written to a
temporary name and renamed when complete, next to a sidecar with its checksum and the
fingerprint of its planned content; a rerun after an interruption keeps every shard whose
sidecar and bytes still match and never rewrites it. The manifest is written last.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.data.remote import is_remote, upload
from vlmlab.data.shards import MANIFEST, _add_member, sample_offsets, sha256_file
from vlmlab.data.validate import (
    Accepted,
    Rejected,
    Validator,
    decode_image,
    load_entries,
    validate_all,
)
from vlmlab.models.anyres import AnyResTokens, parse_grid_pinpoints
from vlmlab.models.image_transform import ImageTransform
from vlmlab.visual import FixedImageTokens, ImageTokenCounter

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
REJECTED = "rejected.jsonl"
PARTS = ".parts"  # per-shard sidecars: {sha256, fingerprint} of finished shards
LENGTH_BINS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
_TAR_BLOCK, _TAR_RECORD = 512, 10240


@dataclass(frozen=True)
class ShardPlan:
    index: int
    samples: tuple[Accepted, ...]
    presize: ImageTransform | None = None  # store images already padded/resized (raw PPM)

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"

    def fingerprint(self) -> str:
        """Identifies the planned content: records, image bytes and the converter version."""
        digest = hashlib.sha256(f"vlmlab-shards-{CONVERTER_VERSION}-{self.presize!r}".encode())
        for sample in self.samples:
            digest.update(sample.key.encode() + b"\0" + sample.record_json + b"\0")
            digest.update((sample.image_sha256 or "-").encode())
        return digest.hexdigest()


def tar_size(member_total: int) -> int:
    """File size of a tar holding members of this many bytes: two end blocks, then padding to
    whole records, as tarfile writes it."""
    return -(-(member_total + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def member_bytes(payload_size: int) -> int:
    """Bytes a tar member takes: one header block plus the payload rounded up to blocks."""
    return _TAR_BLOCK + -(-payload_size // _TAR_BLOCK) * _TAR_BLOCK


def plan_shards(
    samples: list[Accepted],
    samples_per_shard: int | None,
    max_shard_bytes: int | None,
    presize: ImageTransform | None = None,
) -> list[ShardPlan]:
    """Cut the accepted samples, in input order, into consecutive shards.

    A pure function of the input order (never of worker scheduling), so the output is the same
    for any number of workers. A sample larger than `max_shard_bytes` gets a shard of its own
    (the one case where a shard exceeds it).
    """
    plans: list[ShardPlan] = []
    current: list[Accepted] = []
    members = 0  # bytes of the tar members so far
    for sample in samples:
        sample_bytes = member_bytes(len(sample.record_json))
        if sample.image_path:
            sample_bytes += member_bytes(sample.image_size)
        full = samples_per_shard is not None and len(current) >= samples_per_shard
        too_big = max_shard_bytes is not None and tar_size(members + sample_bytes) > max_shard_bytes
        if current and (full or too_big):
            plans.append(ShardPlan(len(plans), tuple(current), presize))
            current, members = [], 0
        current.append(sample)
        members += sample_bytes
    if current:
        plans.append(ShardPlan(len(plans), tuple(current), presize))
    return plans


def presized_ppm(payload: bytes, transform: ImageTransform) -> bytes:
    """The image after the loader's decode step (`decode_image`, pad path: 16-bit to 8-bit) and
    the transform's pixel-moving steps, as raw RGB (PPM): the loader's transform then has
    nothing left to resize and yields the same pixel values, and decoding is a copy (PNG would
    be 2x smaller but decodes 20x slower, slower than the original JPEG)."""
    out = io.BytesIO()
    transform.geometry(decode_image(payload, orient=False)).save(out, format="PPM")
    return out.getvalue()


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardResult:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    image: int
    text: int
    reused: bool
    offsets: tuple[int, ...] = ()  # `shards.sample_offsets`: readers fetch only their samples

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "modality": {"image": self.image, "text": self.text},
            "offsets": list(self.offsets),
        }


def _finished(plan: ShardPlan, out_dir: Path) -> str | None:
    """The shard's sha256 if a previous run completed exactly this shard, else None."""
    path, sidecar = out_dir / plan.name, out_dir / PARTS / f"{plan.name}.json"
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        recorded = json.loads(sidecar.read_text())
    except ValueError:
        return None
    if recorded.get("fingerprint") != plan.fingerprint():
        return None
    sha = sha256_file(path)
    return sha if sha == recorded.get("sha256") else None


def write_shard(plan: ShardPlan, out_dir: Path, image_root: Path) -> ShardResult:
    """Write one shard (temp name, then rename) unless an identical finished one exists."""
    image = sum(1 for s in plan.samples if s.image_path)
    counts = {"num_samples": len(plan.samples), "image": image, "text": len(plan.samples) - image}
    path = out_dir / plan.name
    sha = _finished(plan, out_dir)
    if sha is not None:
        offsets = tuple(sample_offsets(path))
        return ShardResult(
            plan.name, bytes=path.stat().st_size, sha256=sha, reused=True, offsets=offsets, **counts
        )
    tmp = out_dir / f"{plan.name}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in plan.samples:
            _add_member(tar, f"{sample.key}.json", sample.record_json)
            if sample.image_path:
                payload = (image_root / sample.image_path).read_bytes()
                if hashlib.sha256(payload).hexdigest() != sample.image_sha256:
                    raise RuntimeError(f"{sample.image_path} changed during the conversion")
                if plan.presize is None:
                    _add_member(tar, f"{sample.key}.{sample.image_ext}", payload)
                else:
                    _add_member(tar, f"{sample.key}.ppm", presized_ppm(payload, plan.presize))
    sha = sha256_file(tmp)
    # sidecar first: a shard that exists under its final name always has one
    sidecar = {"fingerprint": plan.fingerprint(), "sha256": sha}
    _atomic_write(out_dir / PARTS / f"{plan.name}.json", json.dumps(sidecar).encode())
    os.replace(tmp, path)
    offsets = tuple(sample_offsets(path))
    return ShardResult(
        plan.name, bytes=path.stat().st_size, sha256=sha, reused=False, offsets=offsets, **counts
    )


_WRITE_CONTEXT: tuple[Path, Path] | None = None


def _write_in_worker(plan: ShardPlan) -> ShardResult:
    assert _WRITE_CONTEXT is not None
    return write_shard(plan, *_WRITE_CONTEXT)


def write_all(
    plans: list[ShardPlan], out_dir: Path, image_root: Path, workers: int
) -> Iterator[ShardResult]:
    """Shard results in completion order; the content of each shard depends only on its plan."""
    global _WRITE_CONTEXT
    if workers <= 1 or len(plans) <= 1:
        for plan in plans:
            yield write_shard(plan, out_dir, image_root)
        return
    _WRITE_CONTEXT = (out_dir, image_root)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(workers, len(plans))) as pool:
        yield from pool.imap_unordered(_write_in_worker, plans)


def length_histogram(lengths: Iterable[int]) -> dict[str, Any]:
    """Token lengths (image tokens expanded): `counts[i]` samples have `edges[i] < n <= edges[i+1]`
    (the last count is everything above the last edge), plus summary statistics."""
    values = sorted(lengths)
    counts = [0] * (len(LENGTH_BINS) + 1)
    for value in values:
        counts[bisect.bisect_left(LENGTH_BINS, value)] += 1
    histogram: dict[str, Any] = {"edges": [0, *LENGTH_BINS], "counts": counts, "count": len(values)}
    if values:
        histogram.update(
            min=values[0],
            max=values[-1],
            mean=round(sum(values) / len(values), 2),
            p50=values[len(values) // 2],
            p95=values[min(len(values) - 1, int(0.95 * len(values)))],
        )
    return histogram


def build_manifest(
    results: list[ShardResult],
    accepted: list[Accepted],
    rejected: list[Rejected],
    num_input: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    shards = [r.manifest_entry() for r in sorted(results, key=lambda r: r.name)]
    with_image = sum(r.image for r in results)
    total = sum(r.num_samples for r in results)
    return {
        "converter": {"name": "vlmlab shards", "version": CONVERTER_VERSION, "args": settings},
        "num_input": num_input,
        "num_samples": total,
        "num_with_image": with_image,
        "num_text_only": total - with_image,
        "num_rejected": len(rejected),
        "rejected": dict(sorted(Counter(r.reason for r in rejected).items())),
        "bytes": sum(r.bytes for r in results),
        "num_tokens": sum(s.num_tokens for s in accepted),  # image tokens expanded
        "token_lengths": length_histogram(s.num_tokens for s in accepted),
        "shards": shards,
        "sha256": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, total=total, desc=desc, file=sys.stderr, disable=None, unit="")


def convert(
    input_path: Path,
    image_root: Path,
    out_dir: Path,
    validator: Validator,
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    settings: dict[str, Any] | None = None,
    presize: ImageTransform | None = None,
) -> dict[str, Any]:
    """Validate, plan, write (or keep) shards, then the rejected report and the manifest."""
    entries = load_entries(input_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARTS).mkdir(exist_ok=True)
    for stale in [*out_dir.glob("*.tmp-*"), *(out_dir / PARTS).glob("*.tmp-*")]:
        stale.unlink()  # leftovers of an interrupted run: never complete by construction
    checked = validate_all(entries, validator, workers, _progress)
    accepted = [c for c in checked if isinstance(c, Accepted)]
    rejected = [c for c in checked if isinstance(c, Rejected)]
    plans = plan_shards(accepted, samples_per_shard, max_shard_bytes, presize)
    results = list(_progress(write_all(plans, out_dir, image_root, workers), len(plans), "shards"))
    reused = sum(r.reused for r in results)
    planned = {plan.name for plan in plans}
    for old in sorted(out_dir.glob("shard-*.tar")):  # from an earlier run with another plan
        if old.name not in planned:
            log.warning("removing %s: not part of this conversion", old)
            (out_dir / PARTS / f"{old.name}.json").unlink(missing_ok=True)
            old.unlink()
    log.info(
        "%d shards: %d written, %d kept from a previous run",
        len(results),
        len(results) - reused,
        reused,
    )
    report = "".join(json.dumps(r.as_dict(), sort_keys=True) + "\n" for r in rejected)
    _atomic_write(out_dir / REJECTED, report.encode())
    manifest = build_manifest(results, accepted, rejected, len(entries), settings or {})
    _atomic_write(
        out_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    )
    manifest["_reused"] = reused
    return manifest


def staging_dir(url: str) -> Path:
    """Where shards for a remote `--out` are written before upload: kept per URL (under
    VLMLAB_CACHE, default ~/.cache/vlmlab), so a rerun after an interruption keeps finished
    shards as a local --out does."""
    root = Path(os.environ.get("VLMLAB_CACHE", "~/.cache/vlmlab")).expanduser()
    return root / "shards-out" / hashlib.sha256(url.encode()).hexdigest()[:16]


def publish(local: Path, url: str, manifest: dict[str, Any]) -> None:
    """Upload a converted folder to `url` (`remote.upload`): shards, the rejected report, then
    the manifest last, so a reader never sees a manifest naming a shard not there yet. The
    staging folder is removed once everything is up."""
    base = url.rstrip("/")
    names = [s["name"] for s in manifest["shards"]]
    for name in _progress(names, len(names), "upload"):
        upload(local / name, f"{base}/{name}")
    upload(local / REJECTED, f"{base}/{REJECTED}")
    upload(local / MANIFEST, f"{base}/{MANIFEST}")
    log.info("uploaded %d shards and the manifest to %s", len(names), base)
    shutil.rmtree(local)


def _encoder_preset(preset: str, flag: str) -> Any:
    """conf/encoder/<preset>.yaml as loaded (not composed), or a ConfigError naming `flag`."""
    from omegaconf import OmegaConf

    from vlmlab.config import conf_dir
    from vlmlab.errors import ConfigError

    folder = conf_dir() / "encoder"
    path = folder / f"{preset}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(flag, f"no encoder preset {preset!r}.", f"use one of {choices}.")
    return OmegaConf.load(path)


def encoder_transform(preset: str) -> ImageTransform:
    """The image transform of an encoder preset (conf/encoder/<preset>.yaml), without building it.

    Only for `encoder.image: pad`: AnyRes tiles depend on each image's size and the pinpoints,
    so presizing would store the wrong pixels (and training refuses presized shards for anyres,
    `datamodule.refuse_presized`)."""
    from vlmlab.errors import ConfigError

    cfg = _encoder_preset(preset, "--presize")
    if cfg.get("image", "pad") != "pad":
        raise ConfigError(
            "--presize",
            f"encoder preset {preset!r} has encoder.image={cfg.image}: anyres tiles every image "
            "at its own size and grid, so shards cannot hold it presized to one square.",
            "convert without --presize (training reads the original images), or presize for a "
            "preset with encoder.image=pad.",
        )
    transform: dict[str, Any] = {str(k): v for k, v in cfg.transform.items()}
    return ImageTransform(
        size=int(cfg.config.image_size),
        mean=tuple(transform.pop("mean")),
        std=tuple(transform.pop("std")),
        **transform,
    )


def encoder_anyres_tokens(preset: str) -> AnyResTokens:
    """The AnyRes token counter of an encoder preset's `anyres` block, without building it.

    Tiles are the preset's image_size; a tile gives (image_size // patch_size)**2 tokens, the
    patch grid that LLaVA-NeXT's connector (mlp2x_gelu, any linear or MLP connector) keeps.
    Used for the validation lengths (`--max-length`, the manifest's histogram) only; the model
    counts again when it trains (`VisionLanguageModel.image_token_counter`).
    """
    from vlmlab.errors import ConfigError

    cfg = _encoder_preset(preset, "--anyres")
    tile, patch = int(cfg.config.image_size), int(cfg.config.patch_size)
    spec = cfg.get("anyres") or {}
    try:
        pinpoints = parse_grid_pinpoints(
            spec.get("grid_pinpoints", "(1x1),...,(2x2)"), tile, spec.get("max_tiles")
        )
        return AnyResTokens(
            pinpoints,
            tile,
            tile // patch,
            mode=spec.get("mode", "transformers"),
            newline=bool(spec.get("newline", True)),
            pool_budget_tiles=spec.get("pool_budget_tiles"),
        )
    except ValueError as err:
        raise ConfigError("--anyres", f"preset {preset!r}: {err}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmlab shards",
        description="Convert LLaVA JSON/JSONL + an image folder into WebDataset tar shards with "
        "a manifest.json. Entries are validated first; rejects go to rejected.jsonl. Rerunning "
        "after an interruption keeps finished shards.",
    )
    parser.add_argument("json", type=Path, help="LLaVA JSON list or JSONL file")
    parser.add_argument(
        "--image-root", type=Path, required=True, help="folder `image` paths are relative to"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder, or a URL: s3://, gs:// (fsspec with s3fs/gcsfs), any fsspec-writable "
        "location, or http(s):// that takes PUT; remote output is staged locally and uploaded, "
        "the manifest last",
    )
    parser.add_argument(
        "--samples-per-shard", type=_positive, help="at most this many samples per shard"
    )
    parser.add_argument(
        "--max-shard-bytes", type=_positive, help="at most this many bytes per shard"
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes (output is identical for any number)",
    )
    parser.add_argument(
        "--tokenizer",
        default="pkg://tiny_tokenizer",
        help="local tokenizer folder (default: the bundled tiny one)",
    )
    parser.add_argument(
        "--template", default="vicuna_v1", help="chat template used to measure token lengths"
    )
    parser.add_argument(
        "--image-tokens",
        type=_positive,
        default=576,
        help="tokens one image expands to (576: CLIP-L/14 336 px)",
    )
    parser.add_argument(
        "--anyres",
        metavar="ENCODER",
        help="count image tokens as encoder.image=anyres with this encoder preset's `anyres` "
        "settings (conf/encoder, e.g. clip336): each image by its own size, EXIF orientation "
        "applied, instead of --image-tokens for every image",
    )
    parser.add_argument(
        "--max-length", type=_positive, help="reject samples longer than this many tokens"
    )
    parser.add_argument(
        "--presize",
        metavar="ENCODER",
        help="store images already padded/resized for this encoder preset (conf/encoder, e.g. "
        "clip336) as raw RGB (PPM, lossless, about 340 KB per image at 336 px): training skips "
        "the JPEG decode and the resize with identical pixel values; the shards are then tied "
        "to that encoder's image size. Not for encoder.image=anyres (tiles depend on each "
        "image's size): refused there",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from vlmlab.logs import setup_logging

    setup_logging()
    prog = "vlmlab shards"
    if not args.json.is_file():
        print(
            f"{prog}: json: {args.json} is not a file; pass the LLaVA JSON/JSONL file.",
            file=sys.stderr,
        )
        return 2
    if not args.image_root.is_dir():
        print(
            f"{prog}: --image-root: {args.image_root} is not a folder; pass the folder the entries' `image` paths are relative to.",
            file=sys.stderr,
        )
        return 2
    if args.samples_per_shard is None and args.max_shard_bytes is None:
        args.samples_per_shard = 1000
    from vlmlab.errors import ConfigError

    try:
        if args.presize and args.anyres:
            raise ConfigError(
                "--presize",
                f"--anyres {args.anyres} counts tiles of each image at its own size, but "
                "--presize stores every image squared to one tile.",
                "drop --presize for anyres data (training refuses presized shards there).",
            )
        image_tokens: ImageTokenCounter = (
            encoder_anyres_tokens(args.anyres)
            if args.anyres
            else FixedImageTokens(args.image_tokens)
        )
        validator = Validator.create(
            image_root=args.image_root,
            tokenizer=args.tokenizer,
            template=args.template,
            image_tokens=image_tokens,
            max_length=args.max_length,
        )
        presize = encoder_transform(args.presize) if args.presize else None
        settings = {
            # names, not absolute paths: the same data converted elsewhere gives the same manifest
            "input": args.json.name,
            "input_sha256": sha256_file(args.json),
            "image_root": args.image_root.name,
            "samples_per_shard": args.samples_per_shard,
            "max_shard_bytes": args.max_shard_bytes,
            "tokenizer": args.tokenizer,
            "template": args.template,
            "image_tokens": f"anyres:{args.anyres}" if args.anyres else args.image_tokens,
            "max_length": args.max_length,
            "presize": (
                {"encoder": args.presize, **dataclasses.asdict(presize)} if presize else None
            ),
        }
        out_dir = staging_dir(args.out) if is_remote(args.out) else Path(args.out)
        manifest = convert(
            args.json,
            args.image_root,
            out_dir,
            validator,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            workers=args.workers,
            settings=settings,
            presize=presize,
        )
        if is_remote(args.out):
            publish(out_dir, args.out, manifest)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(
        f"{manifest['num_samples']} samples ({manifest['num_with_image']} with image, "
        f"{manifest['num_text_only']} text-only) in {len(manifest['shards'])} shards "
        f"({manifest['_reused']} kept from a previous run) -> {args.out}"
    )
    print(
        f"rejected {manifest['num_rejected']} of {manifest['num_input']} entries -> "
        f"{args.out.rstrip('/')}/{REJECTED}"
    )
    for reason, count in manifest["rejected"].items():
        print(f"  {reason}: {count}")
    if manifest["num_samples"] == 0:
        print(
            f"{prog}: no entry passed validation; see {args.out.rstrip('/')}/{REJECTED}",
            file=sys.stderr,
        )
        return 1
    return 0
