"""The AnyRes study's report from the MLflow store: per-seed numbers, mean and spread per arm, and
the paired difference (anyres - pad, same seed) per benchmark, plus tokens per image and wall
time per arm. `vlmlab report` gives mean ± std per arm only; a study of two arms over paired
seeds needs the per-seed table and the paired interval, so this script adds them.

    python experiments/anyres_study/report.py --parent RUN_ID --out experiments/anyres_study/results \
        --tracking-uri sqlite:///runs/anyres_study/mlflow.db

Writes `study.md` and `study.json` into --out (run_toy.sh calls it after the sweep).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

from vlmlab.data.scenes import ScenesSpec
from vlmlab.models.anyres import AnyResMode, AnyResTokens, parse_grid_pinpoints
from vlmlab.tracking.report import fetch_runs, lookup

log = logging.getLogger("anyres_study.report")

EXPERIMENT = "anyres_study"
ARMS = ("pad", "anyres")
BENCHMARKS = ("scenes_hires_small", "scenes_hires_large", "scenes_hires_count")
# two-sided 95 % Student t quantiles by degrees of freedom (n seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def param(run: Any, key: str) -> str:
    value = lookup(run, f"params.{key}")
    if value is None:
        raise SystemExit(f"run {run.info.run_id} has no param {key!r}: not an anyres_study run?")
    return value


def tokens_per_image(run: Any) -> dict[str, int]:
    """Image tokens for each image size of the task, from the run's own encoder settings."""
    tile = int(param(run, "encoder.config.image_size"))
    side = tile // int(param(run, "encoder.config.patch_size"))
    spec = ScenesSpec(image_size=int(param(run, "data.generator.image_size")), resolution_task=True)
    sizes = spec.image_sizes()
    if param(run, "encoder.image") == "pad":
        return {f"{w}x{h}": side * side for w, h in sizes}
    raw = param(run, "encoder.anyres.grid_pinpoints")
    spec_pins: Any = raw if raw.startswith("(") else json.loads(raw)
    max_tiles = param(run, "encoder.anyres.max_tiles")
    pins = parse_grid_pinpoints(spec_pins, tile, None if max_tiles == "None" else int(max_tiles))
    mode = cast(AnyResMode, param(run, "encoder.anyres.mode"))
    counter = AnyResTokens(pins, tile, side, mode=mode)
    return {f"{w}x{h}": counter((w, h)).count for w, h in sizes}


def constant_baseline(run: Any) -> dict[str, tuple[str, float]]:
    """Per benchmark, the best constant answer and its accuracy: the floor a model that ignores
    the image reaches (the colours are skewed, so it is above 1/7)."""
    gen = {
        k: int(param(run, f"data.generator.{k}"))
        for k in ("num_images", "num_heldout", "image_size", "seed")
    }
    spec = ScenesSpec(**gen, resolution_task=True)
    folder = Path(param(run, "data.root")) / f"{spec.kind}-{spec.fingerprint()}" / "benchmarks"
    out = {}
    for b in BENCHMARKS:
        rows = [json.loads(line) for line in (folder / f"{b}.jsonl").read_text().splitlines()]
        answers = Counter(str(r["answer"] if "answer" in r else r["answers"][0]) for r in rows)
        best, hits = answers.most_common(1)[0]
        out[b] = (best, hits / len(rows))
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def distinct_answers(client: Any, run: Any) -> dict[str, int]:
    """Per benchmark, how many different answers the run gave (1: it ignores the question and
    the image), from the predictions the eval logged as artifacts."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in BENCHMARKS:
            path = client.download_artifacts(run.info.run_id, f"eval/{b}/predictions.jsonl", tmp)
            rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
            out[b] = len({str(r.get("prediction")) for r in rows})
    return out


def collect(client: Any, runs: list[Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> {benchmark: accuracy, loss, wall_s, tokens}; finished runs only."""
    table: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
    for run in runs:
        if run.info.status != "FINISHED":
            log.warning("left out run %s: %s", run.info.run_id, run.info.status)
            continue
        arm, seed = param(run, "encoder.image"), int(param(run, "seed"))
        metrics = run.data.metrics
        table[arm][seed] = {
            **{b: metrics.get(f"eval/{b}/accuracy") for b in BENCHMARKS},
            "loss": metrics.get("train/loss"),
            "wall_s": (run.info.end_time - run.info.start_time) / 1000.0,
            "tokens": tokens_per_image(run),
            "run_id": run.info.run_id,
            "commit": run.data.tags.get("git.commit", "unknown")[:12],
            "samples_per_s": metrics.get("perf/samples_per_s"),
            "constant": constant_baseline(run),
            "distinct": distinct_answers(client, run),
        }
    return table


def markdown(table: dict[str, dict[int, dict[str, Any]]], parent: str) -> tuple[str, dict]:
    seeds = sorted(set(table["pad"]) & set(table["anyres"]))
    lines = [f"# AnyRes study: sweep `{parent}`", ""]
    lines += [
        "## Per seed (accuracy on the held-out scenes, one question per scene and benchmark)",
        "",
    ]
    lines += [
        "| arm | seed | "
        + " | ".join(BENCHMARKS)
        + " | distinct answers (small/large/count) | final train loss | samples/s | wall s |"
    ]
    lines += ["|---|---|" + "---|" * (len(BENCHMARKS) + 4)]
    for arm in ARMS:
        for seed in sorted(table[arm]):
            r = table[arm][seed]
            cells = [f"{r[b]:.3f}" for b in BENCHMARKS]
            lines.append(
                f"| {arm} | {seed} | "
                + " | ".join(cells)
                + f" | {'/'.join(str(r['distinct'][b]) for b in BENCHMARKS)}"
                + f" | {r['loss']:.3f} | {r['samples_per_s']:.1f} | {r['wall_s']:.0f} |"
            )
    lines += ["", "## Per arm (mean ± sample std over seeds)", ""]
    lines += [
        "| arm | n | " + " | ".join(BENCHMARKS) + " | image tokens by size (w x h) | mean wall s |"
    ]
    lines += ["|---|---|" + "---|" * (len(BENCHMARKS) + 2)]
    summary: dict[str, Any] = {"parent": parent, "seeds": seeds, "arms": {}, "paired": {}}
    for arm in ARMS:
        rows = list(table[arm].values())
        if not rows:
            continue
        cells, stats = [], {}
        for b in BENCHMARKS:
            m, s = mean_sd([r[b] for r in rows])
            cells.append(f"{m:.3f} ± {s:.3f}")
            stats[b] = {"mean": m, "std": s}
        tokens = rows[0]["tokens"]
        wall = statistics.fmean(r["wall_s"] for r in rows)
        token_text = ", ".join(f"{k}: {v}" for k, v in tokens.items())
        lines.append(
            f"| {arm} | {len(rows)} | " + " | ".join(cells) + f" | {token_text} | {wall:.0f} |"
        )
        summary["arms"][arm] = {"n": len(rows), **stats, "tokens": tokens, "wall_s": wall}
        summary["constant"] = rows[0]["constant"]
    if "constant" in summary:
        cells = [f'{acc:.3f} ("{ans}")' for ans, acc in summary["constant"].values()]
        lines.append("| best constant answer | - | " + " | ".join(cells) + " | - | - |")
    lines += [
        "",
        "## Paired difference anyres - pad (same seed: same data order and initial weights)",
        "",
    ]
    lines += ["| benchmark | per seed | mean | std | 95 % t interval | seeds anyres ahead |"]
    lines += ["|---|---|---|---|---|---|"]
    for b in BENCHMARKS:
        diffs = [table["anyres"][s][b] - table["pad"][s][b] for s in seeds]
        if not diffs:
            continue
        m, s = mean_sd(diffs)
        n = len(diffs)
        half = T95.get(n - 1, 1.96) * s / n**0.5 if n > 1 else float("nan")
        ahead = sum(d > 0 for d in diffs)
        per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
        lines.append(
            f"| {b} | {per_seed} | {m:+.3f} | {s:.3f} | [{m - half:+.3f}, {m + half:+.3f}] | {ahead}/{n} |"
        )
        summary["paired"][b] = {"diffs": diffs, "mean": m, "std": s, "ci95": [m - half, m + half]}
    commits = sorted({r["commit"] for arm in ARMS for r in table[arm].values()})
    lines += [
        "",
        f"Generated by `experiments/anyres_study/report.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the MLflow store; code "
        f"commit(s) of the runs: {', '.join(commits) or 'n/a'} (with uncommitted changes, if any).",
    ]
    summary["per_seed"] = table
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", required=True, help="the sweep's MLflow parent run id")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tracking-uri", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    runs = fetch_runs(client, EXPERIMENT, args.parent)
    text, summary = markdown(collect(client, runs), args.parent)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(text)
    (args.out / "study.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("%s", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
