"""`vlmlab curate DATA --image-root DIR --out DIR [--preset P] [overrides]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlmlab.errors import ConfigError

log = logging.getLogger("vlmlab")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab curate",
        description="Filter (generic, meta, format, length, language, hallucination) and "
        "deduplicate (exact, perceptual hash, encoder embeddings) LLaVA JSON or JSONL; writes "
        "kept.json, rejected.jsonl, bad_input.jsonl, report.md, report.png. Settings: "
        "conf/curate/<preset>.yaml plus Hydra overrides (filters.generic.similarity=0.7, "
        "dedup.semantic.enabled=false, encoder=clip336, workers=4).",
    )
    parser.add_argument("data", help="LLaVA JSON array or JSONL file")
    parser.add_argument(
        "--image-root",
        help="folder the entries' `image` paths are under (default: the data file's folder)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="default", help="conf/curate/<preset>.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_intermixed_args(argv)
    from vlmlab.curate.pipeline import curate
    from vlmlab.curate.settings import compose_curate
    from vlmlab.logs import setup_logging

    setup_logging()
    try:
        cfg = compose_curate(args.overrides, args.preset)
        result = curate(
            cfg,
            Path(args.data),
            Path(args.image_root) if args.image_root else None,
            Path(args.out),
        )
    except ConfigError as err:
        log.error("%s", err)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in result.summary["counts"].items())
    log.info("%s; report: %s", counts, result.out / "report.md")
    return 0
