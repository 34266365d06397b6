"""Connectors map encoder features (B, N, Dv) to LLM embeddings (B, M, Dl).

One file per kind; a YAML in conf/connector/ names the class with `_target_`. Widths are never
typed in YAML: `build_vlm` passes `in_features` and `out_features` from the built parts.

Each class also states its size: a classmethod `expected_num_parameters(in_features,
out_features, **knobs)` (the knobs of its YAML) is the formula of the README's connector table;
`tests/test_connectors.py` checks every YAML of conf/connector/ (and any on Hydra's search path)
against it, on the meta device at LLaVA-1.5 shapes and built at the tiny ones.
"""

from __future__ import annotations

import inspect
from typing import Any


def init_arguments(
    cls: type, in_features: int, out_features: int, knobs: dict[str, Any]
) -> dict[str, Any]:
    """`cls(in_features, out_features, **knobs)`'s arguments, defaults filled in from `__init__`.

    Why: a class's `expected_num_parameters` reads its knobs from here, so the defaults are
    stated once (in `__init__`) and an unknown knob fails as it would when building.
    """
    bound = inspect.signature(cls).bind(in_features, out_features, **knobs)
    bound.apply_defaults()
    return dict(bound.arguments)


def attention_parameters(hidden: int, kv_width: int | None = None) -> int:
    """nn.MultiheadAttention: q, k, v projections (k, v from width kv_width) with biases, output."""
    kv = kv_width or hidden
    return hidden * hidden + 2 * hidden * kv + 3 * hidden + hidden * hidden + hidden
