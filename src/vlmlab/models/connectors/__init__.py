"""Connectors map encoder features (B, N, Dv) to LLM embeddings (B, M, Dl).

One file per kind; a YAML in conf/connector/ names the class with `_target_`. Widths are never
typed in YAML: `build_vlm` passes `in_features` and `out_features` from the built parts.
"""
