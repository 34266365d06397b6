"""A ready-to-generate model from whatever names one: a vlmlab checkpoint folder (its chain
loaded), a `vlmlab merge` folder, an MLflow run id or `runs:/<id>` URI, or an HF Llava / LlavaNext export.

Each comes with the chat template it was trained with, so prompts match training, and is placed
on the device (`--device`, default cuda when a GPU is visible) in the dtype (`--dtype`) asked for.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmlab.checkpoints.meta import CheckpointMeta
from vlmlab.errors import ConfigError
from vlmlab.eval.generate import Generator
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text.templates import Template, available_templates, get_template

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_FLASH = ("flash_attention_2", "flash_attention_3")


def default_device() -> str:
    """cuda when a GPU is visible, else cpu (what `--device` means when not given)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None = None) -> torch.device:
    """`--device` checked against this machine, so a typo or a missing GPU fails before loading."""
    name = default_device() if device is None or not str(device).strip() else str(device).strip()
    fix = "use cpu, cuda, cuda:N or mps."
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"{name!r} is not a device.", fix) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device",
                f"{name}: no CUDA GPU is visible on this machine.",
                "use --device cpu, or run where `nvidia-smi` lists a GPU (check "
                "CUDA_VISIBLE_DEVICES).",
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                "--device", f"{name}: {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})."
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device", "mps: no Apple GPU (MPS) is available here.", fix)
        return dev
    raise ConfigError("--device", f"{name}: {dev.type} devices are not supported.", fix)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, shared by `vlmlab eval` and `vlmlab chat`."""
    parser.add_argument(
        "--device",
        help="where the model runs: cpu, cuda, cuda:N or mps (default: cuda when a GPU is "
        "visible, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights dtype (default auto: as the model records; an HF export loads in "
        "float32); bfloat16 halves memory and is what a 7B wants on a GPU",
    )


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    """`--dtype`: None for auto (the dtypes the model records), else the torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError("--dtype", f"got {dtype!r}.", f"use one of {list(DTYPE_CHOICES)}.")
    return DTYPES[dtype]


def runtime_config(
    config: dict[str, Any], device: torch.device, dtype: str | None = None
) -> dict[str, Any]:
    """A recorded component config adapted to where it runs now (the record is left alone).

    `dtype` (float32/bfloat16/float16) becomes the load dtype of encoder and LLM, so pretrained
    weights load straight into it. A flash attention kernel recorded by a GPU run becomes sdpa
    where it cannot run: off CUDA, without flash-attn, or on float32 weights (flash computes in
    fp16/bf16 only and generation runs without autocast).
    """
    from vlmlab.models.llm import flash_attention_problem

    adapted = {part: dict(config[part]) for part in ("encoder", "connector", "llm")}
    for part in ("encoder", "llm"):
        spec = adapted[part]
        if dtype is not None and dtype != "auto":
            spec["dtype"] = dtype
        kernel = spec.get("attn_implementation")
        if kernel in _FLASH:
            why: str | None
            if device.type != "cuda":
                why = f"the device is {device}"
            elif spec.get("dtype", "float32") == "float32":
                why = "float32 weights: flash attention computes in fp16/bf16 only"
            else:
                why = flash_attention_problem(kernel)
            if why:
                log.info("%s.attn_implementation: %s -> sdpa (%s)", part, kernel, why)
                spec["attn_implementation"] = "sdpa"
    return adapted


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    tokenizer: Any
    template: Template
    source: Path
    kind: str  # checkpoint | merged | hf

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generator(self) -> Generator:
        return Generator(self.model, self.tokenizer, self.template, self.model.image_processor)


def resolve_reference(reference: str, tracking_uri: str | None = None) -> Path:
    """A folder as given, or the checkpoint folder an MLflow run recorded."""
    from vlmlab.checkpoints import is_run_reference
    from vlmlab.tracking.runs import checkpoint_of_run

    path = Path(reference)
    if path.exists():
        return path
    if is_run_reference(reference):
        return checkpoint_of_run(reference, tracking_uri, "checkpoint")
    if reference.startswith("models:/"):  # a registered stage checkpoint (tracking/models.py)
        from vlmlab.tracking.models import checkpoint_of_model
        from vlmlab.tracking.runs import default_tracking_uri

        return checkpoint_of_model(reference, tracking_uri or default_tracking_uri(), "checkpoint")
    raise ConfigError(
        "checkpoint",
        f"{reference!r} is neither a folder nor an MLflow run id / runs:/<id> / "
        "models:/<name>/<version> URI.",
        "give a checkpoint folder (runs/checkpoints/<run>), a merged or HF Llava / LlavaNext export folder, "
        "or a run id.",
    )


def load_model(
    reference: str | Path,
    tracking_uri: str | None = None,
    template: str | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
) -> LoadedModel:
    """Build and load the model `reference` names, in eval mode on `device`.

    `template` overrides the recorded one. `device` None = cuda when available, else cpu.
    `dtype` auto keeps the recorded dtypes (an HF export loads in float32); float32, bfloat16
    or float16 loads encoder and LLM in it and casts the connector (bf16 is what a 7B wants on
    a GPU).
    """
    target = resolve_device(device)
    cast = resolve_dtype(dtype)
    path = resolve_reference(str(reference), tracking_uri)
    if (path / "meta.json").is_file() and (path / "trainable.safetensors").is_file():
        model, tokenizer, meta = _load_checkpoint(path, target, dtype)
        name = template or meta.template_name()
        kind = "checkpoint"
    elif (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        model, tokenizer, meta = _load_merged(path, target, dtype)
        name = template or meta.template_name()
        kind = "merged"
    elif (path / "config.json").is_file():
        from vlmlab.models.hf_llava import load_hf_llava

        name = template or detect_hf_template(path)
        model, tokenizer = load_hf_llava(path, dtype=cast or torch.float32, template=name)
        kind = "hf"
    else:
        raise ConfigError(
            "checkpoint",
            f"{path} holds no trainable.safetensors + meta.json (vlmlab checkpoint), "
            "model.safetensors + meta.json (vlmlab merge) or config.json (HF Llava / LlavaNext export).",
        )
    if cast is not None:
        model.connector.to(cast)  # encoder and LLM were built in it
    model.to(target)
    model.eval()
    log.info("loaded %s model from %s (template %s) on %s", kind, path, name, target)
    return LoadedModel(model, tokenizer, get_template(str(name), tokenizer.eos_token), path, kind)


def _build(
    meta: CheckpointMeta, path: Path, device: torch.device, dtype: str | None
) -> tuple[VisionLanguageModel, Any]:
    from omegaconf import OmegaConf

    from vlmlab.models import build_vlm

    config = meta.config
    if not config:
        raise ConfigError(
            "checkpoint",
            f"{path}/meta.json records no component config (written by an older vlmlab).",
        )
    config = runtime_config(config, device, dtype)
    return build_vlm(*(OmegaConf.create(config[c]) for c in ("encoder", "connector", "llm")))


def _load_checkpoint(
    path: Path, device: torch.device, dtype: str | None
) -> tuple[VisionLanguageModel, Any, CheckpointMeta]:
    """merge.build_from_checkpoint, with the recorded configs adapted by `runtime_config`."""
    from vlmlab import checkpoints

    meta = checkpoints.read_meta(path)
    model, tokenizer = _build(meta, path, device, dtype)
    checkpoints.load_chain(model, path, merge_last=True)
    return model, tokenizer, meta


def _load_merged(
    path: Path, device: torch.device, dtype: str | None
) -> tuple[VisionLanguageModel, Any, CheckpointMeta]:
    from safetensors.torch import load_file

    from vlmlab.checkpoints import read_meta

    meta = read_meta(path)
    model, tokenizer = _build(meta, path, device, dtype)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model, tokenizer, meta


def detect_hf_template(path: Path) -> str:
    """The vlmlab template whose Jinja form is the export's chat template (vicuna_v1 if none)."""
    from vlmlab.models.hf_llava import chat_template_for
    from vlmlab.models.llm import build_tokenizer

    saved = _saved_chat_template(path)
    if saved:
        # vlmlab's loader: a folder saved by the SentencePiece backend reloads with it
        tokenizer = build_tokenizer({"name_or_path": str(path)})
        for name in available_templates():
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
