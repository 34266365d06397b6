"""`vlmlab <verb>`: train (Hydra), demo. Heavy libraries are imported only by the verb that runs."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vlmlab.errors import ConfigError

log = logging.getLogger("vlmlab")

VERBS = {
    "train": "train one stage: vlmlab train [hydra overrides], same as `python train.py ...`",
    "demo": "run the CPU demo: text warm-up, stage 1, stage 2, held-out accuracy",
}


def _hydra_task(cfg: Any) -> float | None:
    from vlmlab.train import train

    try:
        result = train(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(2) from None
    return result["metrics"].get("eval/accuracy")


def train_main() -> None:
    """Hydra entry point: `python train.py connector=mlp stage=2`, `-m` for sweeps."""
    import hydra

    from vlmlab.config import conf_dir, quote_numeric_choices

    sys.argv = [sys.argv[0], *quote_numeric_choices(sys.argv[1:])]
    hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_hydra_task)()


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmlab demo", description=VERBS["demo"])
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for every stage, e.g. paths.root=/tmp/x"
    )
    parser.add_argument("--stages", default="lm,1,2", help="comma-separated stages to run in order")
    args = parser.parse_args(argv)
    from vlmlab.logs import setup_logging

    setup_logging()
    from vlmlab.config import compose
    from vlmlab.train import train

    results = {}
    for stage in args.stages.split(","):
        cfg = compose(["experiment=demo", f"stage={stage}", *args.overrides])
        try:
            results[stage] = train(cfg)
        except ConfigError as err:
            log.error("configuration error: %s", err)
            return 2
    accuracy = results.get(args.stages.split(",")[-1], {}).get("metrics", {}).get("eval/accuracy")
    seconds = sum(r["seconds"] for r in results.values())
    root = cfg.paths.root
    log.info(
        "demo finished in %.0fs of training; held-out colour accuracy: %s",
        seconds,
        f"{accuracy:.3f}" if accuracy is not None else "n/a",
    )
    log.info("compare runs: mlflow ui --backend-store-uri sqlite:///%s/mlflow.db", root)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vlmlab <verb> [args]\n\nverbs:")
        for verb, text in VERBS.items():
            print(f"  {verb:<8}{text}")
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb == "train":
        sys.argv = [f"{sys.argv[0]} train", *rest]
        train_main()
    elif verb == "demo":
        raise SystemExit(demo(rest))
    else:
        print(f"vlmlab: unknown verb {verb!r}; choose from {', '.join(VERBS)}", file=sys.stderr)
        raise SystemExit(2)
