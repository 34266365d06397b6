"""Resumable checkpoints are read with torch's weights-only unpickler: a planted pickle payload
is refused, never executed (issue 17, item 7)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from vlmlab import checkpoints
from vlmlab.train import train

RUN = (
    "stage=2_lora",
    "stage.init_from=null",
    "stage.evaluate=false",
    "logger=none",
    "trainer.max_steps=3",
    "checkpoint.every_n_steps=1",
)


class Payload:
    """What an attacker plants: unpickling it makes a directory (any callable would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_a_planted_payload_is_refused_not_executed(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    train(compose_cfg(*RUN))  # stops at max_steps, resumably
    (last,) = (tmp_path / "resume").glob("*/last.ckpt")
    assert checkpoints.is_loadable(last)  # a real checkpoint reads with weights_only=True
    state = checkpoints.load_resumable(last)
    assert state["global_step"] == 3

    marker = tmp_path / "payload-ran"
    state["vlmlab"]["note"] = Payload(marker)
    torch.save(state, last)
    planted = tmp_path / "planted.ckpt"
    planted.write_bytes(last.read_bytes())

    assert not checkpoints.is_loadable(last)  # resume=auto skips it (to last.ckpt.prev)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.atomic_checkpoint_io().load_checkpoint(last)
    assert not marker.exists()
    # a resumed run does not run it either: it continues from the previous checkpoint
    assert checkpoints.newest_loadable(last.parent) == last.parent / "last.ckpt.prev"
    train(compose_cfg(*RUN, "trainer.max_steps=4", "resume=auto"))
    assert not marker.exists()
    assert checkpoints.load_resumable(last)["global_step"] == 4  # written anew, safely

    torch.load(planted, weights_only=False)  # the payload is real: the unsafe unpickler runs it
    assert marker.is_dir()


def test_a_checkpoint_of_another_config_or_format_is_refused(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Every resumable checkpoint records its format and the run's identity config; a resume
    refuses another configuration (naming each differing key with both values) or format
    before any weight is loaded; keys that do not change the computation may differ."""
    from vlmlab.errors import ConfigError
    from vlmlab.train import identity_config

    def loader(*overrides: str) -> Any:
        identity = checkpoints.CheckpointIdentity.of(identity_config(compose_cfg(*overrides)))
        return checkpoints.atomic_checkpoint_io(identity=identity)

    train(compose_cfg(*RUN))
    (last,) = (tmp_path / "resume").glob("*/last.ckpt")
    assert loader(*RUN, "trainer.max_steps=9").load_checkpoint(last)["global_step"] == 3

    with pytest.raises(ConfigError, match=r"stage\.optim\.lr: .* in the checkpoint, 0\.5 in this"):
        train(compose_cfg(*RUN, "stage.optim.lr=0.5", f"resume={last}"))  # end to end
    with pytest.raises(ConfigError) as other_connector:  # another architecture
        loader(*RUN, "connector=linear").load_checkpoint(last)
    assert "connector._target_" in str(other_connector.value)
    assert str(other_connector.value).startswith(f"resume: {last} was written by another")

    state = checkpoints.load_resumable(last)
    state[checkpoints.lightning_io.IDENTITY]["format"] = 0
    older = tmp_path / "older.ckpt"
    torch.save(state, older)
    with pytest.raises(ConfigError, match=r"checkpoint format 0; this vlmlab reads format 1"):
        loader(*RUN).load_checkpoint(older)
    del state[checkpoints.lightning_io.IDENTITY]
    torch.save(state, older)
    with pytest.raises(ConfigError, match="no vlmlab checkpoint-format record"):
        loader(*RUN).load_checkpoint(older)


REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).mkdir()  # what any code in a model folder could do on import
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
class RemoteConfig(PretrainedConfig):
    model_type = "vlmlab_remote"
class RemoteModel(PreTrainedModel):
    config_class = RemoteConfig
class RemoteTokenizer(PreTrainedTokenizer):
    pass
"""

LOADERS = {  # each vlmlab entry that reads an HF folder, called on the folder
    "llm": "from vlmlab.models.llm import build_llm; build_llm(None, FOLDER, pretrained=True)",
    "tokenizer": "from vlmlab.models.llm import build_tokenizer; "
    "build_tokenizer({'name_or_path': FOLDER})",
    "hf_llava": "from vlmlab.models.hf_llava import component_configs; component_configs(FOLDER)",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_an_hf_folder_asking_for_remote_code_is_refused(tmp_path: Path, loader: str) -> None:
    """A folder whose config.json / tokenizer_config.json maps to its own Python (`auto_map`):
    vlmlab reads it with trust_remote_code=False, so the code never runs, not even when a
    person at the prompt transformers shows for trust_remote_code=None answers "y" (stdin)."""
    import json
    import subprocess
    import sys

    folder = tmp_path / "remote_model"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    (folder / "remote.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    auto_map = {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"}
    (folder / "config.json").write_text(
        json.dumps({"model_type": "vlmlab_remote", "auto_map": auto_map})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["remote.RemoteTokenizer", None]}})
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = f"FOLDER = {str(folder)!r}\n" + LOADERS[loader]
    done = subprocess.run(
        [sys.executable, "-c", code],
        input="y\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert not marker.exists(), "the folder's own code ran"
