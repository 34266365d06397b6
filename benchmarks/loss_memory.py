"""Peak memory of the training loss path (output head + cross-entropy, forward + backward).

    python benchmarks/loss_memory.py [--batch 4] [--seq 2048] [--vocab 128256] [--hidden 256] \
        [--target-fraction 0.5] [--chunk-size N]

Two ways to get the loss from the decoder's last hidden states (B, T, D), each measured in its
own process by its peak resident memory (`ru_maxrss`) minus its resident memory just before
the loss:

- **baseline**: the formula VisionLanguageModel used before (copied here): full (B, T, V)
  logits from the head, `logits[:, :-1].reshape(-1, V).float()`, `F.cross_entropy` with
  ignore_index; the logits are dropped before `backward`, as Lightning drops the step output;
- **ours**: `vlmlab.models.vlm.target_token_loss`, the code the model's training forward runs:
  target positions only (from the labels, as `collate` computes them), head and fp32 CE in
  checkpointed chunks of `VisionLanguageModel.loss_chunk_size` target tokens.

The head is a bf16 `nn.Linear(D, V)` that trains (a real LLM's lm_head in stage 2), the hidden
states bf16 and requiring grad (they carry the gradient into the decoder); the loss is fp32 in
both. Each sample's answer span (labels != -100) covers `--target-fraction` of its positions.
Target: ours <= 0.5 x baseline (exit status 1 when missed). The loss and the gradients of both
are compared (they must agree).

The baseline needs about 13 GB at the default shape (one bf16 and three fp32 (B*T, V) tensors
alive at its peak); a run refuses to start a variant whose estimate exceeds the memory
available (MemAvailable) minus 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET = 0.5
GIB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(variant: str, args: argparse.Namespace) -> int:
    """Rough peak of a variant (for the memory guard, not the measurement)."""
    rows = args.batch * args.seq
    if variant == "baseline":  # fp32 log-probs, their grad and the logits grad at once
        return rows * args.vocab * 12 + GIB  # measured: ~11.6 bytes per logit
    chunk = args.chunk_size
    return chunk * args.vocab * (2 + 4 * 4) + GIB


def baseline_loss(head: Any, hidden: Any, labels: Any) -> Any:
    """The loss formula VisionLanguageModel used before (copied from models/vlm.py)."""
    import torch.nn.functional as F

    logits = head(hidden)  # (B, T, V)
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
    )


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vlmlab.models.vlm import target_token_loss
    from vlmlab.text.labels import target_positions

    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, dtype=torch.bfloat16)
    hidden = torch.randn(args.batch, args.seq, args.hidden, dtype=torch.bfloat16)
    hidden.requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    prompt = int(args.seq * (1 - args.target_fraction))
    labels[:, :prompt] = -100  # each row: a prompt, then its answer
    target_index = target_positions(labels)  # collate computes this on the CPU
    num_targets = int(target_index.numel())

    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if args.child == "baseline":
        loss = baseline_loss(head, hidden, labels)
    else:
        loss = target_token_loss(head, hidden, labels, target_index, num_targets, args.chunk_size)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert hidden.grad is not None and head.weight.grad is not None
    return {
        "variant": args.child,
        "loss": float(loss),
        "hidden_grad_sum": float(hidden.grad.float().abs().sum()),
        "head_grad_sum": float(head.weight.grad.float().abs().sum()),
        "target_tokens": num_targets,
        "rss_before": before,
        "peak_before": peak_before,
        "peak": peak,
        "peak_delta": peak - before,
        "seconds": seconds,
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    need, available = estimate_bytes(variant, args), _available_bytes()
    if need > available - 2 * GIB:
        raise SystemExit(
            f"{variant} needs about {need / GIB:.1f} GiB, {available / GIB:.1f} GiB available: "
            "free memory or lower --batch / --seq."
        )
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from vlmlab.models.vlm import DEFAULT_LOSS_CHUNK_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)  # Llama-3
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--target-fraction", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE)
    parser.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    print(
        f"B={args.batch} T={args.seq} V={args.vocab} D={args.hidden}, bf16 head, fp32 loss, "
        f"target fraction {args.target_fraction}, chunk {args.chunk_size} tokens"
    )
    results = {v: run_variant(v, args) for v in ("baseline", "ours")}
    for name, r in results.items():
        print(
            f"{name:9s} peak RSS over the loss: {r['peak_delta'] / GIB:6.2f} GiB "
            f"(process peak {r['peak'] / GIB:.2f} GiB, {r['seconds']:.1f} s, loss {r['loss']:.6f})"
        )
    base, ours = results["baseline"], results["ours"]
    ratio = ours["peak_delta"] / base["peak_delta"]
    agree = abs(base["loss"] - ours["loss"]) <= 1e-4 * abs(base["loss"]) and all(
        abs(base[k] - ours[k]) <= 2e-2 * abs(base[k]) for k in ("hidden_grad_sum", "head_grad_sum")
    )
    print(f"ratio ours / baseline: {ratio:.3f} (target <= {TARGET})")
    print(f"loss and gradients agree: {agree}")
    ok = ratio <= TARGET and agree
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
