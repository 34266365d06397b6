"""`CheckpointMeta`: what a stage checkpoint records next to its weights (`meta.json`).

Why one type: training writes it, `init_from: auto`, chains, merge, eval and export read it;
with a dict each reader guessed the keys. This module is the only place that turns the type
into JSON and back, and reading is tolerant: a meta.json written by an older vlmlab (fewer
keys, extra keys) still loads, with the documented defaults for what it lacks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

META = "meta.json"
# What meta.json + trainable.safetensors mean. A meta without the key is format 1 (every vlmlab
# before the key); one of a newer format is refused by `read_meta`, never half-understood.
META_FORMAT = 1
COMPONENTS = ("encoder", "connector", "llm")


@dataclass(frozen=True)
class CheckpointMeta:
    """A stage checkpoint's record. Paths are strings, as they are written."""

    stage: str
    complete: bool = True  # False: stopped early (max_steps, Ctrl-C); never picked by `auto`
    parent: str | None = None  # the checkpoint this stage started from (the chain's next link)
    hf_base: str | None = None  # the HF Llava folder at the root of the chain, if any
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group choices of the run
    fingerprints: dict[str, str] = field(default_factory=dict)  # component -> config hash
    config: dict[str, Any] = field(default_factory=dict)  # resolved encoder/connector/llm
    template: str | None = None  # the chat template the stage trained with
    lora: dict[str, Any] | None = None  # adapters to wrap before loading (peft LoraConfig)
    mlflow_run_id: str | None = None
    global_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    num_tensors: int = 0
    num_params: int = 0
    finished_at: float = 0.0
    merged_from: str | None = None  # `vlmlab merge`: the checkpoint folded into this folder
    extra: dict[str, Any] = field(default_factory=dict)  # keys this vlmlab does not know: kept
    format: int = META_FORMAT

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointMeta:
        """Tolerant read: missing keys take their defaults, unknown keys land in `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        extra.update(data.get("extra") or {})
        values["stage"] = str(values.get("stage", ""))
        for key in ("choices", "fingerprints", "config"):
            values[key] = dict(values.get(key) or {})
        values["metrics"] = {k: float(v) for k, v in (values.get("metrics") or {}).items()}
        values["complete"] = bool(values.get("complete", True))
        values["global_step"] = int(values.get("global_step") or 0)
        values["format"] = int(values.get("format") or 1)
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        return data

    def template_name(self) -> str | None:
        """The chat template: the stage's, else the LLM preset's (older metas lack `template`)."""
        return self.template or self.config.get("llm", {}).get("template")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / META
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def read_meta(folder: Path) -> CheckpointMeta:
    """`<folder>/meta.json` as a CheckpointMeta (a checkpoint or a `vlmlab merge` folder).

    A newer format than this vlmlab reads is refused (ConfigError), naming both numbers."""
    meta = CheckpointMeta.from_dict(json.loads((Path(folder) / META).read_text()))
    if meta.format > META_FORMAT:
        raise ConfigError(
            "checkpoint format",
            f"{folder} is a stage checkpoint of format {meta.format}; this vlmlab reads format "
            f"{META_FORMAT} and older.",
            "load it with the vlmlab version that wrote it (or a newer one).",
        )
    return meta
