"""`vlmlab <verb>`: one registry, `VERBS`; a verb's module is imported only when the verb runs."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmlab.errors import ConfigError

log = logging.getLogger("vlmlab")


@dataclass(frozen=True)
class Verb:
    """One `vlmlab` verb: its help line and `module:function` (argv in, exit code out)."""

    help: str
    target: str

    def handler(self) -> Callable[[list[str]], int]:
        module_name, func = self.target.split(":")
        handler: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func)
        return handler


# Adding a verb = one entry here; heavy libraries load only when that verb runs.
VERBS: dict[str, Verb] = {
    "train": Verb(
        "train one stage: vlmlab train [hydra overrides], same as `python train.py ...`",
        "vlmlab.cli:train_verb",
    ),
    "eval": Verb(
        "score benchmarks: vlmlab eval CKPT --bench FILE.jsonl --out DIR [--device D --dtype T] (--make-synthetic DIR)",
        "vlmlab.eval.runner:main",
    ),
    "chat": Verb(
        "talk about an image: vlmlab chat CKPT IMAGE [--prompt TEXT] [--device D --dtype T]",
        "vlmlab.eval.chat:main",
    ),
    "demo": Verb(
        "run the CPU demo: text warm-up, stage 1, stage 2, held-out accuracy", "vlmlab.cli:demo"
    ),
    "merge": Verb(
        "fold a checkpoint chain (LoRA adapters included) into one model: vlmlab merge CKPT --out DIR",
        "vlmlab.cli:merge",
    ),
    "plan": Verb(
        "parameters, trainable parameters and memory per GPU of a composition, no download",
        "vlmlab.cli:plan",
    ),
    "export": Verb(
        "write a transformers LlavaForConditionalGeneration folder: vlmlab export --out DIR ...",
        "vlmlab.cli:export",
    ),
    "report": Verb(
        "mean ± std, 95 % intervals and paired seed comparisons of an MLflow experiment: vlmlab report --experiment NAME",
        "vlmlab.tracking.report:main",
    ),
    "tracking": Verb(
        "send what runs journaled while their MLflow server was away: vlmlab tracking sync [--root DIR]",
        "vlmlab.tracking.journal:main",
    ),
    "shards": Verb(
        "LLaVA JSON + images -> validated WebDataset shards + manifest: vlmlab shards JSON --image-root DIR --out DIR",
        "vlmlab.data.convert:main",
    ),
    "curate": Verb(
        "filter + deduplicate LLaVA JSON, with a report: vlmlab curate JSON --image-root DIR --out DIR [key=value]",
        "vlmlab.cli:curate",
    ),
    "generate": Verb(
        "LLaVA data from captions + boxes via an OpenAI-compatible endpoint or a local model: vlmlab generate DATA --out DIR [key=value]",
        "vlmlab.cli:generate",
    ),
}


def _tracked_data_verb(verb: str, argv: list[str]) -> int:
    """Run `vlmlab curate|generate`, then log its output folder as an MLflow run
    (tracking/data_runs.py) in `--tracking-uri`, else MLFLOW_TRACKING_URI, else the training
    store when VLMLAB_ROOT is set (none of them: not logged, said once), experiment
    `--experiment` (vlmlab-data); `--no-tracking` skips it."""
    import os
    from pathlib import Path

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--experiment", default="vlmlab-data")
    parser.add_argument("--no-tracking", action="store_true")
    known, _ = parser.parse_known_args(argv)
    rest = [a for a in argv if a != "--no-tracking"]
    for flag in ("--tracking-uri", "--experiment"):  # the verb's own parser does not know them
        while flag in rest:
            i = rest.index(flag)
            del rest[i : i + 2]
        rest = [a for a in rest if not a.startswith(flag + "=")]
    module = {"curate": "vlmlab.curate.cli", "generate": "vlmlab.curate.generate.cli"}[verb]
    code = int(importlib.import_module(module).main(rest))
    if known.no_tracking or known.out is None or code not in (0, 1):
        return code
    if not (Path(known.out) / "summary.json").is_file():
        return code
    from vlmlab.tracking.data_runs import log_data_run
    from vlmlab.tracking.runs import default_tracking_uri

    if not (
        known.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "VLMLAB_ROOT" in os.environ
    ):
        log.info(
            "not logged to MLflow: give --tracking-uri (or set MLFLOW_TRACKING_URI / VLMLAB_ROOT)"
        )
        return code
    uri = known.tracking_uri or default_tracking_uri()
    log_data_run(verb, Path(known.out), rest, uri, known.experiment)
    return code


def curate(argv: list[str]) -> int:
    return _tracked_data_verb("curate", argv)


def generate(argv: list[str]) -> int:
    return _tracked_data_verb("generate", argv)


def _hydra_task(cfg: Any) -> float | None:
    from vlmlab.distributed import export_job_for_ranks, isolated_job
    from vlmlab.train import train

    export_job_for_ranks()  # DDP ranks > 0 of a sweep job re-run this job only, not the sweep
    try:
        with isolated_job():  # the next sweep job in this process starts its own DDP ranks
            result = train(cfg)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(2) from None
    return result["metrics"].get("eval/accuracy")


def train_main() -> None:
    """Hydra entry point: `python train.py connector=mlp stage=2`, `-m` for sweeps."""
    import hydra

    from vlmlab.config import conf_dir, quote_numeric_choices
    from vlmlab.distributed import argv_for_rank

    sys.argv = [sys.argv[0], *argv_for_rank(quote_numeric_choices(sys.argv[1:]))]
    hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_hydra_task)()


def train_verb(argv: list[str]) -> int:
    """`vlmlab train ...`: the Hydra entry point under the verb's name."""
    sys.argv = [f"{sys.argv[0]} train", *argv]
    train_main()
    return 0


def demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmlab demo", description=VERBS["demo"].help)
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
        try:
            cfg = compose(["experiment=demo", f"stage={stage}", *args.overrides])
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


def merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmlab merge", description=VERBS["merge"].help)
    parser.add_argument("checkpoint", help="a vlmlab checkpoint folder (runs/checkpoints/<run>)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    from pathlib import Path

    from vlmlab.logs import setup_logging
    from vlmlab.merge import merge_checkpoint

    setup_logging()
    try:
        out = merge_checkpoint(Path(args.checkpoint), Path(args.out))
    except ConfigError as err:
        log.error("%s", err)
        return 2
    log.info("merged model written to %s", out)
    return 0


def plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab plan",
        description=VERBS["plan"].help + ". Builds the model on the meta device from the presets' "
        "architecture numbers; the memory formula is in `vlmlab.plan`'s docstring.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. llm=vicuna7b stage=2")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument(
        "--strategy",
        help="ddp | fsdp | deepspeed_zero1/2/3 (default: trainer.strategy, auto = ddp)",
    )
    parser.add_argument(
        "--gpus", type=int, help="world size (default: trainer.devices x trainer.num_nodes)"
    )
    parser.add_argument("--precision", help="e.g. bf16-mixed, 32-true (default: trainer.precision)")
    parser.add_argument("--micro-batch", type=int, help="default: data.batch_size")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default: data.max_length)")
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation (gradient) checkpointing"
    )
    args = parser.parse_args(argv)
    from vlmlab import plan as planning
    from vlmlab.config import compose

    try:
        result = planning.plan(
            compose(args.overrides),
            strategy=args.strategy,
            gpus=args.gpus,
            precision=args.precision,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            checkpointing=args.checkpointing,
        )
    except ConfigError as err:
        print(f"vlmlab plan: configuration error: {err}", file=sys.stderr)
        return 2
    print(planning.to_json(result) if args.json else planning.format_plan(result))
    return 0


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab export",
        description=VERBS["export"].help + ". With --checkpoint, the model is rebuilt from the "
        "configs its meta.json records and its whole chain is loaded (LoRA folded in); "
        "without, the composition given by the Hydra overrides is exported as built.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (without --checkpoint)")
    parser.add_argument("--checkpoint", help="a vlmlab checkpoint folder (runs/checkpoints/<run>)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--template", help="chat template written for the processor (default: llm.template)"
    )
    args = parser.parse_args(argv)
    from pathlib import Path

    from vlmlab.logs import setup_logging
    from vlmlab.models.hf_llava import export_hf_llava
    from vlmlab.text.templates import get_template

    setup_logging()
    try:
        if args.checkpoint:
            if args.overrides:
                raise ConfigError(
                    "overrides",
                    "a checkpoint records its own configs.",
                    "drop the overrides or --checkpoint.",
                )
            from vlmlab.merge import build_from_checkpoint

            model, tokenizer, meta = build_from_checkpoint(Path(args.checkpoint))
            template_name = args.template or meta.config.get("llm", {}).get("template")
        else:
            from vlmlab.config import compose
            from vlmlab.models import build_vlm

            cfg = compose(args.overrides)
            model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
            model.eval()
            template_name = args.template or cfg.llm.get("template")
        key = "--template" if args.template else "llm.template"
        template = get_template(template_name, tokenizer.eos_token, key) if template_name else None
        out = export_hf_llava(model, tokenizer, Path(args.out), template)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        return 2
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    log.info("load it with %s.from_pretrained(%r)", arch, str(out))
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vlmlab <verb> [args]\n\nverbs:")
        for name, verb in VERBS.items():
            print(f"  {name:<8}{verb.help}")
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        print(f"vlmlab: unknown verb {name!r}; choose from {', '.join(VERBS)}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(VERBS[name].handler()(rest))
