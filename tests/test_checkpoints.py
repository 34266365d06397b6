"""The checkpoints package: `CheckpointMeta` is the one reader/writer of meta.json, and a
checkpoint written by wave-1 code (its meta a plain dict, some keys missing) still loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from vlmlab import checkpoints, stages
from vlmlab.checkpoints import CheckpointMeta
from vlmlab.errors import ConfigError
from vlmlab.models import as_dict, build_vlm

COMPONENTS = ("encoder", "connector", "llm")


def _wave1_checkpoint(cfg: DictConfig, folder: Path, **drop_or_set: object) -> dict:
    """A stage-1 checkpoint exactly as wave-1 `train.py` + `save_trainable` wrote it:
    the connector's tensors and a meta.json dumped from a dict."""
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    stages.apply(cfg.stage, model)
    torch.manual_seed(7)
    tensors = {
        name: torch.randn_like(p.detach())
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    meta = {
        "complete": True,
        "stage": "1",
        "choices": {"encoder": "tiny", "connector": "mlp", "llm": "tiny", "stage": "1"},
        "fingerprints": {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS},
        "config": {c: as_dict(cfg[c]) for c in COMPONENTS},
        "template": "plain",
        "lora": None,
        "parent": None,
        "hf_base": None,
        "mlflow_run_id": None,
        "global_step": 6,
        "metrics": {"train/loss": 2.5},
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "finished_at": 1_700_000_000.0,
    }
    for key, value in drop_or_set.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / checkpoints.WEIGHTS))
    (folder / checkpoints.META).write_text(json.dumps(meta, indent=1))
    return tensors


def test_a_wave1_checkpoint_loads_chains_and_is_found_by_auto(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_cfg("stage=1")
    root = tmp_path / "checkpoints"
    tensors = _wave1_checkpoint(cfg, root / "old", lora=None, hf_base=None)  # keys absent

    meta = checkpoints.read_meta(root / "old")
    assert isinstance(meta, CheckpointMeta)
    assert (meta.stage, meta.complete, meta.global_step, meta.hf_base) == ("1", True, 6, None)
    assert meta.metrics == {"train/loss": 2.5} and meta.template_name() == "plain"
    fingerprints = {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS}
    assert checkpoints.find_latest(root, "1", fingerprints) == root / "old"

    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert checkpoints.load_chain(model, root / "old") == [root / "old"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tensors.items())

    # stage 2 with init_from=<the old folder> accepts it (same fingerprints)
    from vlmlab.train import resolve_init

    second = compose_cfg("stage=2", f"stage.init_from={root / 'old'}")
    assert resolve_init(second, fingerprints, root, {}, None) == root / "old"


def test_an_older_meta_without_template_or_completion_still_reads(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """The first wave-1 checkpoints had no `template`, `complete` or `hf_base`, and tools
    may add keys: missing keys take defaults, unknown keys survive a rewrite."""
    cfg = compose_cfg("stage=1")
    folder = tmp_path / "older"
    _wave1_checkpoint(cfg, folder, template=None, complete=None, hf_base=None, note="by hand")
    meta = checkpoints.read_meta(folder)
    assert meta.complete and meta.template is None
    assert meta.template_name() == cfg.llm.template  # the LLM preset's, as wave 1 read it
    assert meta.extra == {"note": "by hand"}

    copy = tmp_path / "copy"
    copy.mkdir()
    meta.write(copy)
    again = json.loads((copy / checkpoints.META).read_text())
    assert again["note"] == "by hand" and again["stage"] == "1" and "extra" not in again
    assert checkpoints.read_meta(copy) == meta


def test_merge_reads_a_wave1_checkpoint(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    from vlmlab.merge import merge_checkpoint

    cfg = compose_cfg("stage=1")
    _wave1_checkpoint(cfg, tmp_path / "old")
    out = merge_checkpoint(tmp_path / "old", tmp_path / "merged")
    merged = checkpoints.read_meta(out)
    assert merged.merged_from == str(tmp_path / "old") and merged.parent is None
    assert merged.config == checkpoints.read_meta(tmp_path / "old").config


def test_save_trainable_records_counts_once(tiny_model: tuple, tmp_path: Path) -> None:
    model, _ = tiny_model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.connector.parameters():
        p.requires_grad_(True)
    out = checkpoints.save_trainable(model, tmp_path / "ckpt", CheckpointMeta(stage="1"))
    meta = checkpoints.read_meta(out)
    assert meta.num_tensors == len(list(model.connector.parameters()))
    assert meta.num_params == sum(p.numel() for p in model.connector.parameters())
    assert meta.finished_at > 0


def test_a_run_reference_resolves_through_tracking_only(tmp_path: Path) -> None:
    from vlmlab.tracking.runs import checkpoint_of_run

    assert (
        checkpoints.is_run_reference("runs:/abc") and checkpoints.run_id_of("runs:/abc/x") == "abc"
    )
    assert not checkpoints.is_run_reference(str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"checkpoint: MLflow run '0{32}' not found"):
        checkpoint_of_run("0" * 32, uri, "checkpoint")


def test_a_stage_checkpoint_of_another_config_or_newer_format_is_refused_naming_it(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """init_from a checkpoint whose LLM config differs: the error names the component and each
    key with both values. A meta.json of a newer format is refused by every reader (init_from
    names both format numbers; auto skips it); an older meta without the key is format 1."""
    from vlmlab.train import fingerprints_of, resolve_init

    cfg = compose_cfg("stage=1")
    root = tmp_path / "checkpoints"
    _wave1_checkpoint(cfg, root / "old")
    assert checkpoints.read_meta(root / "old").format == 1  # no key: format 1

    other = compose_cfg(
        "stage=2", f"stage.init_from={root / 'old'}", "llm.config.num_hidden_layers=3"
    )
    with pytest.raises(ConfigError, match=r"^stage\.init_from: ") as raised:
        resolve_init(other, fingerprints_of(other), root, {}, None)
    message = str(raised.value)
    differ = "llm (1 key(s) differ: config.num_hidden_layers: 4 in the checkpoint, 3 in this run)"
    assert differ in message

    newer = json.loads((root / "old" / checkpoints.META).read_text())
    newer["format"] = checkpoints.META_FORMAT + 1
    (root / "old" / checkpoints.META).write_text(json.dumps(newer))
    refused = f"format {checkpoints.META_FORMAT + 1}; this vlmlab reads format 1"
    with pytest.raises(ConfigError, match=refused):
        checkpoints.read_meta(root / "old")
    fingerprints = {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS}
    assert checkpoints.find_latest(root, "1", fingerprints) is None
