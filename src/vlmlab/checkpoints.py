"""Trainable-only checkpoints that chain across stages, and `init_from: auto` discovery.

A stage saves only what it trained (a stage-1 checkpoint of a 7B model is the connector),
plus `meta.json` naming its parent checkpoint. Loading walks the chain root-first, so stage 2
gets the LLM of the warm-up stage and the connector of stage 1 without copying paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
META = "meta.json"


def component_fingerprint(component_cfg: DictConfig) -> str:
    """Hash of a component's resolved config: equal hashes build identical modules."""
    data = OmegaConf.to_container(component_cfg, resolve=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a stage checkpoint holds: the parameters the stage trains, nothing else."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter: each rank holds a slice, `param` itself is
    empty outside `GatheredParameters`. DeepSpeed tags them with `ds_id` and `ds_numel`."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_numel")


def gather_trainable(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable weights. FSDP-sharded (DTensor) and DeepSpeed ZeRO-3
    partitioned weights are gathered one at a time (bounded memory), so every rank must call
    this, in the same order; ranks with `keep=False` return nothing."""
    out: dict[str, torch.Tensor] = {}
    for name, param in trainable_parameters(model).items():
        if is_zero3_parameter(param):  # collective: all ranks gather, then re-partition
            import deepspeed  # `deepspeed.zero` is an attribute, not an importable module

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:  # copy out: the gathered storage is freed when the block ends
                    out[name] = param.detach().to("cpu", copy=True).contiguous()
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # DTensor: collective
            tensor = tensor.full_tensor()
        if keep:
            out[name] = tensor.cpu().contiguous()
    return out


def save_trainable(
    model: nn.Module,
    out_dir: Path,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write trainable weights + meta atomically: a crash never leaves a half-written checkpoint.

    `tensors` (from gather_trainable) replaces reading the model, for sharded models."""
    if tensors is None:
        tensors = gather_trainable(model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / WEIGHTS))
    meta = {
        **meta,
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "finished_at": time.time(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    os.replace(tmp, out_dir)
    log.info("saved %d trainable tensors to %s", len(tensors), out_dir)
    return out_dir


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / META).read_text())


def load_chain(model: nn.Module, ckpt_dir: Path, merge_last: bool = True) -> list[Path]:
    """Load `ckpt_dir` and its ancestors (root first) into `model`; returns the chain.

    A LoRA checkpoint is loaded by wrapping its component with the recorded adapter config,
    loading the adapters and folding them into the base weights. With `merge_last=False` the
    last checkpoint's adapters stay separate (to compare merged and unmerged outputs).
    """
    from vlmlab.stages.policy import merge_lora, wrap_lora

    chain: list[Path] = []
    current: Path | None = Path(ckpt_dir)
    while current is not None:
        if not (current / WEIGHTS).is_file():
            raise ConfigError(
                "stage.init_from",
                f"{current} holds no {WEIGHTS}.",
                "point it at a vlmlab checkpoint folder.",
            )
        chain.append(current)
        parent = read_meta(current).get("parent")
        current = Path(parent) if parent else None
    hf_base = read_meta(chain[-1]).get("hf_base")
    if hf_base:  # the chain started from an HF Llava folder: its weights come first
        from vlmlab.models.hf_llava import load_hf_weights

        load_hf_weights(model, hf_base)  # type: ignore[arg-type]
    for path in reversed(chain):
        lora = read_meta(path).get("lora")
        if lora:
            wrap_lora(model, lora)
        _load_tensors(model, path)
        if lora and (merge_last or path != chain[0]):
            merge_lora(model, lora["target"])
    return chain


def _load_tensors(model: nn.Module, path: Path) -> None:
    params = dict(model.named_parameters())
    tensors = load_file(str(path / WEIGHTS))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(
            "stage.init_from",
            f"{path} has weights this model lacks: {unknown[:3]}...",
            "check encoder/connector/llm.",
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ConfigError(
                    "stage.init_from",
                    f"{path}: {name} is {tuple(tensor.shape)}, model has {tuple(params[name].shape)}.",
                )
            params[name].copy_(tensor)
    log.info("loaded %d tensors from %s", len(tensors), path)


def from_mlflow(reference: str, tracking_uri: str) -> Path:
    """`runs:/<run_id>` or a bare run id -> the checkpoint folder that run recorded."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = reference.removeprefix("runs:/").strip("/").split("/")[0]
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            "stage.init_from", f"MLflow run {run_id!r} not found in {tracking_uri}."
        ) from err
    path = run.data.tags.get("checkpoint")
    if not path:
        raise ConfigError(
            "stage.init_from", f"MLflow run {run_id} has no checkpoint tag (did it finish?)."
        )
    return Path(path)


def is_run_reference(value: str) -> bool:
    return value.startswith("runs:/") or (
        len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


def find_latest(ckpt_root: Path, stage: str, fingerprints: dict[str, str]) -> Path | None:
    """Newest finished checkpoint of `stage` whose recorded component fingerprints match ours."""
    best: tuple[float, Path] | None = None
    if not ckpt_root.is_dir():
        return None
    for meta_path in ckpt_root.glob(f"*/{META}"):
        if meta_path.parent.name.endswith(".tmp"):  # an interrupted save
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if str(meta.get("stage")) != str(stage) or not meta.get("complete", True):
            continue
        recorded: dict[str, str] = meta.get("fingerprints", {})
        if any(fingerprints.get(c) != fp for c, fp in recorded.items()):
            continue
        when = float(meta.get("finished_at", 0))
        if best is None or when > best[0]:
            best = (when, meta_path.parent)
    return best[1] if best else None


# ---- resumable (Lightning) checkpoints ---------------------------------------------------------

TMP_SUFFIX = ".tmp"
PREV_SUFFIX = ".prev"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Delete a checkpoint file or folder (a sharded / DeepSpeed checkpoint is a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync every file under `root` (and the folders), so a rename publishes durable data."""
    if not root.exists():
        return
    folders = [root]
    if files:
        for dirpath, _dirs, names in os.walk(root):
            folders.append(Path(dirpath))
            for name in names:
                try:
                    with open(Path(dirpath) / name, "rb") as handle:
                        os.fsync(handle.fileno())
                except OSError as err:  # fsync unsupported here: the rename is still atomic
                    log.debug("fsync %s: %s", name, err)
    for folder in folders:
        _fsync_dir(folder)


def publish_folder(staged: Path, path: Path) -> None:
    """Swap a fully written checkpoint folder in; the one it replaces stays as `<path>.prev`.

    Why: sharded savers (FSDP's torch.distributed.checkpoint, DeepSpeed) write many files in
    place; writing to `<path>.tmp` and renaming means a kill mid-save never leaves `path` torn.
    """
    previous = path.with_name(path.name + ".prev")
    if path.exists():
        remove_path(previous)
        os.replace(path, previous)
    os.replace(staged, path)
    fsync_tree(path.parent, files=False)


def atomic_torch_save(obj: Any, path: Path, keep_previous: bool = True) -> None:
    """torch.save into `<path>.tmp` beside the target, fsync, then os.replace.

    Why: Lightning 2.6 serialises into memory (2x host RAM), writes the system temp dir and
    moves the file, which is a plain copy when the checkpoint folder is another filesystem (a
    cluster's shared disk): killed mid-copy, `last.ckpt` is truncated. A rename inside one folder
    is atomic, and fsync makes the renamed file survive a node crash. With `keep_previous` the
    replaced checkpoint stays as `<path>.prev` (a hard link: no copy), a fallback for resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_previous and path.is_file():
        prev = path.with_name(path.name + PREV_SUFFIX)
        staged = path.with_name(path.name + PREV_SUFFIX + TMP_SUFFIX)
        staged.unlink(missing_ok=True)
        try:
            os.link(path, staged)
            os.replace(staged, prev)
        except OSError:  # no hard links here: keep no fallback rather than copy gigabytes
            staged.unlink(missing_ok=True)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_loadable(path: Path) -> bool:
    """A complete checkpoint: the zip archive torch.save writes opens and its records unpickle.

    Tensor data is memory-mapped, not read, so checking a large checkpoint is cheap. A folder
    is a sharded checkpoint: FSDP's needs its metadata file from the end of the save,
    DeepSpeed's every file its save writes (see `is_deepspeed_checkpoint`).
    """
    path = Path(path)
    if path.is_dir():
        if (path / DEEPSPEED_LATEST).is_file() or (path / DEEPSPEED_TAG).is_dir():
            return deepspeed_checkpoint_complete(path)
        return (path / ".metadata").is_file() and is_loadable(path / "meta.pt")
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # any failure to read = not a usable checkpoint
        log.warning("checkpoint %s is not loadable: %s", path, err)
        return False
    return True


# DeepSpeed's folder, as Lightning's DeepSpeedStrategy.save_checkpoint writes it through
# `engine.save_checkpoint(path, tag="checkpoint", client_state=...)` (deepspeed 0.19
# runtime/engine.py `_get_ckpt_name`, `_get_zero_ckpt_name`, `save_checkpoint`):
#   <path>/checkpoint/mp_rank_00_model_states.pt                 ZeRO 0-2: written by DP rank 0
#   <path>/checkpoint/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: one per DP rank r
#   <path>/checkpoint/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  ZeRO >= 1: one per r
#   <path>/latest          the tag ("checkpoint"), written by rank 0 after all files
#   <path>/zero_to_fp32.py, zero_to_torch.py
# The model-states file holds Lightning's client state (loops, callbacks, vlmlab RNG) and
# `dp_world_size`, `mp_world_size`, `ds_config`: enough to know which files a complete save has.
DEEPSPEED_LATEST = "latest"
DEEPSPEED_TAG = "checkpoint"


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A folder laid out by DeepSpeed (complete or not)."""
    path = Path(path)
    return path.is_dir() and (
        (path / DEEPSPEED_LATEST).is_file() or (path / DEEPSPEED_TAG).is_dir()
    )


def deepspeed_checkpoint_complete(path: Path) -> bool:
    """Every file of a DeepSpeed save is there and whole (see the layout above).

    Model-states files are unpickled memory-mapped (they hold Lightning's state); optimizer
    files pickle DeepSpeed classes, so they are only checked to be whole zip archives:
    torch.save writes the zip directory last, so a truncated file is not a zip file.
    """
    path = Path(path)
    latest = path / DEEPSPEED_LATEST
    if not latest.is_file():
        log.warning("DeepSpeed checkpoint %s has no %r file (save not finished)", path, latest.name)
        return False
    tag_dir = path / latest.read_text().strip()
    model_files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt")) if tag_dir.is_dir() else []
    try:
        state = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # none there, truncated, or unreadable
        log.warning("DeepSpeed checkpoint %s has no loadable model states: %s", path, err)
        return False
    dp = int(state.get("dp_world_size") or 1)
    mp = int(state.get("mp_world_size") or 1)
    stage = int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    expected: list[Path] = []
    for m in range(mp):
        if stage == 3:
            expected += [
                tag_dir / f"zero_pp_rank_{r}_mp_rank_{m:02d}_model_states.pt" for r in range(dp)
            ]
        else:
            expected.append(tag_dir / f"mp_rank_{m:02d}_model_states.pt")
    for path_ in expected:
        if not is_loadable(path_):
            log.warning("DeepSpeed checkpoint %s: %s missing or torn", path, path_.name)
            return False
    if stage >= 1:
        for m in range(mp):
            for r in range(dp):
                name = f"zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt"
                found = [tag_dir / name, tag_dir / f"bf16_{name}"]
                if not any(_whole_zip(f) for f in found):
                    log.warning("DeepSpeed checkpoint %s: %s missing or torn", path, name)
                    return False
    return True


def _whole_zip(path: Path) -> bool:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def saved_at(path: Path) -> int:
    """When a checkpoint was completed: the file, or the file a sharded save writes last."""
    for last in (DEEPSPEED_LATEST, ".metadata"):
        if path.is_dir() and (path / last).is_file():
            return (path / last).stat().st_mtime_ns
    return path.stat().st_mtime_ns


def newest_loadable(resume_dir: Path) -> Path | None:
    """The most recent checkpoint in `resume_dir` that loads (last.ckpt, its .prev, others)."""
    resume_dir = Path(resume_dir)
    if not resume_dir.is_dir():
        return None
    candidates = [
        p
        for p in resume_dir.iterdir()
        if p.name.endswith((".ckpt", ".ckpt" + PREV_SUFFIX)) and not p.name.endswith(TMP_SUFFIX)
    ]
    candidates.sort(key=saved_at, reverse=True)
    for path in candidates:
        if is_loadable(path):
            return path
        log.warning("skipping unloadable checkpoint %s", path)
    return None


def _checkpoint_io_class() -> type:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning CheckpointIO whose writes are atomic (see atomic_torch_save)."""

        def __init__(self, keep_previous: bool = True) -> None:
            super().__init__()
            self.keep_previous = keep_previous

        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            atomic_torch_save(checkpoint, Path(path), keep_previous=self.keep_previous)

        def remove_checkpoint(self, path: Any) -> None:
            super().remove_checkpoint(path)
            previous = Path(str(path) + PREV_SUFFIX)
            if previous.is_dir():  # a sharded (FSDP / DeepSpeed) checkpoint folder
                import shutil

                shutil.rmtree(previous)
            else:
                previous.unlink(missing_ok=True)

    return AtomicCheckpointIO


def atomic_checkpoint_io(keep_previous: bool = True) -> Any:
    """The Lightning plugin: `L.Trainer(plugins=[atomic_checkpoint_io()])`."""
    return _checkpoint_io_class()(keep_previous=keep_previous)
