"""HF interchange of AnyRes models: ours == transformers' LlavaNextForConditionalGeneration.

A tiny random-init AnyRes model (tiny CLIP-style or SigLIP-style tower, MLP connector, tiny
Llama) is exported with `export_hf_llava`, loaded back with plain transformers (model and its
own LlavaNextProcessor, PIL backend), offline, and compared on one batch of images of four
shapes (four grids, four token counts): token ids, tiles, last-token logits (fp32, 1e-5),
greedy generations. Importing the folder (`load_hf_llava`, `init_from=hf:`, `vlmlab eval`'s
loader) gives the same logits again.
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

from vlmlab.config import compose
from vlmlab.errors import ConfigError
from vlmlab.eval.generate import GenerationConfig, Generator, Request, generate_ids
from vlmlab.models import build_vlm
from vlmlab.models.hf_llava import (
    component_configs,
    export_hf_llava,
    load_hf_llava,
    load_hf_weights,
)
from vlmlab.text.templates import Turn, get_template

FAMILIES = {"clip": ["encoder=tiny"], "siglip": ["encoder=tiny_siglip"]}
ANYRES = ["encoder.image=anyres"]
QUESTION = "<image>\nWhat is in the picture?"
# wide (1x3 grid), tall (3x1), a tile-sized square (1x2 and 2x1 tie: transformers takes the
# first listed, 1 row x 2 columns; LLaVA's own code the other), a larger square (2x2)
SIZES = [(150, 60), (50, 130), (64, 64), (90, 90)]
GRIDS = [(1, 3), (3, 1), (1, 2), (2, 2)]
TOL = 1e-5
NEW_TOKENS = 8


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(i, size) for i, size in enumerate(SIZES)]


class Exported:
    """Our tiny AnyRes model, its export, and the same batch prepared by both sides."""

    def __init__(self, family: str, root: Path) -> None:
        self.family = family
        cfg = compose([*FAMILIES[family], *ANYRES])
        self.model, self.tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
        self.model.eval()
        self.template = get_template("vicuna_v1", self.tokenizer.eos_token)
        self.dir = export_hf_llava(self.model, self.tokenizer, root / family, self.template)
        self.generator = Generator(
            self.model, self.tokenizer, self.template, self.model.image_processor
        )
        self.requests = [Request([Turn("human", QUESTION)], image) for image in IMAGES]

    def prompts(self) -> list[torch.Tensor]:
        return [self.generator.prompt_ids(r) for r in self.requests]

    def batch(self) -> dict[str, Any]:
        """Left-padded ids (one step serves every row), our tiles and (width, height) sizes."""
        prompts = self.prompts()
        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), length), pad)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
        pixels, sizes = self.generator.pixels(IMAGES)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "image_sizes": sizes,
        }


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(request.param, tmp_path_factory.mktemp("hf_next"))


@pytest.fixture(scope="module")
def hf_model(exported: Exported) -> Any:
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(exported.dir).eval()


@pytest.fixture(scope="module")
def hf_batch(exported: Exported) -> Any:
    """The same questions and images through the exported folder's own processor (PIL)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported.dir, backend="pil")
    processor.tokenizer.padding_side = "left"
    prompt = exported.template.prompt([Turn("human", QUESTION)])
    return processor(text=[prompt] * len(IMAGES), images=IMAGES, return_tensors="pt", padding=True)


def _ours_last_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            image_sizes=batch["image_sizes"],
        )
    return out.logits[:, -1]


# ----------------------------------------------------------------------------- export


def test_export_is_a_llava_next_folder(exported: Exported, hf_model: Any) -> None:
    config = json.loads((exported.dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    counter = exported.model.image_token_counter()
    # transformers' convention is (height, width); mode transformers already reads pairs so
    assert hf_model.config.image_grid_pinpoints == [list(p) for p in counter.pinpoints]
    expected = "default" if exported.family == "clip" else "full"
    assert hf_model.config.vision_feature_select_strategy == expected
    assert hf_model.config.vision_feature_layer == -2
    assert torch.equal(hf_model.model.image_newline, exported.model.image_newline)
    ours = sum(p.numel() for p in exported.model.parameters())
    assert sum(p.numel() for p in hf_model.parameters()) == ours
    processor = json.loads((exported.dir / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextProcessor"
    assert processor["image_processor"]["image_grid_pinpoints"] == config["image_grid_pinpoints"]


def test_processor_gives_our_ids_tiles_and_sizes(exported: Exported, hf_batch: Any) -> None:
    ours = exported.batch()
    counter = exported.model.image_token_counter()
    assert [counter(im.size).grid for im in IMAGES] == GRIDS
    assert len({counter(im.size).count for im in IMAGES}) == 4  # four token counts
    assert torch.equal(hf_batch["input_ids"], ours["input_ids"])
    assert torch.equal(hf_batch["attention_mask"], ours["attention_mask"])
    assert hf_batch["image_sizes"].tolist() == [[h, w] for w, h in ours["image_sizes"]]
    tiles = [exported.model.image_processor(im) for im in IMAGES]
    for k, mine in enumerate(tiles):  # the processor pads every image to the most tiles
        theirs = hf_batch["pixel_values"][k]
        assert torch.equal(theirs[: len(mine)], mine), SIZES[k]
        assert not theirs[len(mine) :].any()


def test_last_token_logits_equal_transformers(
    exported: Exported, hf_model: Any, hf_batch: Any
) -> None:
    ours = _ours_last_logits(exported.model, exported.batch())
    with torch.no_grad():
        theirs = hf_model(**hf_batch).logits[:, -1]
    assert (ours - theirs).abs().max().item() <= TOL
    # the images reach the LLM: other pixels change the logits
    other = {**hf_batch, "pixel_values": hf_batch["pixel_values"].flip(-1)}
    with torch.no_grad():
        moved = hf_model(**other).logits[:, -1]
    assert (moved - theirs).abs().max().item() > 1e-3


def test_greedy_generations_equal_transformers(
    exported: Exported, hf_model: Any, hf_batch: Any
) -> None:
    pixels, sizes = exported.generator.pixels(IMAGES)
    ours = generate_ids(
        exported.model,
        exported.prompts(),
        pixels,
        GenerationConfig(max_new_tokens=NEW_TOKENS),
        exported.tokenizer.pad_token_id,
        image_sizes=sizes,
    )
    hf_model.generation_config.eos_token_id = None  # a random model may emit EOS any time
    out = hf_model.generate(**hf_batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours == out[:, hf_batch["input_ids"].shape[1] :].tolist()
    assert all(len(row) == NEW_TOKENS for row in ours)


# ----------------------------------------------------------------------------- import


def test_import_gives_the_same_model(exported: Exported) -> None:
    model, tokenizer = load_hf_llava(exported.dir)
    assert model.image_strategy == "anyres"
    assert model.image_token_counter() == exported.model.image_token_counter()
    assert torch.equal(model.image_newline, exported.model.image_newline)
    assert len(tokenizer) == len(exported.tokenizer)
    batch = exported.batch()
    ours = _ours_last_logits(exported.model, batch)
    assert (_ours_last_logits(model, batch) - ours).abs().max().item() <= TOL
    # it trains further: image_newline gets its gradient
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == model.image_token_id, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.image_newline.grad is not None and model.image_newline.grad.abs().sum() > 0


def test_import_transformers4_llava_hf_layout(exported: Exported, tmp_path: Path) -> None:
    """llava-hf/llava-v1.6-* folders: transformers 4 weight names (`vision_tower.vision_model.*`,
    as our export writes them) and a preprocessor_config.json of LlavaNextImageProcessor with its
    own pinpoints."""
    legacy = tmp_path / "legacy"
    shutil.copytree(exported.dir, legacy)
    processor = json.loads((legacy / "processor_config.json").read_text())
    spec = processor.pop("image_processor")
    (legacy / "processor_config.json").write_text(json.dumps(processor))
    spec["image_processor_type"] = "LlavaNextImageProcessor"
    (legacy / "preprocessor_config.json").write_text(json.dumps(spec))
    model, _ = load_hf_llava(legacy)
    assert model.image_token_counter() == exported.model.image_token_counter()
    assert model.image_processor == exported.model.image_processor
    batch = exported.batch()
    expected = _ours_last_logits(exported.model, batch)
    assert (_ours_last_logits(model, batch) - expected).abs().max().item() <= TOL


def test_init_from_hf_loads_every_weight(exported: Exported) -> None:
    """`stage.init_from=hf:<dir>`: derived configs, other random weights, then the load."""
    cfgs = {k: OmegaConf.create(v) for k, v in component_configs(exported.dir).items()}
    assert cfgs["encoder"].image == "anyres"
    cfgs["llm"].init_seed = 1
    cfgs["connector"].init_seed = 1
    model, _ = build_vlm(cfgs["encoder"], cfgs["connector"], cfgs["llm"])
    model.eval()
    batch = exported.batch()
    expected = _ours_last_logits(exported.model, batch)
    assert not torch.equal(model.image_newline, exported.model.image_newline)
    load_hf_weights(model, exported.dir)
    assert torch.equal(model.image_newline, exported.model.image_newline)
    assert (_ours_last_logits(model, batch) - expected).abs().max().item() <= TOL


def test_eval_loader_reads_the_folder(exported: Exported) -> None:
    """`vlmlab eval <dir>` / `vlmlab chat <dir>`: the loader finds the template and answers
    as the original model does."""
    from vlmlab.eval.loading import load_model

    loaded = load_model(exported.dir, device="cpu")
    assert loaded.kind == "hf" and loaded.template.name == "vicuna_v1"
    assert loaded.model.image_strategy == "anyres"
    config = GenerationConfig(max_new_tokens=6)
    assert loaded.generator()(exported.requests, config) == exported.generator(
        exported.requests, config
    )


def test_a_pad_model_refuses_a_llava_next_folder(exported: Exported) -> None:
    cfg = compose(FAMILIES[exported.family])
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    with pytest.raises(ConfigError) as err:
        load_hf_weights(model, exported.dir)
    assert err.value.key == "encoder.image"


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("encoder.anyres.mode=llava", "encoder.anyres.mode"),
        ("encoder.anyres.pool_budget_tiles=2", "encoder.anyres.pool_budget_tiles"),
        ("encoder.anyres.newline=false", "encoder.anyres.newline"),
    ],
)
def test_export_refuses_what_llava_next_cannot_express(
    tmp_path: Path, override: str, key: str
) -> None:
    cfg = compose([*ANYRES, override])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    with pytest.raises(ConfigError) as err:
        export_hf_llava(model, tokenizer, tmp_path / "out")
    assert err.value.key == key
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path: Path) -> None:
    """`vlmlab export --out DIR encoder.image=anyres` writes a LlavaNext folder; a llava-mode
    model exits 2 (the configuration error) and writes nothing."""
    from transformers import AutoConfig

    from vlmlab import cli

    with pytest.raises(SystemExit) as code:
        cli.main(["export", "--out", str(tmp_path / "next"), *ANYRES])
    assert code.value.code == 0
    assert AutoConfig.from_pretrained(tmp_path / "next").model_type == "llava_next"
    with pytest.raises(SystemExit) as code:
        cli.main(["export", "--out", str(tmp_path / "llava"), *ANYRES, "encoder.anyres.mode=llava"])
    assert code.value.code == 2
    assert not (tmp_path / "llava").exists()
