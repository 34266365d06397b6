"""LLaVA JSON + image folder -> WebDataset tar shards and a manifest.

Tar members carry fixed metadata (mtime 0, uid 0), so the same input gives byte-identical
shards, and the manifest's checksums identify the data a run trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    records: list[dict[str, Any]], image_root: Path, out_dir: Path, samples_per_shard: int = 500
) -> dict[str, Any]:
    """Write `shard-NNNNNN.tar` files and `manifest.json`; returns the manifest.

    Each sample is `<id>.json` (the LLaVA record) plus `<id>.<ext>` (image bytes) when it has an image.
    Records whose image file is missing are still written (the loader skips and counts them).
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    for start in range(0, len(records), samples_per_shard):
        chunk = records[start : start + samples_per_shard]
        name = f"shard-{start // samples_per_shard:06d}.tar"
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


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: write shards with vlmlab.data.shards.write_shards first."
        )
    return json.loads(path.read_text())
