"""A ready-to-generate model from whatever names one: a vlmlab checkpoint folder (its chain
loaded), a `vlmlab merge` folder, an MLflow run id or `runs:/<id>` URI, or an HF Llava export.

Each comes with the chat template it was trained with, so prompts match training.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.data.templates import _TEMPLATES, Template, get_template
from vlmlab.errors import ConfigError
from vlmlab.eval.generate import Generator
from vlmlab.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    tokenizer: Any
    template: Template
    source: Path
    kind: str  # checkpoint | merged | hf

    def generator(self) -> Generator:
        return Generator(
            self.model, self.tokenizer, self.template, self.model.encoder.image_transform
        )


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the store `vlmlab train` writes: sqlite:///$VLMLAB_ROOT/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(os.environ.get("VLMLAB_ROOT", "runs")).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_reference(reference: str, tracking_uri: str | None = None) -> Path:
    """A folder as given, or the checkpoint folder an MLflow run recorded."""
    from vlmlab import checkpoints

    path = Path(reference)
    if path.exists():
        return path
    if checkpoints.is_run_reference(reference):
        return checkpoints.from_mlflow(reference, tracking_uri or default_tracking_uri())
    raise ConfigError(
        "checkpoint",
        f"{reference!r} is neither a folder nor an MLflow run id / runs:/<id> URI.",
        "give a checkpoint folder (runs/checkpoints/<run>), a merged or HF Llava export folder, "
        "or a run id.",
    )


def load_model(
    reference: str | Path, tracking_uri: str | None = None, template: str | None = None
) -> LoadedModel:
    """Build and load the model `reference` names; `template` overrides the recorded one."""
    path = resolve_reference(str(reference), tracking_uri)
    if (path / "meta.json").is_file() and (path / "trainable.safetensors").is_file():
        from vlmlab.merge import build_from_checkpoint

        model, tokenizer, meta = build_from_checkpoint(path)
        name = template or meta.get("template") or meta["config"]["llm"].get("template")
        kind = "checkpoint"
    elif (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        model, tokenizer, meta = _load_merged(path)
        name = template or meta.get("template") or meta["config"]["llm"].get("template")
        kind = "merged"
    elif (path / "config.json").is_file():
        from vlmlab.models.hf_llava import load_hf_llava

        name = template or detect_hf_template(path)
        model, tokenizer = load_hf_llava(path, template=name)
        kind = "hf"
    else:
        raise ConfigError(
            "checkpoint",
            f"{path} holds no trainable.safetensors + meta.json (vlmlab checkpoint), "
            "model.safetensors + meta.json (vlmlab merge) or config.json (HF Llava export).",
        )
    model.eval()
    log.info("loaded %s model from %s (template %s)", kind, path, name)
    return LoadedModel(model, tokenizer, get_template(str(name), tokenizer.eos_token), path, kind)


def _load_merged(path: Path) -> tuple[VisionLanguageModel, Any, dict[str, Any]]:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from vlmlab.models import build_vlm

    meta = json.loads((path / "meta.json").read_text())
    config = meta["config"]
    model, tokenizer = build_vlm(
        *(OmegaConf.create(config[c]) for c in ("encoder", "connector", "llm"))
    )
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model, tokenizer, meta


def detect_hf_template(path: Path) -> str:
    """The vlmlab template whose Jinja form is the export's chat template (vicuna_v1 if none)."""
    from transformers import AutoTokenizer

    from vlmlab.models.hf_llava import chat_template_for

    saved = _saved_chat_template(path)
    if saved:
        tokenizer = AutoTokenizer.from_pretrained(path)
        for name in _TEMPLATES:
            if name == "plain":
                continue
            candidate = get_template(name, tokenizer.eos_token)
            if chat_template_for(candidate, tokenizer) == saved:
                return name
    log.info("%s: chat template not recognised; using vicuna_v1 (pass --template)", path)
    return "vicuna_v1"


def _saved_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("chat_template")
            if isinstance(value, str):
                return value
    return None
