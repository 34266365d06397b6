"""Developer sessions. They reuse the current environment (the README's `.venv`): a fresh
6 GB torch install per session would cost minutes and prove nothing extra.

    nox -s tests      # fast suite (default pytest selection)
    nox -s slow       # multi-process, sweep and full-demo tests
    nox -s lint       # ruff check + format check
    nox -s typecheck  # mypy on src/vlmlab
    nox -s demo       # the CPU demo: text warm-up, stage 1, stage 2, held-out accuracy
    nox -s bench      # benchmarks/*.py: each prints its ratio against a baseline run alongside
    nox -s gpu_smoke  # on a CUDA machine: every GPU preset vs an fp32 reference (skips on CPU)
"""

import sys

import nox

PY = sys.executable  # the interpreter nox runs under, i.e. the project venv

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    session.run(PY, "-m", "pytest", *session.posargs)


@nox.session(python=False)
def slow(session: nox.Session) -> None:
    session.run(PY, "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    paths = ("src", "tests", "benchmarks", "noxfile.py", "train.py")
    session.run(PY, "-m", "ruff", "check", *paths)
    session.run(PY, "-m", "ruff", "format", "--check", *paths)


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    session.run(PY, "-m", "mypy")


@nox.session(python=False)
def demo(session: nox.Session) -> None:
    session.run(PY, "-m", "vlmlab", "demo", *session.posargs)


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    for script in ("padding.py", "generation_kv_cache.py", "data_throughput.py"):
        session.run(PY, f"benchmarks/{script}", *session.posargs)


@nox.session(python=False)
def gpu_smoke(session: nox.Session) -> None:
    session.run(PY, "benchmarks/gpu_smoke.py", *session.posargs)
