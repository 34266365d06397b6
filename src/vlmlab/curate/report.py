"""report.md and report.png: counts per reason, the similarity histogram, examples per reason.
matplotlib draws the PNG when importable, else PIL bars (no plot library needed)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def _histogram(values: np.ndarray, bins: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    values = values[values > -1]
    low = min(float(values.min()), threshold) if len(values) else -1.0
    return np.histogram(values, bins=bins, range=(low, 1.0))


def draw_png(
    path: Path, counts: dict[str, int], nearest: np.ndarray, threshold: float, bins: int
) -> None:
    """Two panels: entries per reason (bars), nearest-neighbour cosine (histogram + threshold)."""
    hist, edges = _histogram(nearest, bins, threshold)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _draw_pil(path, counts, hist)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(counts)
    left.barh(names, [counts[n] for n in names], color="tab:blue")
    left.set_xlabel("entries")
    left.set_title("kept and rejected, per reason")
    right.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="tab:gray")
    right.axvline(threshold, color="tab:red", label=f"threshold {threshold}")
    right.set_xlabel("cosine to the nearest other image")
    right.set_ylabel("images")
    right.set_title("semantic similarity")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _draw_pil(path: Path, counts: dict[str, int], hist: np.ndarray) -> None:
    image = Image.new("RGB", (800, 300), "white")
    draw = ImageDraw.Draw(image)
    top = max(counts.values(), default=1) or 1
    for row, (name, count) in enumerate(counts.items()):
        y = 10 + row * 18
        draw.text((5, y), name, fill="black")
        draw.rectangle([160, y, 160 + int(220 * count / top), y + 12], fill="steelblue")
    peak = int(hist.max()) if len(hist) else 1
    for i, h in enumerate(hist):
        x = 420 + i * max(1, 360 // max(1, len(hist)))
        draw.rectangle([x, 280 - int(250 * h / max(peak, 1)), x + 6, 280], fill="grey")
    image.save(path)


def write_report(
    out: Path,
    summary: dict[str, Any],
    examples: Mapping[str, Sequence[dict[str, Any]]],
    nearest: np.ndarray,
    png: str,
) -> Path:
    """report.md beside the outputs; returns its path."""
    lines = [
        "# Curation report",
        "",
        f"Input: `{summary['input']}`: {summary['entries']} entries; kept {summary['kept']} "
        f"({100 * summary['kept'] / max(1, summary['entries']):.1f} %), rejected "
        f"{summary['rejected']}, bad input {summary['bad_input']} "
        f"({summary['bad_input_dropped']} dropped).",
        "",
        f"![counts and similarity]({png})",
        "",
        "| reason | entries |",
        "|---|---|",
        *[f"| {reason} | {count} |" for reason, count in summary["counts"].items()],
        "",
    ]
    valid = nearest[nearest > -1]
    if len(valid):
        q = np.quantile(valid, [0.5, 0.9, 0.99])
        lines += [
            f"Nearest-neighbour cosine over {len(valid)} distinct images: median {q[0]:.3f}, "
            f"p90 {q[1]:.3f}, p99 {q[2]:.3f}; threshold {summary['thresholds']['semantic']}.",
            "",
        ]
    lines += ["Thresholds: `" + json.dumps(summary["thresholds"]) + "`", "", "## Examples", ""]
    for reason, rows in examples.items():
        lines.append(f"### {reason}")
        for row in rows:
            lines.append(f"- line {row['line']} id `{row['id']}`: `{json.dumps(row['evidence'])}`")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
