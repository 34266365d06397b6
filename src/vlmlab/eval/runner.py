"""`vlmlab eval`: answer benchmark JSONL files with a model and score them.

One JSONL row per question: {id, image (relative to the file's folder, or absolute; optional),
question, answer (str) or answers (list), type (a registered scorer: vqa|exact|pope|mc built in,
more from `vlmlab.eval.scorers`; default exact), options (mc)}. A row that cannot be scored
(invalid JSON, no answer, missing image, unknown type, ...) is rejected with its line number,
reported and listed in summary.json; the other rows are scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from vlmlab.errors import ConfigError
from vlmlab.eval import scorers
from vlmlab.eval.generate import GenerationConfig, Generator, Request
from vlmlab.eval.loading import add_device_arguments, load_model
from vlmlab.eval.scorers import MC_PROMPT as MC_PROMPT  # re-exported: prompts live with scorers
from vlmlab.eval.scorers import SHORT_ANSWER_PROMPT as SHORT_ANSWER_PROMPT
from vlmlab.eval.scorers import Item, Query
from vlmlab.eval.scorers import RowError as _Reject
from vlmlab.text import IMAGE_PLACEHOLDER
from vlmlab.text.templates import Turn

log = logging.getLogger(__name__)


def _answers(row: dict[str, Any]) -> list[str]:
    if isinstance(row.get("answers"), list) and row["answers"]:
        if not all(isinstance(a, str) for a in row["answers"]):
            raise _Reject("answers must be a list of strings")
        return list(row["answers"])
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        return [row["answer"]]
    raise _Reject("no answer: give `answer` (a string) or `answers` (a list of strings)")


def _parse_row(
    row: Any, line: int, folder: Path, registry: dict[str, type[scorers.Scorer]] | None = None
) -> Item:
    """The generic checks (question, answer, image), then the row type's scorer's own."""
    if not isinstance(row, dict):
        raise _Reject("not a JSON object")
    kind = row.get("type", scorers.DEFAULT_TYPE)
    scorer = scorers.get_scorer(kind, registry)  # unknown type: rejected, naming the known ones
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _Reject("no question")
    answers = _answers(row)
    item = Item(str(row.get("id", f"line{line}")), line, question, kind, answers, row=row)
    if row.get("image"):
        image = Path(str(row["image"]))
        image = image if image.is_absolute() else folder / image
        if not image.is_file():
            raise _Reject(f"image not found: {image}")
        item.image = image
    scorer.validate(item)
    return item


def read_benchmark(path: Path) -> tuple[list[Item], list[dict[str, Any]]]:
    """Valid items and rejected lines ({line, reason}) of a benchmark JSONL file."""
    items: list[Item] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    registry = scorers.discover()
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                item = _parse_row(json.loads(text), line, path.parent, registry)
                if item.id in seen:
                    raise _Reject(f"duplicate id {item.id!r}")
            except json.JSONDecodeError as err:
                rejected.append({"line": line, "reason": f"invalid JSON: {err.msg}"})
                continue
            except _Reject as err:
                rejected.append({"line": line, "reason": str(err)})
                continue
            seen.add(item.id)
            items.append(item)
    for entry in rejected:
        log.warning("%s line %d rejected: %s", path, entry["line"], entry["reason"])
    return items, rejected


def _queries(item: Item, short_answer_prompt: bool, circular: bool) -> list[Query]:
    return scorers.get_scorer(item.type).queries(item, short_answer_prompt, circular)


def score(query: Query, prediction: str, settings: scorers.Settings | None = None) -> float:
    """The query's score under its benchmark type and `settings` (its scorer does the work)."""
    return scorers.get_scorer(query.item.type, settings=settings).score(query, prediction)


def prediction_row(
    query: Query, prediction: str, settings: scorers.Settings | None = None
) -> dict[str, Any]:
    """One line of predictions.jsonl: the query, the model's answer and its score."""
    return {
        "id": query.item.id,
        "question": query.text,
        "prediction": prediction,
        "answers": query.item.answers,
        "score": score(query, prediction, settings),
        "type": query.item.type,
        **({"options": query.options, "rotation": query.rotation} if query.options else {}),
    }


def summarize(rows: list[dict[str, Any]], items: list[Item], circular: bool) -> dict[str, float]:
    """`accuracy` over items (each scorer folds its item's queries), then each type's own metrics."""
    by_item: dict[str, list[float]] = {}
    for row in rows:
        by_item.setdefault(row["id"], []).append(row["score"])
    metrics: dict[str, float] = {}
    if items:
        per_item = [
            scorers.get_scorer(i.type).item_score(by_item[i.id]) for i in items if i.id in by_item
        ]
        metrics["accuracy"] = sum(per_item) / len(per_item) if per_item else 0.0
    by_type: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    for kind, typed in by_type.items():
        scorer = scorers.get_scorer(kind)
        metrics.update(scorer.metrics(typed, mixed=len(typed) != len(rows), circular=circular))
    return metrics


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:  # the Generator prepares it as training did
        return image.copy()


def run_benchmark(
    generator: Generator,
    bench: Path,
    out_dir: Path,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    short_answer_prompt: bool = False,
    circular: bool = False,
    max_samples: int | None = None,
    name: str | None = None,
    scoring: scorers.Settings | None = None,
) -> dict[str, Any]:
    """Answer and score one benchmark file; writes out_dir/<name>/{predictions.jsonl,summary.json}.

    `scoring`: scorer settings by row type (`eval.scoring`, e.g. {"vqa": {"mode": "official"}});
    the resolved values, defaults included, go into the summary's `settings.scoring`.
    """
    bench = Path(bench)
    if not bench.is_file():
        raise ConfigError("--bench", f"{bench} does not exist.", "give a benchmark JSONL file.")
    scoring = scorers.resolve_settings(scoring)
    name = name or bench.stem
    items, rejected = read_benchmark(bench)
    if max_samples is not None:
        items = items[: int(max_samples)]
    queries = [q for item in items for q in _queries(item, short_answer_prompt, circular)]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(queries), batch_size):
        batch: list[Query] = []
        requests: list[Request] = []
        for query in queries[start : start + batch_size]:
            image = None
            if query.item.image is not None:
                try:
                    image = _load_image(query.item.image)
                except OSError as err:
                    rejected.append({"line": query.item.line, "reason": f"unreadable image: {err}"})
                    log.warning("%s line %d rejected: %s", bench, query.item.line, err)
                    continue
            text = f"{IMAGE_PLACEHOLDER}\n{query.text}" if image is not None else query.text
            batch.append(query)
            requests.append(Request([Turn("human", text)], image))
        for query, prediction in zip(batch, generator(requests, config)):
            rows.append(prediction_row(query, prediction, scoring))
    scored = {r["id"] for r in rows}
    items = [i for i in items if i.id in scored]
    summary = {
        "benchmark": name,
        "file": str(bench),
        "num_samples": len(items),
        "metrics": summarize(rows, items, circular),
        "num_rejected": len(rejected),
        "rejected": sorted(rejected, key=lambda r: r["line"]),
        "settings": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "short_answer_prompt": short_answer_prompt,
            "circular": circular,
            "scoring": scoring,
            "template": generator.template.name,
            "device": str(next(generator.model.parameters()).device),
            "dtype": str(generator.model.llm.dtype).removeprefix("torch."),
        },
    }
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not items:
        log.warning("%s: no row could be scored (%d rejected)", bench, len(rejected))
    return summary


def format_table(summaries: list[dict[str, Any]]) -> str:
    """One line per benchmark: samples, every metric, rejected lines."""
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s["metrics"] if k not in keys]
    header = ["benchmark", "n", *keys, "rejected"]
    lines = [header]
    for s in summaries:
        values = [f"{s['metrics'][k]:.4f}" if k in s["metrics"] else "-" for k in keys]
        lines.append([s["benchmark"], str(s["num_samples"]), *values, str(s["num_rejected"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def make_synthetic(out_dir: Path, overrides: list[str]) -> dict[str, Path]:
    """Synthetic benchmarks from the held-out split of the shapes data the config names."""
    from vlmlab.config import compose
    from vlmlab.data.prepare import resolve_dataset
    from vlmlab.eval.benchmarks import write_synthetic
    from vlmlab.schema import DataConfig, typed

    cfg = compose(overrides)
    dataset = resolve_dataset(typed(cfg.data, DataConfig), str(cfg.stage.dataset))
    root = dataset["synthetic_root"]
    if root is None:
        raise ConfigError(
            "data",
            f"synthetic benchmarks come from generated data (data=shapes), not {cfg.data.name}.",
        )
    if dataset["prepare"] is not None:
        dataset["prepare"]()
    return write_synthetic(root, out_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab eval",
        description="Score a model on benchmark JSONL files (vqa, exact, pope, mc), or write the "
        "synthetic shapes benchmarks with --make-synthetic DIR [data overrides].",
    )
    parser.add_argument(
        "args",
        nargs="*",
        help="CHECKPOINT (a checkpoint/merged/HF Llava folder or an MLflow run id / runs:/ URI); "
        "with --make-synthetic: Hydra overrides selecting the shapes data, e.g. data=tiny",
    )
    parser.add_argument("--bench", action="append", default=[], help="benchmark JSONL (repeatable)")
    parser.add_argument(
        "--out", help="output folder: <out>/<benchmark>/{predictions.jsonl,summary.json}"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--short-answer-prompt", action="store_true", help="LLaVA-1.5 eval prompts")
    parser.add_argument("--circular", action="store_true", help="MMBench CircularEval for mc rows")
    parser.add_argument(
        "--vqa-mode",
        choices=scorers.VQA_MODES,
        default=scorers.VQA_MODES[0],
        help="whose VQAv2 accuracy: official vqaEval.py (default), lmms-eval 0.7.3, or LLaVA's "
        "test-dev path (EvalAI answer processor, then official)",
    )
    parser.add_argument(
        "--mc-extract",
        choices=scorers.MC_EXTRACTS,
        default=scorers.MC_EXTRACTS[0],
        help="mc answers MMBench's extractor cannot read: our rules (default) or wrong, as "
        "VLMEvalKit without a judge",
    )
    parser.add_argument("--max-samples", type=int, help="score only the first N valid rows")
    parser.add_argument(
        "--template", help="chat template (default: the one the model trained with)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store for run ids (default: $MLFLOW_TRACKING_URI or sqlite:///$VLMLAB_ROOT/mlflow.db)",
    )
    parser.add_argument(
        "--make-synthetic", metavar="DIR", help="write the synthetic benchmarks to DIR"
    )
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    from vlmlab.logs import setup_logging

    setup_logging()
    try:
        if args.make_synthetic:
            paths = make_synthetic(Path(args.make_synthetic), args.args)
            for name, path in paths.items():
                print(f"{name}\t{path}")
            return 0
        if len(args.args) != 1 or not args.bench or not args.out:
            parser.error("give CHECKPOINT, at least one --bench FILE and --out DIR")
        missing = [b for b in args.bench if not Path(b).is_file()]
        if missing:
            raise ConfigError(
                "--bench", f"{', '.join(missing)} not found.", "give benchmark JSONL files."
            )
        loaded = load_model(
            args.args[0], args.tracking_uri, args.template, device=args.device, dtype=args.dtype
        )
        generator = loaded.generator()
        names: list[str] = []
        for bench in args.bench:  # two files with one stem must not share an output folder
            stem = Path(bench).stem
            names.append(stem if stem not in names else f"{stem}_{len(names)}")
        summaries = [
            run_benchmark(
                generator,
                Path(bench),
                Path(args.out),
                name=name,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                short_answer_prompt=args.short_answer_prompt,
                circular=args.circular,
                max_samples=args.max_samples,
                scoring={"vqa": {"mode": args.vqa_mode}, "mc": {"extract": args.mc_extract}},
            )
            for bench, name in zip(args.bench, names)
        ]
    except (ConfigError, FileNotFoundError) as err:
        print(f"vlmlab eval: {err}", file=sys.stderr)
        return 2
    print(format_table(summaries))
    for s in summaries:
        for entry in s["rejected"]:
            print(f"{s['benchmark']}: line {entry['line']} rejected: {entry['reason']}")
    return 0
