"""`vlmlab generate DATA [--instances FILE] --image-root DIR --out DIR [--preset P] [overrides]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlmlab.errors import ConfigError

log = logging.getLogger("vlmlab")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab generate",
        description="LLaVA's data generation: captions + boxes -> conversation, detailed "
        "description and complex reasoning prompts -> an OpenAI-compatible endpoint or a local "
        "transformers model -> LLaVA JSON (llava.json), filtered by curate's filters. Resumable "
        "(journal.jsonl), cached (OUT/cache). Settings: conf/generate/<preset>.yaml plus Hydra "
        "overrides (backend.url=..., backend.model=..., concurrency=16, types=[detail]).",
    )
    parser.add_argument("data", help="JSONL of {image, captions, boxes}, or COCO captions JSON")
    parser.add_argument("--instances", help="COCO instances JSON (boxes) for a COCO captions file")
    parser.add_argument("--image-root", help="folder of the images (default: the data's folder)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="default", help="conf/generate/<preset>.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_intermixed_args(argv)
    from vlmlab.curate.generate.run import generate
    from vlmlab.curate.generate.settings import compose_generate
    from vlmlab.logs import setup_logging

    setup_logging()
    try:
        cfg = compose_generate(args.overrides, args.preset)
        result = generate(
            cfg,
            Path(args.data),
            Path(args.image_root) if args.image_root else None,
            Path(args.out),
            Path(args.instances) if args.instances else None,
        )
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if result.failed:
        log.error(
            "%d requests failed for good (failed.jsonl); rerun to retry them", len(result.failed)
        )
        return 1
    return 0
