"""Resumable Lightning checkpoints: atomic writes, loadability checks, the newest usable one.

Why: a run killed mid-save must never resume from a torn file; these helpers write through a
temporary name and rename, and pick the newest checkpoint that actually loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission, read-only filesystem).

    Raised instead of torch's `unexpected pos 704 vs 598` (the OSError hides in its context):
    the message names the path, the reason, what was kept and how to go on.
    """


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind an error (torch's zip writer raises RuntimeError from one)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_error(
    path: Path, error: BaseException, kept: Path | None, what: str = "checkpoint"
) -> CheckpointWriteError:
    """A CheckpointWriteError for `path` that says what to do (`kept`: what stays loadable)."""
    cause = _os_error(error)
    errno = cause.errno if cause is not None and cause.errno else 0
    rust = re.search(r"\(os error (\d+)\)", str(error))  # safetensors: Rust's io::Error
    errno = errno or (int(rust.group(1)) if rust else 0)
    reason = f"[Errno {errno}] {os.strerror(errno)}" if errno else str(error)
    outcome = (
        f"the previous checkpoint {kept} is kept and `resume=auto` continues from it"
        if kept is not None
        else "nothing was replaced"
    )
    folder = Path(path).parent
    err = CheckpointWriteError(
        f"could not write {what} {path} ({reason}); {outcome}. Fix: free space on, or make "
        f"writable, the filesystem of {folder} (or set paths.root to a disk with room), "
        "then rerun the same command with resume=auto.",
    )
    err.errno = errno or None  # type: ignore[assignment]  # callers may test ENOSPC ...
    return err


def agreed_failure(strategy: Any, write: Callable[[], None]) -> BaseException | None:
    """Run this rank's part of a sharded write; every rank returns an error if any rank's failed.

    Why: a rank whose write fails (disk full, no permission) would raise alone while the others
    wait for it at the next barrier, forever. torch.distributed.checkpoint gathers failures of
    the shard files itself (a CheckpointException on every rank, whose OSError is unwrapped here
    so the message gives the reason, not a traceback); the all-reduce (MIN) of an ok flag
    covers the rest (rank 0's metadata file, fsync, DeepSpeed's per-rank files).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    error: BaseException | None = None
    try:
        write()
    except (OSError, RuntimeError, CheckpointException) as err:
        error = err
        if isinstance(err, CheckpointException):  # torch.distributed.checkpoint gathered them
            found = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
            error = next((f for f in found if isinstance(f, BaseException)), err)
        log.error("rank %d could not write its checkpoint part: %s", strategy.global_rank, error)
    ok = torch.tensor([0.0 if error else 1.0], device=strategy.root_device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 1.0:
        return None
    return error or RuntimeError("another rank could not write its checkpoint shards")


def atomic_torch_save(obj: Any, path: Path, keep_previous: bool = True) -> None:
    """torch.save into `<path>.tmp` beside the target, fsync, then os.replace.

    Why: Lightning 2.6 serialises into memory (2x host RAM), writes the system temp dir and
    moves the file, which is a plain copy when the checkpoint folder is another filesystem (a
    cluster's shared disk): killed mid-copy, `last.ckpt` is truncated. A rename inside one folder
    is atomic, and fsync makes the renamed file survive a node crash. With `keep_previous` the
    replaced checkpoint stays as `<path>.prev` (a hard link: no copy), a fallback for resume.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.is_file():
            _link_previous(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # disk full, no permission, read-only, quota
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a partial file: give the space back
        raise write_error(path, err, path if path.is_file() else None) from err
    _fsync_dir(path.parent)


def _link_previous(path: Path) -> None:
    """`<path>.prev` -> the checkpoint about to be replaced (a hard link: no copy)."""
    prev = path.with_name(path.name + PREV_SUFFIX)
    staged = path.with_name(path.name + PREV_SUFFIX + TMP_SUFFIX)
    try:
        staged.unlink(missing_ok=True)
        os.link(path, staged)
        os.replace(staged, prev)
    except OSError:  # no hard links here: keep no fallback rather than copy gigabytes
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)


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
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # see load_resumable
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


def load_resumable(path: Path, map_location: Any | None = None) -> dict[str, Any]:
    """A resumable checkpoint, read with `torch.load(weights_only=True)`.

    Why: a checkpoint is a pickle, and unpickling runs whatever callables it names. Ours hold
    only tensors, numbers, strings and containers of them (trainable weights, optimizer and
    scheduler state, loop and data positions, RNG states), which torch's weights-only
    unpickler reads; anything else (a planted payload) is refused with UnpicklingError,
    never executed.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    assert isinstance(state, dict)
    return state


# What a resumable checkpoint holds and means; bump when that changes, so that a checkpoint of
# another format is refused with both numbers instead of loading into the wrong places.
CHECKPOINT_FORMAT = 1
IDENTITY = "vlmlab_identity"  # the checkpoint key of its CheckpointIdentity record
# Keys a resume may change: where a run writes, and the callbacks a user adds to watch it
# (a profiler, a snapshot) on top of the run's own; both stay in the run key.
_NOT_COMPARED = ("paths.", "trainer.extra_callbacks")
_MAX_LISTED = 12


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a resumable checkpoint shares with the run that may continue it: the checkpoint
    format and the run's identity configuration (the config the run key hashes, flattened).

    Why: `resume=<path>` used to load any .ckpt whose tensors fit, so a checkpoint of another
    configuration (another learning rate, template, data) continued silently, and one of another
    architecture failed deep in `load_state_dict`. Now both are refused up front, naming the
    keys that differ.
    """

    config: dict[str, Any]
    format: int = CHECKPOINT_FORMAT

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> CheckpointIdentity:
        """From a nested config mapping (plain containers, resolved)."""
        return cls(flat_config(config))

    def record(self) -> dict[str, Any]:
        return {"format": self.format, "config": dict(self.config)}

    def check(self, record: Any, path: Path) -> None:
        """Refuse a checkpoint of another format or configuration (ConfigError on `resume`)."""
        fix = (
            "resume with the configuration and vlmlab version that wrote it, or start fresh "
            "with resume=null."
        )
        if not isinstance(record, Mapping) or "format" not in record:
            raise ConfigError(
                "resume",
                f"{path} has no vlmlab checkpoint-format record: it was written by a vlmlab "
                f"older than checkpoint format {self.format}, or not by vlmlab.",
                fix,
            )
        if record["format"] != self.format:
            raise ConfigError(
                "resume",
                f"{path} is in checkpoint format {record['format']}; this vlmlab reads format "
                f"{self.format}.",
                fix,
            )
        theirs, ours = (
            {k: v for k, v in dict(c).items() if not k.startswith(_NOT_COMPARED)}
            for c in (record.get("config") or {}, self.config)
        )
        differ = differences(theirs, ours)
        if differ:
            raise ConfigError(
                "resume", f"{path} was written by another configuration; {differ}.", fix
            )


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as dotted keys (`stage.optim.lr`); lists stay values."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = list(node) if isinstance(node, tuple) else node

    walk(config, "")
    return flat


def differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    """`N key(s) differ: k: <checkpoint's> in the checkpoint, <ours> in this run; ...` ('' if
    none): what a refusal shows, so the user sees which keys to set back."""
    keys = sorted(
        k for k in set(theirs) | set(ours) if theirs.get(k, _ABSENT) != ours.get(k, _ABSENT)
    )
    if not keys:
        return ""
    shown = [
        f"{k}: {_shown(theirs.get(k, _ABSENT))} in the checkpoint, "
        f"{_shown(ours.get(k, _ABSENT))} in this run"
        for k in keys[:_MAX_LISTED]
    ]
    more = f" (first {_MAX_LISTED} shown)" if len(keys) > _MAX_LISTED else ""
    return f"{len(keys)} key(s) differ{more}: " + "; ".join(shown)


_ABSENT = object()


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _checkpoint_io_class() -> type:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning CheckpointIO whose writes are atomic (see atomic_torch_save)."""

        def __init__(
            self, keep_previous: bool = True, identity: CheckpointIdentity | None = None
        ) -> None:
            super().__init__()
            self.keep_previous = keep_previous
            self.identity = identity

        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            if self.identity is not None:
                checkpoint = {**checkpoint, IDENTITY: self.identity.record()}
            atomic_torch_save(checkpoint, Path(path), keep_previous=self.keep_previous)

        def load_checkpoint(
            self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
        ) -> dict[str, Any]:
            """Always `weights_only=True` (whatever Lightning asks): see `load_resumable`; with
            an identity, a checkpoint of another format or configuration is refused."""
            state = load_resumable(Path(path), map_location)
            if self.identity is not None:
                self.identity.check(state.get(IDENTITY), Path(path))
            return state

        def remove_checkpoint(self, path: Any) -> None:
            super().remove_checkpoint(path)
            previous = Path(str(path) + PREV_SUFFIX)
            if previous.is_dir():  # a sharded (FSDP / DeepSpeed) checkpoint folder
                import shutil

                shutil.rmtree(previous)
            else:
                previous.unlink(missing_ok=True)

    return AtomicCheckpointIO


def atomic_checkpoint_io(
    keep_previous: bool = True, identity: CheckpointIdentity | None = None
) -> Any:
    """The Lightning plugin: `L.Trainer(plugins=[atomic_checkpoint_io()])`; with `identity`
    every save records it and every load checks it (see CheckpointIdentity)."""
    return _checkpoint_io_class()(keep_previous=keep_previous, identity=identity)
