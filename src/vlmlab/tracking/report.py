"""`vlmlab report`: an MLflow experiment -> a markdown table (mean ± std and a 95 % interval
over seeds), paired comparisons across seeds, and a plot.

One row per configuration (the `--group-by` keys), one column per metric as mean ± sample
std, the two-sided 95 % Student t interval of the mean, and the number of finished runs
behind it. Runs that did not finish are listed apart, never averaged in.

Ablations compare arms that share seeds (same seed = same data order and initial weights), so
a difference between arms is judged on the per-seed differences, not on two overlapping
spreads: for every two configurations that differ in exactly one group-by key, the report
gives the paired differences over the `--pair-by` values (default `seed`) both have, their
mean, its 95 % t interval, and whether the interval excludes zero. The per-seed numbers are
listed too, so a reader can check every figure.

With a sweep parent (`--parent`, or the single parent all runs share) the files are also
logged as that parent run's artifacts, so the sweep carries its own summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_GROUP_BY = ("connector", "encoder", "llm", "stage")
DEFAULT_METRICS = ("eval/accuracy", "train/loss")
DEFAULT_PAIR_BY = "seed"
PARENT_TAG = "mlflow.parentRunId"


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def interval(values: list[float]) -> tuple[float, float] | None:
    """The 95 % t interval of the mean of `values` (None below two values)."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), t95(len(values) - 1)
    half *= statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class Row:
    """One configuration: its group-by values and each metric's values over seeds."""

    key: tuple[str, ...]
    values: dict[str, list[float]] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    # metric -> pair-by value (seed) -> value; a rerun of a seed replaces the earlier run
    by_pair: dict[str, dict[str, float]] = field(default_factory=dict)

    def stats(self, metric: str) -> tuple[float, float, int] | None:
        vals = self.values.get(metric, [])
        if not vals:
            return None
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return statistics.fmean(vals), std, len(vals)


@dataclass
class Pair:
    """Two configurations that differ in one key, compared on the seeds both ran."""

    key: str  # the group-by key that differs
    base: Row
    other: Row
    metric: str
    seeds: list[str]
    diffs: list[float]  # other - base, per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def ci(self) -> tuple[float, float] | None:
        return interval(self.diffs)

    @property
    def verdict(self) -> str:
        """'real' when the 95 % interval excludes 0, 'not resolved' when it does not."""
        ci = self.ci
        if ci is None:
            return "n/a (one seed)"
        return "real" if ci[0] > 0 or ci[1] < 0 else "not resolved"


def lookup(run: Any, key: str) -> str | None:
    """A run's value for a group-by key: `tags.K`, `params.K`, or K as a tag, then a param."""
    tags, params = run.data.tags, run.data.params
    if key.startswith("tags."):
        return tags.get(key[5:])
    if key.startswith("params."):
        return params.get(key[7:])
    return tags.get(key, params.get(key))


def fetch_runs(client: Any, experiment: str, parent: str | None) -> list[Any]:
    """Every run of the experiment (or of one sweep), sweep parents excluded."""
    from vlmlab.errors import ConfigError

    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(
            "--experiment", f"no MLflow experiment {experiment!r}.", f"use one of {names}."
        )
    query = f"tags.`{PARENT_TAG}` = '{parent}'" if parent else ""
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if r.data.tags.get("vlmlab.sweep") != "parent"]


def summarize(
    runs: list[Any], group_by: list[str], metrics: list[str], pair_by: str | None = None
) -> tuple[list[Row], list[Any], list[Any]]:
    """(rows of finished runs, runs that did not finish, still running)."""
    rows: dict[tuple[str, ...], Row] = {}
    failed, running = [], []
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        status = run.info.status
        if status == "RUNNING" or status == "SCHEDULED":
            running.append(run)
            continue
        if status != "FINISHED":
            failed.append(run)
            continue
        key = tuple(str(lookup(run, k)) if lookup(run, k) is not None else "-" for k in group_by)
        row = rows.setdefault(key, Row(key))
        row.run_ids.append(run.info.run_id)
        for metric in metrics:
            value = run.data.metrics.get(metric)
            if value is not None and math.isfinite(value):
                row.values.setdefault(metric, []).append(float(value))
                seed = lookup(run, pair_by) if pair_by else None
                if seed is not None:
                    row.by_pair.setdefault(metric, {})[seed] = float(value)
    return sorted(rows.values(), key=lambda r: r.key), failed, running


def _seed_order(seed: str) -> tuple[int, float | str]:
    try:
        return 0, float(seed)
    except ValueError:
        return 1, seed


def pairs(rows: list[Row], group_by: list[str], metrics: list[str]) -> list[Pair]:
    """Every two rows that differ in exactly one group-by key, per metric, on shared seeds."""
    found = []
    for i, base in enumerate(rows):
        for other in rows[i + 1 :]:
            differ = [k for k, a, b in zip(group_by, base.key, other.key) if a != b]
            if len(differ) != 1:
                continue
            for metric in metrics:
                a, b = base.by_pair.get(metric, {}), other.by_pair.get(metric, {})
                seeds = sorted(set(a) & set(b), key=_seed_order)
                if seeds:
                    diffs = [b[s] - a[s] for s in seeds]
                    found.append(Pair(differ[0], base, other, metric, seeds, diffs))
    return sorted(found, key=lambda p: (metrics.index(p.metric), group_by.index(p.key)))


def _fmt(row: Row, metric: str) -> str:
    stats = row.stats(metric)
    if stats is None:
        return "n/a"
    mean, std, n = stats
    ci = interval(row.values[metric])
    if ci is None:
        return f"{mean:.4f} (n=1)"
    return f"{mean:.4f} ± {std:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] (n={n})"


def _config(row: Row, group_by: list[str], skip: str | None = None) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(group_by, row.key) if k != skip) or "-"


def per_seed_lines(
    rows: list[Row], group_by: list[str], metrics: list[str], pair_by: str
) -> list[str]:
    """One line per configuration and seed: the numbers every mean and difference comes from."""
    lines = ["| " + " | ".join([*group_by, pair_by, *metrics]) + " |"]
    lines.append("|" + "---|" * (len(group_by) + 1 + len(metrics)))
    for row in rows:
        seeds = sorted({s for m in metrics for s in row.by_pair.get(m, {})}, key=_seed_order)
        for seed in seeds:
            cells = [
                f"{row.by_pair[m][seed]:.4f}" if seed in row.by_pair.get(m, {}) else "n/a"
                for m in metrics
            ]
            lines.append("| " + " | ".join([*row.key, seed, *cells]) + " |")
    return lines


def paired_lines(found: list[Pair], group_by: list[str], pair_by: str) -> list[str]:
    lines = [
        "| change (other keys fixed) | metric | n | "
        f"per {pair_by}: to - from | mean | 95 % interval | to ahead | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in found:
        index = group_by.index(p.key)
        change = f"{p.key}: {p.base.key[index]} -> {p.other.key[index]}"
        ci = p.ci
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(p.seeds, p.diffs))
        ahead = f"{sum(d > 0 for d in p.diffs)}/{len(p.diffs)}"
        lines.append(
            f"| {change} / {_config(p.base, group_by, p.key)} | {p.metric} | {len(p.diffs)} | "
            f"{per_seed} | {p.mean:+.4f} | {ci_text} | {ahead} | {p.verdict} |"
        )
    return lines


def markdown(
    rows: list[Row],
    failed: list[Any],
    running: list[Any],
    group_by: list[str],
    metrics: list[str],
    title: str,
    plot_name: str | None,
    pair_by: str | None = None,
) -> str:
    lines = [f"# {title}", ""]
    lines.append(
        "Mean ± sample standard deviation [95 % Student t interval of the mean] over the "
        "finished runs of each configuration (n = number of runs, usually seeds)."
    )
    lines += ["", "| " + " | ".join([*group_by, "runs", *metrics]) + " |"]
    lines.append("|" + "---|" * (len(group_by) + 1 + len(metrics)))
    for row in rows:
        cells = [*row.key, str(len(row.run_ids)), *(_fmt(row, m) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append(
            "| " + " | ".join(["(no finished runs)"] + [""] * (len(group_by) + len(metrics))) + " |"
        )
    if plot_name:
        lines += ["", f"![{', '.join(metrics)}]({plot_name})"]
    if pair_by and any(row.by_pair for row in rows):
        found = pairs(rows, group_by, metrics)
        if found:
            lines += ["", f"## Paired comparisons (same {pair_by})", ""]
            lines.append(
                f"Each pair of configurations that differ in one key, compared {pair_by} by "
                f"{pair_by} on the {pair_by}s both ran (same {pair_by}: same data order and "
                "initial weights). The difference is **real** at 95 % when the t interval of "
                "the mean paired difference excludes 0; **not resolved** means this many "
                f"{pair_by}s cannot tell it from noise (not that there is none). Each comparison "
                "has its own 5 % chance of a false **real**; with many, expect some."
            )
            lines += ["", *paired_lines(found, group_by, pair_by)]
        lines += ["", f"## Per {pair_by}", "", *per_seed_lines(rows, group_by, metrics, pair_by)]
    if failed:
        lines += ["", "## Runs that did not finish (not in the table)", ""]
        lines += ["| run | name | status | error |", "|---|---|---|---|"]
        for run in failed:
            error = run.data.tags.get("error", "").splitlines()[0:1]
            lines.append(
                f"| `{run.info.run_id}` | {run.info.run_name} | {run.info.status} | "
                f"{(error[0] if error else '').replace('|', '/')[:200]} |"
            )
    if running:
        lines += ["", f"{len(running)} run(s) still RUNNING were left out."]
    return "\n".join(lines) + "\n"


PLOT_COLUMNS = 4


def plot(rows: list[Row], metrics: list[str], group_by: list[str], out: Path) -> bool:
    """Bar chart, one panel per metric, error bars = the 95 % interval of the mean. False if
    nothing to plot."""
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = [k.split(".")[-1] for k in group_by]  # encoder.config.image_size -> image_size
    labels = ["\n".join(f"{k}={v}" for k, v in zip(short, row.key)) for row in rows]
    ncols = min(len(metrics), PLOT_COLUMNS)  # wrap: 8 metrics in one row are unreadable
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(4.0, 1.3 * len(rows)) * ncols, 4.2 * nrows),
        squeeze=False,
    )
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics):
        stats = [row.stats(metric) for row in rows]
        means = [s[0] if s else math.nan for s in stats]
        cis = [interval(row.values.get(metric, [])) for row in rows]
        halves = [(ci[1] - ci[0]) / 2 if ci else 0.0 for ci in cis]
        ax.bar(range(len(rows)), means, yerr=halves, capsize=4, color="tab:blue", alpha=0.8)
        for x, s in enumerate(stats):
            if s:
                ax.annotate(f"n={s[2]}", (x, s[0]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(f"{metric} (95 % interval)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def shared_parent(runs: list[Any]) -> str | None:
    parents = {r.data.tags.get(PARENT_TAG) for r in runs}
    return parents.pop() if len(parents) == 1 else None


def report(
    experiment: str,
    group_by: list[str],
    metrics: list[str],
    out: Path,
    tracking_uri: str,
    parent: str | None = None,
    pair_by: str | None = DEFAULT_PAIR_BY,
) -> dict[str, Any]:
    """Write report.md, report.png and report.json to `out`; returns what it wrote."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = fetch_runs(client, experiment, parent)
    rows, failed, running = summarize(runs, group_by, metrics, pair_by)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    has_plot = plot(rows, metrics, group_by, png)
    title = f"Experiment `{experiment}`" + (f", sweep `{parent}`" if parent else "")
    plot_name = png.name if has_plot else None
    text = markdown(rows, failed, running, group_by, metrics, title, plot_name, pair_by)
    commits = sorted({r.data.tags.get("git.commit", "unknown")[:12] for r in runs})
    text += (
        f"\nGenerated by `vlmlab report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"from {len(runs)} run(s); code commit(s): {', '.join(commits) or 'n/a'}.\n"
    )
    (out / "report.md").write_text(text)
    summary = {
        "experiment": experiment,
        "parent": parent,
        "group_by": group_by,
        "metrics": metrics,
        "pair_by": pair_by,
        "rows": [
            {
                "config": dict(zip(group_by, row.key)),
                "runs": row.run_ids,
                **{m: row.stats(m) for m in metrics},
                "ci95": {m: interval(row.values.get(m, [])) for m in metrics},
                "per_seed": row.by_pair,
            }
            for row in rows
        ],
        "paired": [
            {
                "key": p.key,
                "from": dict(zip(group_by, p.base.key)),
                "to": dict(zip(group_by, p.other.key)),
                "metric": p.metric,
                "seeds": p.seeds,
                "diffs": p.diffs,
                "mean": p.mean,
                "ci95": p.ci,
                "verdict": p.verdict,
            }
            for p in (pairs(rows, group_by, metrics) if pair_by else [])
        ],
        "failed": [{"run_id": r.info.run_id, "status": r.info.status} for r in failed],
        "running": [r.info.run_id for r in running],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    target = parent or shared_parent(runs)
    if target:
        for name in ("report.md", "report.json", *(["report.png"] if has_plot else [])):
            client.log_artifact(target, str(out / name), "report")
        summary["logged_to"] = target
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmlab report",
        description="Summarize an MLflow experiment: mean ± std and a 95 % interval over seeds "
        "per configuration, paired comparisons across seeds (markdown + bar plot + JSON). "
        "Finished runs only; failed ones are listed apart.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name, e.g. demo")
    parser.add_argument(
        "--group-by",
        default=",".join(DEFAULT_GROUP_BY),
        help="comma-separated keys naming a configuration: a tag (connector), a param "
        "(encoder.config.image_size), or explicit tags.K / params.K",
    )
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric keys"
    )
    parser.add_argument("--parent", help="only the children of this sweep parent run id")
    parser.add_argument(
        "--pair-by",
        default=DEFAULT_PAIR_BY,
        help="the key that pairs runs across configurations (default: seed; '' for none)",
    )
    parser.add_argument("--out", default="report", help="output folder (default: ./report)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$VLMLAB_ROOT/mlflow.db, "
        "VLMLAB_ROOT defaulting to runs)",
    )
    args = parser.parse_args(argv)
    import os

    from vlmlab.errors import ConfigError
    from vlmlab.logs import setup_logging
    from vlmlab.tracking.mlflow import tracking_uri

    setup_logging()
    try:
        uri = tracking_uri(args.tracking_uri, Path(os.environ.get("VLMLAB_ROOT", "runs")))
        summary = report(
            args.experiment,
            [k for k in args.group_by.split(",") if k],
            [m for m in args.metrics.split(",") if m],
            Path(args.out),
            uri,
            args.parent,
            args.pair_by or None,
        )
    except ConfigError as err:
        print(f"vlmlab report: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'report.png'}, {out / 'report.json'}")
    if summary.get("logged_to"):
        print(f"logged as artifacts of run {summary['logged_to']} (report/)")
    return 0
