"""Every experiment x every stage it declares composes and builds on the meta device.

The cases come from conf/: each conf/experiment/<name>.yaml and each stage its recipe folder
declares (conf/recipe/<name>/<stage>.yaml). Each is built by `build_vlm` (the one assembly
training, `vlmlab plan` and the HF import use) with `weights="none"` on the meta device: no
download, no memory. Real-model presets build from their HF architecture numbers; their
tokenizer is the offline Llama-2-family SentencePiece model of mistral-common when the preset's
vocabulary is that family's 32000 (so `<image>` is added and the embeddings grow to 32064, as in
LLaVA-1.5), else the preset's own tokenizer when it is a local folder.

Checked per case: the connector has the size its class states (`expected_num_parameters`), and
after the stage policy each component trains exactly what the stage declares (whole components
named in `stage.train`, less the parameters the encoder's contract says never get gradients;
LoRA adapters r x (in + out) on every targeted linear).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from tests.helpers import mistral_sentencepiece_tokenizer
from vlmlab import stages
from vlmlab.config import compose
from vlmlab.models import build_tokenizer, build_vlm
from vlmlab.models.backbone import backbone_of
from vlmlab.models.llm import resolve_asset

REPO = Path(__file__).resolve().parents[1]
LLAMA2_VOCAB = 32000  # the offline tokenizer's vocabulary (Llama-2 / Vicuna / Mistral v0.1)


def _cases() -> list[tuple[str, str]]:
    cases = []
    for experiment in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        declared = sorted((REPO / "conf" / "recipe" / experiment.stem).glob("*.yaml"))
        cases += [(experiment.stem, stage.stem) for stage in declared]
    return cases


CASES = _cases()


def test_every_experiment_declares_stages() -> None:
    experiments = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert experiments and {e for e, _ in CASES} == experiments


@pytest.fixture(scope="module")
def llama2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama2_tokenizer")
    mistral_sentencepiece_tokenizer(folder)
    return folder


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _tokenizer(cfg: DictConfig, offline_dir: Path) -> Any | None:
    """The preset's tokenizer when local; the offline Llama-2-family one for a 32k hub preset."""
    spec = dict(_plain(cfg.llm.tokenizer))
    if Path(resolve_asset(str(spec["name_or_path"]))).is_dir():
        return build_tokenizer(spec)
    if cfg.llm.config.get("vocab_size") == LLAMA2_VOCAB:
        return build_tokenizer({**spec, "name_or_path": str(offline_dir)})
    return None  # vocabulary from llm.config.vocab_size


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _lora_parameters(component: torch.nn.Module, spec: dict[str, Any]) -> int:
    """r x (in + out) for every nn.Linear LoRA targets (default: all but lm_head)."""
    targets = spec.get("target_modules")
    excluded = set(spec.get("exclude_modules") or ["lm_head"])
    total = 0
    for name, module in component.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, torch.nn.Linear) or leaf in excluded:
            continue
        if targets is None or leaf in targets:
            total += int(spec["r"]) * (module.in_features + module.out_features)
    return total


def _expected_trainable(cfg: DictConfig, model: Any) -> dict[str, int]:
    """Per component, what the stage YAML declares trainable (computed without the policy)."""
    stage = _plain(cfg.stage)
    train, freeze = set(stage.get("train") or []), set(stage.get("freeze") or [])
    assert not stage.get("train_last"), "extend this test for train_last"
    expected = {}
    for name in ("encoder", "connector", "llm"):
        module = getattr(model, name)
        never = _count(backbone_of(module, name).unused_parameters()) if name != "connector" else 0
        whole = name in train and name not in freeze
        attached = stages.policy.attached_parameters(model, name)  # AnyRes image_newline
        expected[name] = _count([*module.parameters(), *attached]) - never if whole else 0
    lora = stage.get("lora")
    if lora:
        expected[lora["target"]] += _lora_parameters(getattr(model, lora["target"]), lora)
    return expected


@pytest.mark.parametrize(("experiment", "stage"), CASES, ids=[f"{e}-{s}" for e, s in CASES])
def test_experiment_stage_builds_on_meta(
    experiment: str, stage: str, llama2_tokenizer_dir: Path
) -> None:
    cfg = compose([f"experiment={experiment}", f"stage={stage}"])
    tokenizer = _tokenizer(cfg, llama2_tokenizer_dir)
    model, _ = build_vlm(
        cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta", tokenizer=tokenizer
    )
    assert all(p.is_meta for p in model.parameters())

    knobs = dict(_plain(cfg.connector))
    knobs.pop("init_seed", None)
    connector_cls: Any = get_class(str(knobs.pop("_target_")))
    stated = connector_cls.expected_num_parameters(
        model.encoder.hidden_size, model.llm.get_input_embeddings().embedding_dim, **knobs
    )
    assert _count(model.connector.parameters()) == stated, connector_cls.__name__

    embeddings = model.llm.get_input_embeddings().num_embeddings
    if tokenizer is not None:  # every token has a row; `<image>` is a real token
        assert embeddings >= len(tokenizer) and model.image_token_id == len(tokenizer) - 1
        assert embeddings % 64 == 0 or embeddings == len(tokenizer)

    expected = _expected_trainable(cfg, model)
    plan = stages.apply(cfg.stage, model, machine_checks=False)
    got = {
        name: _count(
            p
            for p in [
                *getattr(model, name).parameters(),
                *stages.policy.attached_parameters(model, name),
            ]
            if p.requires_grad
        )
        for name in ("encoder", "connector", "llm")
    }
    assert got == expected
    assert {row["component"]: row["trainable"] for row in plan.table} == expected
    assert _count(model.parameters()) >= sum(expected.values()) > 0


def test_anyres_study_arms_differ_in_resolution() -> None:
    """experiments/anyres_study compares pad with anyres on the resolution task: the anyres arm
    must really tile the task's images (a 3x2 or 2x3 grid at up to 192 px, so the 4-6 px objects
    keep 1.5-2 px), the pad arm one 64 px tile; the README's token counts are these."""
    from vlmlab.data.scenes import ScenesSpec

    counts = {}
    for image in ("pad", "anyres"):
        cfg = compose(["experiment=anyres_study", f"encoder.image={image}"])
        model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta")
        spec = ScenesSpec(image_size=int(cfg.data.generator.image_size), resolution_task=True)
        counter = model.image_token_counter()
        counts[image] = {size: counter(size) for size in spec.image_sizes()}
    assert {t.count for t in counts["pad"].values()} == {16}
    landscape, portrait = (512, 256), (256, 512)
    assert counts["anyres"][landscape].grid == (2, 3) and counts["anyres"][portrait].grid == (3, 2)
    assert counts["anyres"][landscape].count == 94 and counts["anyres"][portrait].count == 100
