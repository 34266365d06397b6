"""HF interchange: our composition == transformers LlavaForConditionalGeneration, both ways.

Real tiny random-init models (CLIP-style with CLS, SigLIP-style without), exported to a temp
folder and loaded back with plain transformers, offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vlmlab import checkpoints, cli
from vlmlab.config import compose
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.generate import greedy_generate
from vlmlab.models import as_dict, build_tokenizer, build_vlm
from vlmlab.models.hf_llava import (
    chat_template_for,
    component_configs,
    export_hf_llava,
    load_hf_llava,
    load_hf_weights,
)
from vlmlab.text.templates import Turn, available_templates, get_template

# clip: the tiny preset (CLIP-style, with CLS); siglip: its SigLIP-style sibling (no CLS)
FAMILIES = {"clip": ["encoder=tiny"], "siglip": ["encoder=tiny_siglip"]}
QUESTION = "<image>\nWhat colour is the shape?"
TOL = 1e-5


def _image(seed: int, size: tuple[int, int] = (90, 40)) -> Image.Image:
    """A non-square random image, so pad/resize/crop all matter."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class Exported:
    def __init__(self, family: str, root: Path) -> None:
        self.family = family
        self.cfg = compose(FAMILIES[family])
        self.model, self.tokenizer = build_vlm(self.cfg.encoder, self.cfg.connector, self.cfg.llm)
        self.model.eval()
        self.template = get_template("vicuna_v1", self.tokenizer.eos_token)
        self.dir = export_hf_llava(self.model, self.tokenizer, root / family, self.template)
        self.text = TextEncoder(
            self.tokenizer,
            self.template,
            self.model.num_image_tokens,
            self.model.image_token_id,
            512,
        )

    def inputs(self, question: str = QUESTION, seed: int = 0) -> dict[str, torch.Tensor]:
        ids = self.text.encode_prompt([Turn("human", question)])
        return {
            "input_ids": ids[None],
            "attention_mask": torch.ones_like(ids)[None],
            "pixel_values": self.model.encoder.image_transform(_image(seed))[None],
        }


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(request.param, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_model(exported: Exported) -> Any:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(exported.dir).eval()


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _hf_generate(hf: Any, batch: dict[str, torch.Tensor], new: int) -> list[list[int]]:
    """Greedy, never stopping early (a random model may emit EOS at any step)."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(**batch, max_new_tokens=new, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :].tolist()


# ----------------------------------------------------------------------------- export


def test_export_config_maps_layer_strategy_and_tokens(exported: Exported, hf_model: Any) -> None:
    config, encoder = hf_model.config, exported.model.encoder
    assert config.vision_feature_layer == encoder.select_layer == -2
    # CLIP: "default" drops the CLS token; SigLIP has none, so "full" keeps every patch
    expected = "default" if exported.family == "clip" else "full"
    assert config.vision_feature_select_strategy == expected
    assert config.image_seq_length == exported.model.num_image_tokens == (64 // 16) ** 2
    assert config.image_token_id == exported.model.image_token_id
    assert config.image_token_id == exported.tokenizer.convert_tokens_to_ids("<image>")
    assert config.projector_hidden_act == "gelu"
    ours = sum(p.numel() for p in exported.model.parameters())
    assert sum(p.numel() for p in hf_model.parameters()) == ours


def test_logits_equal_after_export(exported: Exported, hf_model: Any) -> None:
    batch = exported.inputs()
    ours, theirs = _logits(exported.model, batch), _logits(hf_model, batch)
    assert (ours - theirs).abs().max().item() <= TOL
    # the image really reaches the LLM: another image changes the logits
    other = {**batch, "pixel_values": exported.inputs(seed=1)["pixel_values"]}
    assert (_logits(hf_model, other) - theirs).abs().max().item() > 1e-3


def test_greedy_generation_equal_after_export(exported: Exported, hf_model: Any) -> None:
    batch = exported.inputs()
    ours = greedy_generate(
        exported.model,
        [batch["input_ids"][0]],
        batch["pixel_values"],
        max_new_tokens=10,
        stop_ids=set(),
        pad_id=exported.tokenizer.pad_token_id,
    )
    assert ours == _hf_generate(hf_model, batch, 10)
    assert len(ours[0]) == 10


def test_processor_reproduces_our_pipeline(exported: Exported) -> None:
    from transformers import AutoProcessor

    image = _image(3)
    prompt = exported.template.prompt([Turn("human", QUESTION)])
    ours = exported.inputs()
    processor = AutoProcessor.from_pretrained(exported.dir, backend="pil")
    batch = processor(text=prompt, images=image, return_tensors="pt")
    # the processor expands <image> to image_seq_length copies, exactly as our tokenisation does
    assert torch.equal(batch["input_ids"], ours["input_ids"])
    assert (batch["input_ids"] == exported.model.image_token_id).sum() == 16
    ours_pixels = exported.model.encoder.image_transform(image)[None]
    assert torch.allclose(batch["pixel_values"], ours_pixels, atol=1e-6)
    # the default (torchvision) backend resamples slightly differently, nothing more
    fast = AutoProcessor.from_pretrained(exported.dir)(
        text=prompt, images=image, return_tensors="pt"
    )
    assert torch.equal(fast["input_ids"], ours["input_ids"])
    assert (fast["pixel_values"] - ours_pixels).abs().mean() < 0.01
    # chat template: HF content-list messages render our vicuna_v1 prompt
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    # tokenised with the image: our training ids, one BOS (llava-hf's convention: the template
    # has none, the processor adds it; the model-card idiom `processor(text=...)` is checked above)
    messages[0]["content"][0]["image"] = image
    batch = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(batch["input_ids"], ours["input_ids"])
    assert ours["input_ids"][0, 0] == exported.tokenizer.bos_token_id


def test_exported_folder_is_plain_transformers(exported: Exported) -> None:
    files = {p.name for p in exported.dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert "processor_config.json" in files
    tok_cfg = json.loads((exported.dir / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg
    config = json.loads((exported.dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    # the llava-hf weight names that vLLM's loader (and transformers 4) expect
    from safetensors import safe_open

    with safe_open(exported.dir / "model.safetensors", "pt") as f:
        tops = {".".join(k.split(".")[:2]) for k in f.keys()}  # noqa: SIM118
    assert {t for t in tops if t.startswith("vision_tower.")} == {"vision_tower.vision_model"}
    assert {t.split(".")[0] for t in tops} == {
        "vision_tower",
        "multi_modal_projector",
        "language_model",
    }


# ----------------------------------------------------------------------------- import


def test_import_roundtrip_equal_logits_and_generation(exported: Exported) -> None:
    model, tokenizer = load_hf_llava(exported.dir)
    original = exported.model
    assert model.image_token_id == original.image_token_id
    assert model.num_image_tokens == original.num_image_tokens
    assert model.encoder.has_cls == original.encoder.has_cls
    assert model.encoder.select_layer == original.encoder.select_layer
    assert model.encoder.select_feature == original.encoder.select_feature
    assert model.encoder.image_transform == original.encoder.image_transform
    assert len(tokenizer) == len(exported.tokenizer)
    batch = exported.inputs()
    assert (_logits(model, batch) - _logits(original, batch)).abs().max().item() <= TOL
    args = ([batch["input_ids"][0]], batch["pixel_values"], 10, set(), tokenizer.pad_token_id)
    assert greedy_generate(model, *args) == greedy_generate(original, *args)
    # it trains: a loss and gradients for every parameter that feeds the output
    model.train()
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.connector.layers[0].weight.grad is not None


def test_import_transformers4_llava_hf_layout(exported: Exported, tmp_path: Path) -> None:
    """Folders on the hub (llava-hf/llava-1.5-7b-hf) were written by transformers 4: weights
    under `vision_tower.vision_model.*` (as our export writes them) and a CLIP/SigLIP
    preprocessor_config.json (no pad)."""
    legacy = tmp_path / "legacy"
    shutil.copytree(exported.dir, legacy)
    processor_cfg = json.loads((legacy / "processor_config.json").read_text())
    del processor_cfg["image_processor"]
    (legacy / "processor_config.json").write_text(json.dumps(processor_cfg))
    clip = exported.family == "clip"
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor" if clip else "SiglipImageProcessor",
        "size": {"shortest_edge": 64} if clip else {"height": 64, "width": 64},
        "do_center_crop": clip,
        "crop_size": {"height": 64, "width": 64},
        "resample": 3,
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
    }
    (legacy / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    model, _ = load_hf_llava(legacy)
    transform = model.encoder.image_transform
    assert (transform.resize, transform.aspect) == (
        ("shortest_edge", "crop") if clip else ("exact", "resize")
    )
    assert list(transform.mean) == [0.1, 0.2, 0.3] and list(transform.std) == [0.4, 0.5, 0.6]
    batch = exported.inputs()
    assert (_logits(model, batch) - _logits(exported.model, batch)).abs().max().item() <= TOL


def test_component_configs_and_load_hf_weights(exported: Exported) -> None:
    """The `stage.init_from=hf:<dir>` path: build from derived configs, then load the weights."""
    cfgs = {k: OmegaConf.create(v) for k, v in component_configs(exported.dir).items()}
    cfgs["llm"].init_seed = 1  # different random weights until the load
    cfgs["connector"].init_seed = 1
    model, _ = build_vlm(cfgs["encoder"], cfgs["connector"], cfgs["llm"])
    model.eval()
    batch = exported.inputs()
    expected = _logits(exported.model, batch)
    assert (_logits(model, batch) - expected).abs().max().item() > 1e-3
    load_hf_weights(model, exported.dir)
    assert (_logits(model, batch) - expected).abs().max().item() <= TOL


def test_load_hf_weights_rejects_other_shapes(exported: Exported) -> None:
    cfg = compose([*FAMILIES[exported.family], "llm.config.hidden_size=64"])
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    with pytest.raises(ConfigError, match="does not fit"):
        load_hf_weights(model, exported.dir)


# ----------------------------------------------------------------------------- refusals, CLI


@pytest.mark.parametrize("overrides", [["connector=linear"], ["connector.depth=3"]])
def test_other_connectors_refuse_with_own_format_hint(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose(overrides)
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    with pytest.raises(
        ConfigError, match=r"^connector: .*no transformers Llava equivalent.*own format"
    ):
        export_hf_llava(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as code:
        cli.main(["export", "--out", str(tmp_path / "cli"), *overrides])
    assert code.value.code == 2


def test_cli_export_from_checkpoint(tmp_path: Path) -> None:
    """`vlmlab export --checkpoint`: rebuilt from meta.json, chain loaded, trained weights kept."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    cfg = compose([])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    for name, param in model.named_parameters():  # "train" stage 1: the connector moves
        param.requires_grad_(name.startswith("connector."))
        if param.requires_grad:
            param.data.add_(0.05 * torch.randn_like(param))
    meta = {
        "stage": "1",
        "config": {c: as_dict(cfg[c]) for c in ("encoder", "connector", "llm")},
        "fingerprints": {},
        "parent": None,
    }
    ckpt = checkpoints.save_trainable(model, tmp_path / "ckpt", meta)
    with pytest.raises(SystemExit) as code:
        cli.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert code.value.code == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_id
    template = get_template("vicuna_v1", tokenizer.eos_token)
    text = TextEncoder(tokenizer, template, model.num_image_tokens, model.image_token_id, 512)
    ids = text.encode_prompt([Turn("human", QUESTION)])[None]
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": model.encoder.image_transform(_image(0))[None],
    }
    model.eval()
    assert (_logits(hf, batch) - _logits(model, batch)).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})


@pytest.mark.parametrize("name", [n for n in available_templates() if n != "plain"])
def test_chat_template_matches_our_template(name: str, tokenizer: Any) -> None:
    template = get_template(name, tokenizer.eos_token)
    jinja = chat_template_for(template, tokenizer)
    assert jinja is not None
    turns = [
        Turn("human", QUESTION),
        Turn("gpt", "Red."),
        Turn("human", "And its shape?"),
        Turn("gpt", "A square."),
    ]
    messages = [
        {"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns
    ]
    render = tokenizer.apply_chat_template
    full = render(messages, chat_template=jinja, tokenize=False)
    assert full == "".join(text for text, _ in template.render(turns))
    prompt = render(messages[:3], chat_template=jinja, tokenize=False, add_generation_prompt=True)
    assert prompt == template.prompt(turns[:3])
    # the rendered prompt tokenised as users do (special tokens added: one BOS where the template
    # trains with one) gives our training ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ours = TextEncoder(tokenizer, template, 1, image_id, 512).encode_prompt(turns[:3])
    assert tokenizer(prompt, add_special_tokens=template.adds_bos)["input_ids"] == ours.tolist()


def test_plain_template_has_no_chat_template(tokenizer: Any) -> None:
    assert chat_template_for(get_template("plain"), tokenizer) is None
