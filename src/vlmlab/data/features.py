"""Frozen-encoder feature cache: the encoder's outputs written once, read instead of pixels.

Why: a connector sweep over the same images with the same frozen tower decodes the same JPEGs
and runs the same ViT forward in every job. The features (after `select_layer` /
`select_feature`, before the connector) depend only on the encoder's weights and config, the
image transform and the storage dtype, so they are computed once per image shard folder and
every later job (and every later epoch) reads them.

Layout: for each image shard folder `D` a stage reads, `D/features/<key>/` holds one feature
shard per image shard (same name, the same samples in the same order) and a `manifest.json` in
the image manifest's format, written last (its presence means the cache is complete). The
epoch plan therefore cuts the feature shards exactly as it cuts the image shards: the same
samples reach the same batches in the same order as from pixels.

A feature-shard sample holds the image sample's members except the image bytes, plus
`<k>.feat` (safetensors: `features` (N, Dv), `image_size` (width, height)) or, for an image the
pixel path would skip, `<k>.bad` ({reason, detail, step}): the same `BadSample` is raised at
the same step (`decode`: before the text is tokenised, `pixels`: after).

`<key>` hashes everything the features depend on (`FeatureKey`): the encoder preset (family,
architecture, `select_layer`, `select_feature`, `dtype`, `init_seed`, transform, backend,
attention kernel), a fingerprint of its weight files (content sha256; random init is a
function of the preset), the storage dtype and the format version. A changed key is another
folder, so a stale file is never read. Each shard's sha256 is recorded, with the size and mtime
it had when hashed, and checked before a run reads the cache: a shard whose stat changed is
hashed again, and a corrupt or truncated one is recomputed, never trained on. A file lock makes
parallel jobs compute a cache once: the first computes, the others wait and then check it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from vlmlab.data.mixture import Source
from vlmlab.data.shards import MANIFEST, read_manifest, sha256_file, shard_index
from vlmlab.data.tokenize import UNUSABLE_IMAGE, BadSample
from vlmlab.data.validate import IMAGE_EXTENSIONS, decode_image
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import UnusableImageError
from vlmlab.models.cached_features import CachedFeatures
from vlmlab.models.encoder import VLM_KEYS
from vlmlab.models.image_transform import ImageTransform
from vlmlab.models.vision import DTYPES

log = logging.getLogger(__name__)

MODES = ("auto", "off", "require")  # data.features
CACHE_DIR = "features"  # under each image shard folder
FEATURE = "feat"  # tar member extension of a sample's features
BAD = "bad"  # tar member extension of a sample the pixel path skips
FORMAT = 1  # bumped when the shard layout changes: another key, never a misread file
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
# Representative parameter names of the encoder slot, for deciding from the stage config alone
# (before anything is built) whether a stage's globs reach the encoder.
_ENCODER_NAMES = (
    "encoder",
    "encoder.vision.vision_model.embeddings.patch_embedding.weight",
    "encoder.vision.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "encoder.model.blocks.0.attn.qkv.weight",
)


def encoder_trains(stage: Mapping[str, Any]) -> bool:
    """Whether the stage policy trains any encoder parameter (its `train` globs, `train_last`,
    a LoRA on the encoder): then its features change as it trains and cannot be cached."""
    patterns = [str(p) for p in stage.get("train") or []]
    if any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")
        for p in patterns
        for name in _ENCODER_NAMES
    ):
        return True
    if int((stage.get("train_last") or {}).get("encoder", 0) or 0) > 0:
        return True
    lora = stage.get("lora") or {}
    return str(lora.get("target", "")) == "encoder"


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(location: Path) -> list[Path]:
    if location.is_file():
        return [location]
    return sorted(
        p for p in location.rglob("*") if p.is_file() and p.suffix in (*_WEIGHT_SUFFIXES, ".json")
    )


def weights_fingerprint(encoder: Mapping[str, Any]) -> str | None:
    """What the encoder's weights are: "init" for a random init (a function of the preset and
    `init_seed`), else the sha256 of the weight files it loads (a local folder or file, or the
    hub id's snapshot in the local cache). None when the files cannot be found offline."""
    if not encoder.get("pretrained"):
        return "init"
    timm = encoder.get("backend") == "timm"
    name = encoder.get("timm_checkpoint") if timm else encoder.get("name_or_path")
    if not name:
        return None
    location = Path(str(name)).expanduser()
    if not location.exists() and not timm:
        try:
            from huggingface_hub import snapshot_download

            location = Path(snapshot_download(str(name), local_files_only=True))
        except Exception:  # not in the local hub cache: nothing to fingerprint offline
            return None
    files = _weight_files(location) if location.exists() else []
    return _hash_files(files) if files else None


@dataclass(frozen=True)
class FeatureKey:
    """Everything the cached features depend on; `digest` names the cache folder."""

    encoder: dict[str, Any]  # the encoder preset less its image strategy (`encoder.image`)
    weights: str  # weights_fingerprint
    dtype: str  # storage dtype of the features

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def feature_key(encoder: Mapping[str, Any], storage_dtype: str | None) -> FeatureKey | str:
    """The key of this encoder's features, or why they cannot be cached (a sentence)."""
    if str(encoder.get("image", "pad") or "pad") != "pad":
        return (
            "encoder.image=anyres: AnyRes tiles are not cached (the tiling would be part of the "
            "key: encoder.anyres.grid_pinpoints, mode, max_tiles, pool_budget_tiles)"
        )
    dtype = storage_dtype or str(encoder.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise ConfigError("data.feature_dtype", f"got {dtype!r}.", f"use one of {sorted(DTYPES)}.")
    weights = weights_fingerprint(encoder)
    if weights is None:
        where = (
            "encoder.timm_checkpoint"
            if encoder.get("backend") == "timm"
            else "encoder.name_or_path"
        )
        return f"{where}={encoder.get(where.split('.')[1])!r}: no local weight files to fingerprint"
    preset = {k: v for k, v in encoder.items() if k not in VLM_KEYS}
    return FeatureKey(preset, weights, dtype)


def is_local(shard_dir: Path | str) -> bool:
    """A local shard folder (the cache is written beside it), not a URL, brace pattern or
    `pipe:` command (data/remote.py)."""
    text = str(shard_dir)
    return isinstance(shard_dir, Path) or not (
        "://" in text or "{" in text or text.startswith("pipe:")
    )


@dataclass(frozen=True)
class CachedSample:
    """A feature-shard sample as the SampleProcessor reads it."""

    features: torch.Tensor | None
    image_size: tuple[int, int] | None
    bad: dict[str, str] | None  # {reason, detail, step}: the pixel path's BadSample

    def raise_at(self, step: str) -> None:
        if self.bad is not None and self.bad.get("step") == step:
            raise BadSample(self.bad["reason"], self.bad.get("detail", ""))


def read_cached(raw: Mapping[str, Any]) -> CachedSample | None:
    """The cached image of a raw tar sample; None for a sample of an image shard (or one
    without an image, which reads the same from either)."""
    if BAD in raw:
        bad = json.loads(raw[BAD])
        size = bad.get("image_size")
        return CachedSample(None, (int(size[0]), int(size[1])) if size else None, bad)
    if FEATURE not in raw:
        return None
    tensors = load_tensors(raw[FEATURE])
    width, height = (int(v) for v in tensors["image_size"].tolist())
    return CachedSample(tensors["features"], (width, height), None)


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _raw_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order, grouped by WebDataset's key rule (up to the first dot
    of the basename), exactly as the loader groups them."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([str(tar_path)]), wds.tarfile_to_samples())
    for raw in pipeline:
        key = str(raw["__key__"])
        yield key, {k: v for k, v in raw.items() if not k.startswith("__")}


@dataclass
class _Pending:
    key: str
    members: dict[str, bytes]
    pixels: torch.Tensor | None = None
    image_size: tuple[int, int] | None = None
    bad: dict[str, Any] | None = None


def _prepare(key: str, members: dict[str, bytes], transform: Any) -> _Pending:
    """The pixel path's image steps (`SampleProcessor`), its failures recorded, not raised."""
    kept = {k: v for k, v in members.items() if k not in IMAGE_EXTENSIONS}
    item = _Pending(key, kept)
    try:
        record = json.loads(members["json"])
    except (KeyError, ValueError):
        return item  # the loader raises bad_json from the json member, kept as is
    if not isinstance(record, dict) or not record.get("image"):
        return item
    payload = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    if payload is None:
        return item  # missing_image, raised by the loader from the record alone
    try:
        image = decode_image(payload, orient=False)
    except BadSample as bad:
        item.bad = {"reason": bad.reason, "detail": str(bad), "step": "decode"}
        return item
    item.image_size = (int(image.size[0]), int(image.size[1]))
    try:
        item.pixels = transform(image)
    except UnusableImageError as err:
        item.bad = {"reason": UNUSABLE_IMAGE, "detail": str(err), "step": "pixels"}
    except (OSError, ValueError) as err:
        item.bad = {"reason": "corrupt_image", "detail": str(err), "step": "pixels"}
    return item


def write_feature_shard(
    image_shard: Path, out: Path, encoder: Any, dtype: torch.dtype, batch_size: int = 32
) -> dict[str, Any]:
    """One image shard -> its feature shard (atomically: written beside, then renamed)."""
    items = [_prepare(k, m, encoder.image_transform) for k, m in _raw_samples(image_shard)]
    todo = [(it, it.pixels) for it in items if it.pixels is not None]
    features: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            out_features = encoder(torch.stack([pixels for _, pixels in chunk]))
            for (it, _), feats in zip(chunk, out_features):
                features[it.key] = feats.to(dtype).contiguous().clone()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for it in items:
            for ext, payload in sorted(it.members.items()):
                _member(tar, f"{it.key}.{ext}", payload)
            if it.key in features:
                size = torch.tensor(it.image_size, dtype=torch.int64)
                blob = save_tensors({"features": features[it.key], "image_size": size})
                _member(tar, f"{it.key}.{FEATURE}", blob)
            elif it.bad is not None:
                bad = {**it.bad, "image_size": it.image_size}
                _member(tar, f"{it.key}.{BAD}", json.dumps(bad).encode())
    digest = sha256_file(tmp)
    tmp.replace(out)
    return {"name": out.name, "num_samples": len(items), **_stamp(out, digest)}


def _stamp(path: Path, digest: str) -> dict[str, Any]:
    """What the manifest records of a shard: its sha256 and the size and mtime it had when
    hashed (a shard whose stat still matches is not hashed again: see `stale_shards`)."""
    stat = path.stat()
    return {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _unchanged(path: Path, recorded: Mapping[str, Any]) -> bool:
    """True when the shard is the file that was hashed: same sha256, or, without reading it,
    the same size and mtime as when it was hashed (any rewrite or truncation changes these)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if (stat.st_size, stat.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return True
    return sha256_file(path) == recorded["sha256"]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (flock): one job computes, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job to finish the feature cache (%s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source_identity(shard_dir: Path) -> str:
    """The image shards the cache was computed from (their manifest, or names and counts)."""
    manifest = shard_dir / MANIFEST
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    index = [(Path(p).name, n) for p, n in shard_index(shard_dir)]
    return hashlib.sha256(json.dumps(index).encode()).hexdigest()


def stale_shards(cache_dir: Path, image_dir: Path) -> list[str]:
    """Image shards whose feature shard is missing, from other images, corrupt or truncated
    (sha256 against the cache manifest): these are (re)computed before anything reads them.

    Only shards whose size or mtime changed since they were hashed are read and hashed again:
    a run on a cache of hundreds of GB starts at once instead of hashing it all on every rank.
    """
    names = [Path(p).name for p, _ in shard_index(image_dir)]
    if not (cache_dir / MANIFEST).is_file():
        return names
    manifest = read_manifest(cache_dir)
    if manifest.get("source") != _source_identity(image_dir):
        return names
    recorded = {s["name"]: s for s in manifest.get("shards", [])}
    stale = []
    for name in names:
        path = cache_dir / name
        if name not in recorded or not _unchanged(path, recorded[name]):
            if path.is_file():
                log.warning("feature shard %s fails its checksum: recomputing it", path)
            stale.append(name)
    return stale


def _previous_shards(cache_dir: Path) -> list[dict[str, Any]]:
    """The shards of the cache's manifest, if it has one (none when it was never completed)."""
    if not (cache_dir / MANIFEST).is_file():
        return []
    return list(read_manifest(cache_dir).get("shards", []))


@dataclass(frozen=True)
class FeatureCache:
    """A complete cache for the stage's sources: what the DataModule and the model need."""

    sources: list[Source]  # the stage's sources, each pointing at its feature shards
    key: FeatureKey
    hidden_size: int
    num_tokens: int
    image_size: int
    num_patches: int
    has_cls: bool
    computed: int  # feature shards this call wrote (0: all were reused)

    def stand_in(self) -> CachedFeatures:
        transform = ImageTransform(size=self.image_size, **self.key.encoder.get("transform", {}))
        return CachedFeatures(
            self.hidden_size,
            self.num_tokens,
            self.image_size,
            self.num_patches,
            self.has_cls,
            transform,
        )

    def num_bytes(self) -> int:
        return sum(
            (Path(s.shard_dir) / shard["name"]).stat().st_size
            for s in self.sources
            for shard in read_manifest(Path(s.shard_dir))["shards"]
        )


def _build_encoder(encoder: Mapping[str, Any]) -> Any:
    """The tower, built exactly as `build_vlm` builds it, in eval mode (frozen: no dropout)."""
    from vlmlab.models import instantiate

    module = instantiate(dict(encoder), _convert_="all")
    module.eval()
    return module


def ensure_features(
    sources: list[Source], encoder: Mapping[str, Any], key: FeatureKey, batch_size: int = 32
) -> FeatureCache:
    """A complete, checked feature cache for every source: reused where it is, computed (once,
    under a lock shared by parallel jobs) where it is not. The tower is built only to compute."""
    dtype = DTYPES[key.dtype]
    digest = key.digest()
    built: Any = None
    computed = 0
    cached: list[Source] = []
    shape: dict[str, Any] = {}
    for source in sources:
        image_dir = Path(source.shard_dir)
        cache_dir = image_dir / CACHE_DIR / digest
        with _locked(image_dir / CACHE_DIR / f"{digest}.lock"):
            stale = stale_shards(cache_dir, image_dir)
            if stale:
                if built is None:
                    log.info("building the encoder to compute its feature cache %s", digest)
                    built = _build_encoder(encoder)
                cache_dir.mkdir(parents=True, exist_ok=True)
                stamps = {  # the shards kept: checked by stale_shards, stamped with today's stat
                    shard["name"]: _stamp(cache_dir / shard["name"], shard["sha256"])
                    for shard in _previous_shards(cache_dir)
                    if shard["name"] not in stale
                }
                (cache_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten
                log.info("computing features of %d shards into %s", len(stale), cache_dir)
                for name in stale:
                    stamps[name] = write_feature_shard(
                        image_dir / name, cache_dir / name, built, dtype, batch_size
                    )
                    computed += 1
                manifest = {
                    "key": key.as_dict(),
                    "source": _source_identity(image_dir),
                    "hidden_size": int(built.hidden_size),
                    "num_tokens": int(built.num_tokens),
                    "image_size": int(built.image_size),
                    "num_patches": int(built.num_patches),
                    "has_cls": bool(built.has_cls),
                    "writer_pid": os.getpid(),
                    "shards": [
                        {**stamps[Path(p).name], "name": Path(p).name, "num_samples": n}
                        for p, n in shard_index(image_dir)
                    ],
                }
                tmp = cache_dir / f"{MANIFEST}.tmp{os.getpid()}"
                tmp.write_text(json.dumps(manifest, indent=1))
                tmp.replace(cache_dir / MANIFEST)  # last: its presence means complete
            else:
                log.info("reading cached features from %s", cache_dir)
            manifest = read_manifest(cache_dir)
        shape = {
            k: manifest[k]
            for k in ("hidden_size", "num_tokens", "image_size", "num_patches", "has_cls")
        }
        cached.append(dataclasses.replace(source, shard_dir=cache_dir))
    del built  # the tower is not needed for training on the cache
    return FeatureCache(cached, key, computed=computed, **shape)


def cache_size_bytes(num_images: int, num_tokens: int, hidden_size: int, dtype: str) -> int:
    """Bytes of the features of `num_images` images (the planner's estimate; tar headers and
    the records' JSON add a little)."""
    return num_images * num_tokens * hidden_size * DTYPES[dtype].itemsize
