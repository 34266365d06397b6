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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.data.remote import ShardMissing, ShardSet, as_location, is_remote, read_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def sha256_file(path: Path) -> str:
    """A file's sha256, read in 16 MiB blocks (shards are too large to read at once)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
        offsets = sample_offsets(out_dir / name)
        shards.append(
            {"name": name, "num_samples": len(chunk), "sha256": digest, "offsets": offsets}
        )
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


def sample_offsets(tar_path: Path) -> list[int]:
    """Byte offset of each sample's first tar header, then the end of the last one's data.

    Stored in the manifest (`offsets`), so a reader fetches exactly the bytes of the samples it
    needs (an HTTP Range, a ranged object-store read), not the shard up to them.
    """
    offsets: list[int] = []
    key, end = None, 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            match = _KEY.match(member.name)
            if not (member.isfile() and match):
                continue
            if match.group(1) != key:
                key = match.group(1)
                offsets.append(member.offset)
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return [*offsets, end] if offsets else []


@dataclass(frozen=True)
class ShardEntry:
    url: str  # a local path, a URL or a pipe: command
    num_samples: int
    offsets: tuple[int, ...] | None = None  # `sample_offsets`, when the manifest has them


def list_shards(location: Path | str) -> list[ShardEntry]:
    """The shards of a location (a folder, a URL, a brace pattern, a pipe: command, see
    `remote.ShardSet`), from its manifest; a local folder without one is scanned.

    Sample-level planning (exactly once, equal batches per rank) needs the counts up front.
    """
    location = as_location(location)
    shard_set = ShardSet.parse(location)
    raw = manifest_bytes(location)
    if raw is None:
        if is_remote(location):
            raise FileNotFoundError(
                f"{shard_set.file(MANIFEST)} not found: a remote shard set needs its manifest "
                "(counting samples would download every shard); write the shards with "
                "`vlmlab shards ... --out URL`, or convert to a local folder and upload it."
            )
        names = shard_set.names or sorted(p.name for p in Path(shard_set.prefix).glob("*.tar"))
        if not names:
            raise FileNotFoundError(f"{location} has neither {MANIFEST} nor *.tar shards.")
        log.info("%s has no %s: counting samples in %d shards", location, MANIFEST, len(names))
        tars = [Path(shard_set.file(n)) for n in names]
        return [ShardEntry(str(t), count_samples(t)) for t in tars]
    listed = {s["name"]: s for s in json.loads(raw)["shards"]}
    names = list(shard_set.names) if shard_set.names is not None else list(listed)
    absent = [n for n in names if n not in listed]
    if absent:
        raise FileNotFoundError(
            f"{shard_set.file(MANIFEST)} lists no {absent[0]} ({len(absent)} of the "
            f"{len(names)} names {location} expands to are not in it)."
        )
    entries = []
    for name in names:
        shard = listed[name]
        offsets = shard.get("offsets")
        entries.append(
            ShardEntry(
                shard_set.file(name),
                int(shard["num_samples"] if "num_samples" in shard else shard["samples"]),
                tuple(int(o) for o in offsets) if offsets else None,
            )
        )
    return entries


def shard_index(location: Path | str) -> list[tuple[str, int]]:
    """(shard path or URL, sample count) per shard of a location (`list_shards`)."""
    return [(s.url, s.num_samples) for s in list_shards(location)]


_REMOTE_MANIFESTS: dict[str, bytes] = {}  # per process: every planning call reads the manifest


def manifest_bytes(location: Path | str) -> bytes | None:
    """The manifest beside a location's shards, None where there is none."""
    location = as_location(location)
    if isinstance(location, Path):
        path = location / MANIFEST
        return path.read_bytes() if path.is_file() else None
    url = ShardSet.parse(location).file(MANIFEST)
    if not is_remote(url):
        path = Path(url)
        return path.read_bytes() if path.is_file() else None
    if url not in _REMOTE_MANIFESTS:
        try:
            _REMOTE_MANIFESTS[url] = read_bytes(url)
        except ShardMissing:
            return None
    return _REMOTE_MANIFESTS[url]


def read_manifest(shard_dir: Path | str) -> dict[str, Any]:
    raw = manifest_bytes(shard_dir)
    if raw is None:
        raise FileNotFoundError(
            f"{ShardSet.parse(as_location(shard_dir)).file(MANIFEST)} not found: write shards "
            "with vlmlab.data.shards.write_shards (or `vlmlab shards`) first."
        )
    parsed: dict[str, Any] = json.loads(raw)
    return parsed
