"""generate(): sources -> requests (bounded, cached) -> parsed, filtered entries -> LLaVA JSON.

Crash safety: every finished (entry, type) is one line of `out/journal.jsonl`, written by the
main thread and fsync'd, then its key is appended to `out/done.idx`. A restart reads the
journal (a torn last line, from a kill mid-write, is cut off), skips what is there, and
redoes the rest, most of it from the request cache. Out, at the end: `llava.json` (kept
entries, input order, written to a temporary file and renamed), `rejected.jsonl` (filter
verdicts and unparseable replies), `bad_input.jsonl` (line and reason), `summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.curate.filters.base import Filter, NotJudged
from vlmlab.curate.generate.backends import Backend, Cache, RequestFailed, build_backend
from vlmlab.curate.generate.inputs import BadInput, Source, read_sources
from vlmlab.curate.generate.prompts import PromptSet, Unparseable, conversations, load_prompts
from vlmlab.curate.generate.prompts import messages as build_messages
from vlmlab.curate.generate.settings import GenerateConfig
from vlmlab.curate.pipeline import build_filters
from vlmlab.curate.sample import parse_sample
from vlmlab.curate.settings import CurateConfig

log = logging.getLogger(__name__)
OUTPUT = "llava.json"
JOURNAL = "journal.jsonl"
INDEX = "done.idx"


@dataclass
class GenerateResult:
    out: Path
    summary: dict[str, Any]
    failed: list[dict[str, Any]] = field(default_factory=list)


def unit_key(source: Source, kind: str) -> str:
    return f"{source.id}-{kind}"


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """key -> journal row; a torn last line (kill mid-write) is cut off the file."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
            except ValueError:
                break
            done[row["key"]] = row
            good += len(raw)
    if good != path.stat().st_size:
        log.warning("%s: dropping a torn tail of %d bytes", path, path.stat().st_size - good)
        with open(path, "r+b") as handle:
            handle.truncate(good)
            os.fsync(handle.fileno())
    return done


class Journal:
    """Append-only, fsync'd: a line is either wholly there or cut off at restart."""

    def __init__(self, out: Path) -> None:
        self.rows = open(out / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
        self.index = open(out / INDEX, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, row: dict[str, Any]) -> None:
        for handle, text in (
            (self.rows, json.dumps(row, ensure_ascii=False)),
            (self.index, row["key"]),
        ):
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        self.rows.close()
        self.index.close()


def judge(
    filters: list[Filter], source: Source, entry: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    """curate's filters on a generated entry, with the source's captions and boxes as references."""
    sample = parse_sample(
        source.index,
        source.line,
        {
            **entry,
            "captions": source.captions,
            "boxes": [{"category": b.category} for b in source.boxes],
        },
    )
    verdicts, unjudged = [], []
    for f in filters:
        try:
            verdict = f.check(sample)
        except NotJudged as why:
            unjudged.append(why.reason)
            continue
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts, unjudged


def _units(
    sources: list[Source], kinds: list[str], done: dict[str, Any]
) -> Iterator[tuple[Source, str]]:
    for source in sources:
        for kind in kinds:
            if unit_key(source, kind) not in done:
                yield source, kind


def generate(
    cfg: GenerateConfig,
    data: Path,
    image_root: Path | None,
    out: Path,
    instances: Path | None = None,
    backend: Backend | None = None,
) -> GenerateResult:
    """Generate LLaVA data for every source in `data` into `out`; resumable, cached."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts.dir, cfg.types, cfg.prompts.few_shot)
    filters = build_filters(CurateConfig(filters=cfg.filters))
    sources: list[Source] = []
    bad: list[BadInput] = []
    for item in read_sources(data, instances, image_root or data.parent):
        (bad if isinstance(item, BadInput) else sources).append(item)  # type: ignore[arg-type]
    done = read_journal(out / JOURNAL)
    pending = list(_units(sources, cfg.types, done))
    log.info(
        "generate: %d sources, %d bad, %d done, %d to do",
        len(sources),
        len(bad),
        len(done),
        len(pending),
    )
    cache = (
        Cache(Path(cfg.cache.dir) if cfg.cache.dir else out / "cache")
        if cfg.cache.enabled
        else Cache(None)
    )
    params = dict(cfg.params)
    failed: list[dict[str, Any]] = []
    requests = 0
    if pending:
        backend = backend or build_backend(cfg.backend, cfg.retry)

        def ask(source: Source, kind: str) -> str:
            msgs = build_messages(prompts[kind], source)
            key = Cache.key(backend.kind, backend.model, msgs, params)
            cached = cache.get(key)
            if cached is not None:
                return cached
            reply = backend.complete(msgs, params)
            cache.put(key, reply)
            return reply

        journal = Journal(out)
        try:
            with ThreadPoolExecutor(cfg.concurrency) as pool:
                todo = iter(pending)
                running: dict[Future[str], tuple[Source, str]] = {}
                while True:
                    while len(running) < 2 * cfg.concurrency:  # bounded: never all at once
                        nxt = next(todo, None)
                        if nxt is None:
                            break
                        running[pool.submit(ask, *nxt)] = nxt
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        source, kind = running.pop(fut)
                        try:
                            reply = fut.result()
                        except RequestFailed as err:
                            failed.append(
                                {
                                    "key": unit_key(source, kind),
                                    "line": source.line,
                                    "error": str(err),
                                }
                            )
                            continue
                        row = _row(prompts[kind], filters, source, kind, reply)
                        journal.append(row)
                        done[row["key"]] = row
        finally:
            journal.close()
        requests = backend.requests
    result = _finish(cfg, out, sources, bad, done, failed, requests, cache.hits)
    return result


def _row(
    prompt: PromptSet, filters: list[Filter], source: Source, kind: str, reply: str
) -> dict[str, Any]:
    key = unit_key(source, kind)
    base = {"key": key, "index": source.index, "line": source.line, "type": kind}
    try:
        turns = conversations(prompt, source, reply)
    except Unparseable as err:
        return {
            **base,
            "status": "rejected",
            "reason": "unparseable",
            "evidence": {"why": str(err), "reply": reply[:500]},
        }
    entry = {"id": key, "image": source.image, "conversations": turns}
    verdicts, unjudged = judge(filters, source, entry)
    if verdicts:
        return {
            **base,
            "status": "rejected",
            "reason": verdicts[0].reason,
            "reasons": [v.reason for v in verdicts],
            "evidence": {v.reason: v.evidence for v in verdicts},
            "entry": entry,
        }
    return {**base, "status": "kept", "entry": entry, "unjudged": unjudged}


def _finish(
    cfg: GenerateConfig,
    out: Path,
    sources: list[Source],
    bad: list[BadInput],
    done: dict[str, dict[str, Any]],
    failed: list[dict[str, Any]],
    requests: int,
    cache_hits: int,
) -> GenerateResult:
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for source in sources:
        for kind in cfg.types:
            row = done.get(unit_key(source, kind))
            if row is None:
                continue
            (kept if row["status"] == "kept" else rejected).append(row)
    tmp = out / f"{OUTPUT}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump([r["entry"] for r in kept], handle, ensure_ascii=False, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / OUTPUT)
    with open(out / "rejected.jsonl", "w", encoding="utf-8") as handle:
        for r in rejected:
            handle.write(
                json.dumps({k: v for k, v in r.items() if k != "entry"}, ensure_ascii=False) + "\n"
            )
    with open(out / "bad_input.jsonl", "w", encoding="utf-8") as handle:
        for b in bad:
            handle.write(json.dumps(b.row(), ensure_ascii=False) + "\n")
    summary = {
        "sources": len(sources) + len(bad),
        "usable_sources": len(sources),
        "kept": len(kept),
        "rejected": len(rejected),
        "bad_input": len(bad),
        "failed": len(failed),
        "requests": requests,
        "cache_hits": cache_hits,
        "counts": {
            "kept": len(kept),
            **dict(sorted(Counter(r["reason"] for r in rejected).items())),
            **dict(sorted(Counter(f"bad_input:{b.reason}" for b in bad).items())),
        },
        "backend": {"kind": cfg.backend.kind, "model": cfg.backend.model},
        "params": cfg.params,
        "types": cfg.types,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if failed:
        with open(out / "failed.jsonl", "w", encoding="utf-8") as handle:
            for f in failed:
                handle.write(json.dumps(f) + "\n")
    log.info(
        "generate: kept %d, rejected %d, bad input %d, failed %d; %d requests, %d cache hits -> %s",
        len(kept),
        len(rejected),
        len(bad),
        len(failed),
        requests,
        cache_hits,
        out / OUTPUT,
    )
    return GenerateResult(out, summary, failed)
