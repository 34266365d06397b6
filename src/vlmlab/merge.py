"""Rebuild a model from a vlmlab checkpoint chain, fold LoRA adapters in, and save it whole.

A checkpoint's meta.json records the resolved encoder/connector/LLM configs, so no overrides
are needed: `vlmlab merge runs/checkpoints/<run> --out merged/`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors.torch import save_file

from vlmlab import checkpoints
from vlmlab.checkpoints import CheckpointMeta
from vlmlab.errors import ConfigError
from vlmlab.models import VisionLanguageModel, build_vlm

log = logging.getLogger(__name__)


def build_from_checkpoint(
    ckpt_dir: Path, merge_last: bool = True
) -> tuple[VisionLanguageModel, Any, CheckpointMeta]:
    """Model + tokenizer with the whole chain of `ckpt_dir` loaded; returns its meta too."""
    meta = checkpoints.read_meta(ckpt_dir)
    config = meta.config
    if not config:
        raise ConfigError(
            "checkpoint",
            f"{ckpt_dir}/meta.json records no component config (written by an older vlmlab).",
        )
    model, tokenizer = build_vlm(
        *(OmegaConf.create(config[c]) for c in ("encoder", "connector", "llm"))
    )
    checkpoints.load_chain(model, ckpt_dir, merge_last=merge_last)
    model.eval()
    return model, tokenizer, meta


def merge_checkpoint(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write `model.safetensors` (every weight, adapters merged), `meta.json` and the tokenizer."""
    model, tokenizer, meta = build_from_checkpoint(Path(ckpt_dir), merge_last=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    tokenizer.save_pretrained(out_dir / "tokenizer")
    merged = dataclasses.replace(meta, merged_from=str(ckpt_dir), lora=None, parent=None)
    merged.write(out_dir)
    log.info("merged %s (%d tensors) into %s", ckpt_dir, len(tensors), out_dir)
    _export_if_possible(model, tokenizer, meta, out_dir / "hf")
    return out_dir


def _export_if_possible(
    model: VisionLanguageModel, tokenizer: Any, meta: CheckpointMeta, out: Path
) -> None:
    """Also write a transformers Llava folder when the composition has an HF equivalent."""
    from vlmlab.models.hf_llava import check_exportable, export_hf_llava
    from vlmlab.text.templates import get_template

    try:
        check_exportable(model)
    except ConfigError as err:
        log.info("no HF Llava export (%s); the merged model above is complete", err)
        return
    name = meta.template_name()
    template = get_template(name, tokenizer.eos_token) if name and name != "plain" else None
    export_hf_llava(model, tokenizer, out, template=template)
    log.info("HF Llava export written to %s", out)
