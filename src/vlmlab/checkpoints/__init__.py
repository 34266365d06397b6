"""Checkpoints: the stage chain (trainable-only weights + `CheckpointMeta`), resumable Lightning
IO (atomic saves, the newest loadable file) and run-reference syntax.

- `meta`: `CheckpointMeta`, the one reader and writer of `meta.json`.
- `chain`: save a stage's trainable weights, load a chain root-first, `init_from: auto`.
- `lightning_io`: atomic Lightning checkpoint IO and loadability checks for resume.
- `references`: `runs:/<id>` / run-id syntax (tracking resolves a run to its folder).

The package's public names are importable from here (`checkpoints.load_chain`).
"""

from __future__ import annotations

from vlmlab.checkpoints.chain import (
    WEIGHTS,
    component_fingerprint,
    describe_differences,
    differing_components,
    find_latest,
    gather_trainable,
    is_zero3_parameter,
    load_chain,
    save_trainable,
    trainable_parameters,
)
from vlmlab.checkpoints.lightning_io import (
    CHECKPOINT_FORMAT,
    DEEPSPEED_LATEST,
    DEEPSPEED_TAG,
    PREV_SUFFIX,
    TMP_SUFFIX,
    CheckpointIdentity,
    CheckpointWriteError,
    agreed_failure,
    atomic_checkpoint_io,
    atomic_torch_save,
    deepspeed_checkpoint_complete,
    fsync_tree,
    is_deepspeed_checkpoint,
    is_loadable,
    load_resumable,
    newest_loadable,
    publish_folder,
    remove_path,
    saved_at,
    write_error,
)
from vlmlab.checkpoints.meta import META, META_FORMAT, CheckpointMeta, read_meta
from vlmlab.checkpoints.references import is_run_reference, run_id_of

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEEPSPEED_LATEST",
    "DEEPSPEED_TAG",
    "META",
    "META_FORMAT",
    "PREV_SUFFIX",
    "TMP_SUFFIX",
    "WEIGHTS",
    "CheckpointIdentity",
    "CheckpointMeta",
    "CheckpointWriteError",
    "agreed_failure",
    "atomic_checkpoint_io",
    "atomic_torch_save",
    "component_fingerprint",
    "deepspeed_checkpoint_complete",
    "describe_differences",
    "differing_components",
    "find_latest",
    "fsync_tree",
    "gather_trainable",
    "is_deepspeed_checkpoint",
    "is_loadable",
    "is_run_reference",
    "is_zero3_parameter",
    "load_chain",
    "load_resumable",
    "newest_loadable",
    "publish_folder",
    "read_meta",
    "remove_path",
    "run_id_of",
    "save_trainable",
    "saved_at",
    "trainable_parameters",
    "write_error",
]
