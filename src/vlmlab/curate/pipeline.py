"""curate(): one streaming pass of content filters, then the duplicate stages, then the outputs.

Memory: the pass writes each passing entry to a spool file and keeps only a `Candidate` (keys and
hashes) per entry; the kept entries are streamed from the spool into the output at the end.
Outputs in `out/`: kept.json (LLaVA JSON for `vlmlab shards`), rejected.jsonl (index, line, id,
reason, all reasons, evidence), bad_input.jsonl (line, index, reason; `kept` says whether the
entry stayed), summary.json, report.md and report.png.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmlab.curate.dedup import (
    Candidate,
    Duplicate,
    exact_duplicates,
    near_image_duplicates,
    semantic_duplicates,
)
from vlmlab.curate.filters.base import FILTERS, Filter, NotJudged
from vlmlab.curate.images import ImageKeys, image_keys
from vlmlab.curate.records import read_records
from vlmlab.curate.report import draw_png, write_report
from vlmlab.curate.sample import parse_sample
from vlmlab.curate.settings import CurateConfig, encoder_dict

log = logging.getLogger(__name__)
KEPT = "kept.json"
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate_image", "semantic_duplicate")


@dataclass
class CurateResult:
    out: Path
    summary: dict[str, Any]


def build_filters(cfg: CurateConfig) -> list[Filter]:
    """The enabled filters, in registry (name) order; a registered filter absent from the config
    is off."""
    filters = []
    for name, cls in FILTERS.discover().items():
        settings = dict(cfg.filters.get(name) or {})
        if settings.pop("enabled", False):
            filters.append(cls(**settings))
    return filters


def _map(func: Any, items: list[Any], workers: int) -> Iterator[Any]:
    """`map` in order, on `workers` threads when > 0 (image decoding and hashing release the GIL)."""
    if workers <= 0:
        yield from map(func, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(func, items, chunksize=1)


def curate(cfg: CurateConfig, data: Path, image_root: Path | None, out: Path) -> CurateResult:
    """Filter and deduplicate `data` (LLaVA JSON array or JSONL) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    root = image_root or data.parent
    filters = build_filters(cfg)
    rejected: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    spool_path = out / ".spool.jsonl"
    entries = 0
    with open(spool_path, "w", encoding="utf-8") as spool:
        for record in read_records(data):
            entries += 1
            if record.entry is None:
                reason, _, detail = record.error.partition(": ")
                bad.append(_bad(record.index, record.line, "", reason, detail, kept=False))
                continue
            sample = parse_sample(record.index, record.line, record.entry)
            verdicts = []
            for f in filters:
                try:
                    verdict = f.check(sample)
                except NotJudged as why:
                    bad.append(
                        _bad(sample.index, sample.line, sample.id, why.reason, why.detail, True)
                    )
                    continue
                if verdict is not None:
                    verdicts.append(verdict)
            if verdicts:
                rejected.append(
                    {
                        "index": sample.index,
                        "line": sample.line,
                        "id": sample.id,
                        "reason": verdicts[0].reason,
                        "reasons": [v.reason for v in verdicts],
                        "evidence": {v.reason: v.evidence for v in verdicts},
                    }
                )
                continue
            spool.write(json.dumps({"index": sample.index, "entry": sample.entry}) + "\n")
            candidates.append(
                Candidate(
                    sample.index,
                    sample.line,
                    sample.id,
                    sample.key(),
                    sample.text_hash(),
                    sample.image,
                )
            )
    candidates = _attach_images(cfg, candidates, root, bad)
    duplicates, nearest = _deduplicate(cfg, candidates, root)
    by_index = {c.index: c for c in candidates}
    for dup in duplicates:
        c = by_index[dup.index]
        rejected.append(
            {
                "index": c.index,
                "line": c.line,
                "id": c.id,
                "reason": dup.reason,
                "reasons": [dup.reason],
                "evidence": {dup.reason: dup.evidence},
            }
        )
    dropped = {d.index for d in duplicates}
    kept = {c.index for c in candidates} - dropped
    _write_kept(spool_path, out / KEPT, kept)
    rejected.sort(key=lambda r: r["index"])
    bad.sort(key=lambda r: (r["index"], r["reason"]))
    _write_jsonl(out / "rejected.jsonl", rejected)
    _write_jsonl(out / "bad_input.jsonl", bad)
    summary = _summary(cfg, data, entries, kept, rejected, bad)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    examples: dict[str, list[dict[str, Any]]] = {}
    for row in rejected:
        slot = examples.setdefault(row["reason"], [])
        if len(slot) < cfg.report.examples:
            slot.append({**row, "evidence": row["evidence"][row["reason"]]})
    draw_png(
        out / "report.png",
        summary["counts"],
        nearest,
        cfg.dedup.semantic.threshold,
        cfg.report.bins,
    )
    write_report(out, summary, examples, nearest, "report.png")
    log.info(
        "curate: %d entries, kept %d, rejected %d, bad input %d -> %s",
        entries,
        len(kept),
        len(rejected),
        len(bad),
        out,
    )
    return CurateResult(out, summary)


def _bad(index: int, line: int, id_: str, reason: str, detail: str, kept: bool) -> dict[str, Any]:
    return {
        "index": index,
        "line": line,
        "id": id_,
        "reason": reason,
        "detail": detail,
        "kept": kept,
    }


def _attach_images(
    cfg: CurateConfig, candidates: list[Candidate], root: Path, bad: list[dict[str, Any]]
) -> list[Candidate]:
    """Hash every distinct image once; entries whose image is missing or unreadable leave."""
    paths = sorted({c.image for c in candidates if c.image})
    kind, crops = cfg.dedup.image.kind, tuple(cfg.dedup.image.crops)
    keys: dict[str, ImageKeys] = {
        k.path: k for k in _map(lambda p: image_keys(p, str(root), kind, crops), paths, cfg.workers)
    }
    kept = []
    for c in candidates:
        if c.image:
            k = keys[c.image]
            if k.error:
                reason, _, detail = k.error.partition(": ")
                bad.append(_bad(c.index, c.line, c.id, reason, f"{c.image}: {detail}", kept=False))
                continue
            c.sha256, c.phash, c.crop_hashes = k.sha256, k.phash, k.crop_hashes
        kept.append(c)
    return kept


def _deduplicate(
    cfg: CurateConfig, candidates: list[Candidate], root: Path
) -> tuple[list[Duplicate], np.ndarray]:
    dedup = cfg.dedup
    found: list[Duplicate] = []
    nearest = np.zeros(0, dtype=np.float32)

    def remaining() -> list[Candidate]:
        gone = {d.index for d in found}
        return [c for c in candidates if c.index not in gone]

    if dedup.exact.enabled:
        found += exact_duplicates(candidates)
    if dedup.image.enabled:
        dups, _ = near_image_duplicates(remaining(), dedup.image.max_distance, dedup.image.bands)
        found += dups
    if dedup.semantic.enabled:
        from vlmlab.curate.embed import build_image_encoder, embed_images

        encoder = build_image_encoder(encoder_dict(cfg.encoder))

        def embed(paths: list[str]) -> Any:
            files = [root / p for p in paths]
            return embed_images(files, encoder, dedup.semantic.batch_size, cfg.workers)

        dups, nearest = semantic_duplicates(
            remaining(), embed, dedup.semantic.threshold, dedup.semantic.block, dedup.semantic.faiss
        )
        found += dups
    return found, nearest


def _write_kept(spool: Path, path: Path, kept: set[int]) -> None:
    """The kept entries as one JSON array, in input order, streamed from the spool."""
    tmp = path.with_suffix(".json.tmp")
    with open(spool, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        dst.write("[")
        first = True
        for line in src:
            row = json.loads(line)
            if row["index"] in kept:
                dst.write(("\n" if first else ",\n") + json.dumps(row["entry"], ensure_ascii=False))
                first = False
        dst.write("\n]\n")
    os.replace(tmp, path)
    spool.unlink()


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _summary(
    cfg: CurateConfig,
    data: Path,
    entries: int,
    kept: set[int],
    rejected: list[dict[str, Any]],
    bad: list[dict[str, Any]],
) -> dict[str, Any]:
    counts = Counter(r["reason"] for r in rejected)
    bad_counts = Counter(f"bad_input:{b['reason']}" for b in bad)
    return {
        "input": str(data),
        "entries": entries,
        "kept": len(kept),
        "rejected": len(rejected),
        "bad_input": len(bad),
        "bad_input_dropped": sum(1 for b in bad if not b["kept"]),
        "counts": {
            "kept": len(kept),
            **dict(sorted(counts.items())),
            **dict(sorted(bad_counts.items())),
        },
        "thresholds": {
            "filters": {n: s for n, s in sorted(cfg.filters.items())},
            "near_image_max_distance": cfg.dedup.image.max_distance
            if cfg.dedup.image.enabled
            else None,
            "semantic": cfg.dedup.semantic.threshold if cfg.dedup.semantic.enabled else None,
        },
    }
