"""Wall time and accuracy of `vlmlab demo`, this tree against a baseline commit, in one run.

    python benchmarks/demo_walltime.py [--baseline REV] [--runs 2] [--max-ratio 1.10] [--min-accuracy 0.8]

A refactor must not make the demo slower or worse. The baseline is `git worktree add`-ed at REV
(default: `origin/main` if it exists, else `HEAD`) into a temp folder and run with the same
interpreter, its `src/` first on PYTHONPATH (the package finds `conf/` next to its own source).
Runs alternate baseline / current so a load spike hits both alike; each run gets a fresh
VLMLAB_ROOT. Prints the median wall time of each, their ratio, and each run's held-out accuracy.
Exit status 1 when the ratio exceeds `--max-ratio` or any current run's accuracy is below
`--min-accuracy`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("demo_walltime")
REPO = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"held-out colour accuracy: ([0-9.]+|n/a)")


def run_demo(src: Path, root: Path) -> tuple[float, float | None]:
    """One `vlmlab demo` with `src` first on the path; (seconds, accuracy)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "VLMLAB_ROOT": str(root),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "vlmlab", "demo"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"demo from {src} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = ACCURACY.findall(done.stdout + done.stderr)
    accuracy = float(found[-1]) if found and found[-1] != "n/a" else None
    return seconds, accuracy


def default_baseline() -> str:
    probe = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "origin/main"], cwd=REPO, capture_output=True
    )
    return "origin/main" if probe.returncode == 0 else "HEAD"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=None, help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-ratio", type=float, default=1.10)
    parser.add_argument("--min-accuracy", type=float, default=0.8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    baseline = args.baseline or default_baseline()
    with tempfile.TemporaryDirectory(prefix="demo_walltime_") as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), baseline],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            results: dict[str, list[tuple[float, float | None]]] = {"baseline": [], "current": []}
            for i in range(args.runs):
                for name, src in (("baseline", tree / "src"), ("current", REPO / "src")):
                    root = Path(tmp) / f"{name}{i}"
                    root.mkdir()
                    results[name].append(run_demo(src, root))
                    log.info("%s run %d: %.1fs, accuracy %s", name, i, *results[name][-1])
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False
            )
    median = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    ratio = median["current"] / median["baseline"]
    log.info("baseline %s: median %.1fs", baseline, median["baseline"])
    log.info(
        "current tree: median %.1fs  ratio %.3f (limit %.2f)",
        median["current"],
        ratio,
        args.max_ratio,
    )
    accuracies = [a for _, a in results["current"]]
    log.info("current accuracies: %s (minimum %.2f)", accuracies, args.min_accuracy)
    ok = ratio <= args.max_ratio and all(
        a is not None and a >= args.min_accuracy for a in accuracies
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
