"""Test helpers shared by several test modules (real tokenizers, label-run inspection)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any


def squash(text: str) -> str:
    """Text without whitespace: compares decoded tokens independent of tokenizer spacing."""
    return re.sub(r"\s+", "", text)


def label_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of True."""
    runs, start = [], None
    for i, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def mistral_sentencepiece_tokenizer(folder: Path, legacy: bool = False) -> Any:
    """mistral_common's v1 SentencePiece model (Mistral-7B v0.1/v0.2, Llama-2 family, 32K)
    as a transformers Llama tokenizer, saved to `folder`.

    `legacy` is written into tokenizer_config.json, as Llama-2/Vicuna folders carry it: true
    puts SentencePiece's `▁` in front of the text after every special token, false only at the
    start (LLaVA's preprocess_v1 reads `tokenizer.legacy` to count round lengths).

    mistral-common is a dev dependency, so a missing package is a failure, not a skip. Without
    the `sentencepiece` package AutoTokenizer cannot read a bare tokenizer.model, so the
    ModelProto is read with protobuf as transformers' converter does.
    """
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    data = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(data.read_bytes())
    assert proto.trainer_spec.model_type == 2  # BPE, like Llama-2
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, legacy=legacy
    )
    assert len(tokenizer) >= 32000, "an empty tokenizer was built"
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "legacy": legacy}, indent=2))
    # the model file itself too: presets with llm.tokenizer.backend=sentencepiece load it
    (Path(folder) / "tokenizer.model").write_bytes(data.read_bytes())
    return tokenizer


def searchpath_override(*config_dirs: Path) -> str:
    """`hydra.searchpath=[...]`: extra config dirs whose group options join conf/'s."""
    return "hydra.searchpath=[" + ",".join(f"file://{Path(d).resolve()}" for d in config_dirs) + "]"


def group_options(group: str, *config_dirs: Path) -> list[str]:
    """A config group's options as Hydra lists them (conf/ plus the extra config dirs): tests
    enumerate the registry, never a hand-kept list."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from vlmlab.config import conf_dir

    overrides = [searchpath_override(*config_dirs)] if config_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            return sorted(
                loader.get_group_options(
                    group, ObjectType.CONFIG, config_name="train", overrides=overrides
                )
            )
    finally:
        GlobalHydra.instance().clear()


def save_twice_failing_on_rank_1(trainer: Any, out: Path) -> None:
    """The failed-save scenario of the multi-rank checkpoint tests (FSDP, DeepSpeed).

    `trainer` saves `out/last.ckpt`, then saves again with rank 1 limited to 1 kB per file
    (RLIMIT_FSIZE: a real EFBIG from the kernel, SIGXFSZ ignored). Each rank writes what the
    second save raised to `out/rank<r>.txt` ("saved" if nothing); a rank that raised exits 3.
    """
    import resource
    import signal

    target = out / "last.ckpt"
    trainer.save_checkpoint(target)
    rank = trainer.global_rank
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    try:
        trainer.save_checkpoint(target)
        (out / f"rank{rank}.txt").write_text("saved")
    except BaseException as err:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        (out / f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        raise SystemExit(3) from None


def assert_every_rank_failed(out: Path, ranks: int = 2) -> Path:
    """After `save_twice_failing_on_rank_1`: every rank raised CheckpointWriteError naming the
    folder and no staged folder is left; returns the folder (the first save, to check)."""
    target = out / "last.ckpt"
    for rank in range(ranks):
        said = (out / f"rank{rank}.txt").read_text()
        assert said.startswith("CheckpointWriteError") and str(target) in said, said
    assert not (out / "last.ckpt.tmp").exists()
    return target
