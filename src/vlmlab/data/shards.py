"""LLaVA JSON + image folder -> WebDataset tar shards and a manifest.

Tar members carry fixed metadata (mtime 0, uid 0), so the same input gives byte-identical
shards, and the manifest's checksums identify the data a run trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    records: list[dict[str, Any]],
    image_root: Path,
    out_dir: Path,
    samples_per_shard: int = 500,
    shard_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """Write `shard-NNNNNN.tar` files and `manifest.json`; returns the manifest.

    Each sample is `<id>.json` (the LLaVA record) plus `<id>.<ext>` (image bytes) when it has an image.
    Records whose image file is missing are still written (the loader skips and counts them).
    `shard_sizes` (summing to len(records)) gives uneven shards, as real converted data has.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if shard_sizes is None:
        shard_sizes = [
            min(samples_per_shard, len(records) - start)
            for start in range(0, len(records), samples_per_shard)
        ]
    if sum(shard_sizes) != len(records) or min(shard_sizes, default=1) < 1:
        raise ValueError(f"shard_sizes {shard_sizes} do not cut {len(records)} records")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    start = 0
    for index, size in enumerate(shard_sizes):
        chunk = records[start : start + size]
        start += size
        name = f"shard-{index:06d}.tar"
        tmp = out_dir / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record in chunk:
                key = str(record["id"]).replace(".", "_")
                _add_member(tar, f"{key}.json", json.dumps(record, sort_keys=True).encode())
                if record.get("image"):
                    image_path = image_root / record["image"]
                    if image_path.is_file():
                        ext = image_path.suffix.lstrip(".").lower() or "img"
                        _add_member(tar, f"{key}.{ext}", image_path.read_bytes())
        tmp.replace(out_dir / name)
        digest = hashlib.sha256((out_dir / name).read_bytes()).hexdigest()
        shards.append({"name": name, "num_samples": len(chunk), "sha256": digest})
    with_image = sum(1 for r in records if r.get("image"))
    manifest = {
        "num_samples": len(records),
        "num_with_image": with_image,
        "num_text_only": len(records) - with_image,
        "shards": shards,
        "sha256": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("wrote %d shards (%d samples) to %s", len(shards), len(records), out_dir)
    return manifest


def count_samples(tar_path: Path) -> int:
    """Samples in one tar shard (distinct keys), for shard folders written without a manifest."""
    keys: set[str] = set()
    with tarfile.open(tar_path) as tar:
        for member in tar:
            match = _KEY.match(member.name)  # WebDataset's key rule: up to the first dot
            if member.isfile() and match:
                keys.add(match.group(1))
    return len(keys)


def shard_index(shard_dir: Path) -> list[tuple[str, int]]:
    """(shard path, sample count) per shard: from the manifest, or by scanning `*.tar` without one.

    Sample-level planning (exactly once, equal batches per rank) needs the counts up front.
    """
    shard_dir = Path(shard_dir)
    if (shard_dir / MANIFEST).is_file():
        shards = read_manifest(shard_dir)["shards"]
        return [
            (
                str(shard_dir / s["name"]),
                int(s["num_samples"] if "num_samples" in s else s["samples"]),
            )
            for s in shards
        ]
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{shard_dir} has neither {MANIFEST} nor *.tar shards.")
    log.info("%s has no %s: counting samples in %d shards", shard_dir, MANIFEST, len(tars))
    return [(str(t), count_samples(t)) for t in tars]


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: write shards with vlmlab.data.shards.write_shards first."
        )
    return json.loads(path.read_text())
