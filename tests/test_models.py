"""Model-side contracts: VLM forward, encoders, connectors, freezing, init, preset numbers."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from tests.test_templates import LLM_OPTIONS
from vlmlab.data.datamodule import collate
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models import build_vlm
from vlmlab.models.connectors.linear import LinearConnector
from vlmlab.models.connectors.mlp import MLPConnector
from vlmlab.models.encoder import HFVisionEncoder
from vlmlab.models.image_transform import ImageTransform
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.templates import get_template

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


# ----------------------------------------------------------------------------- helpers


def _conv(question: str, answer: str, image: bool) -> list[dict[str, str]]:
    q = f"<image>\n{question}" if image else question
    return [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]


def _batch(
    model: VisionLanguageModel, tokenizer: Any, has_image: list[bool], start: int = 0
) -> dict[str, Any]:
    """A real collated batch: vicuna_v1 conversations, images through the encoder's transform.

    Sample k (counting from `start`) always has the same colour, answer and image.
    """
    encoder = TextEncoder(
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.num_image_tokens,
        model.image_token_id,
        max_length=256,
    )
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    samples = []
    for i, with_image in enumerate(has_image, start=start):
        conv = _conv(
            "What colour is the shape?", ["Red", "Blue", "Green", "Yellow"][i % 4], with_image
        )
        pixel_values = None
        if with_image:
            image = Image.new("RGB", (80, 48), colours[i % 4])
            pixel_values = model.encoder.image_transform(image)
        samples.append(
            {"id": str(i), "pixel_values": pixel_values, **encoder.encode(conv, with_image)}
        )
    return collate(samples, tokenizer.pad_token_id)


def _forward(model: VisionLanguageModel, batch: dict[str, Any]):
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    )


def _logits(model: VisionLanguageModel, batch: dict[str, Any]) -> torch.Tensor:
    """Full (B, T, V) logits: a forward without labels (with labels only the loss is built)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- VLM forward


@pytest.mark.parametrize(
    "has_image",
    [[True, True], [True, False, True], [False, False]],
    ids=["images", "mixed", "text-only"],
)
def test_forward_shapes_and_finite_loss(tiny_model, has_image: list[bool]) -> None:
    model, tokenizer = tiny_model
    batch = _batch(model, tokenizer, has_image)
    if not any(has_image):
        assert batch["pixel_values"] is None
    else:
        assert batch["pixel_values"].shape[0] == sum(has_image)
    out = _forward(model, batch)
    bsz, seq = batch["input_ids"].shape
    vocab = model.llm.get_input_embeddings().num_embeddings
    assert vocab >= len(tokenizer)
    assert out.logits is None  # with labels the (B, T, V) logits are never built
    assert _logits(model, batch).shape == (bsz, seq, vocab)
    assert out.loss is not None and out.loss.dim() == 0
    assert torch.isfinite(out.loss)
    assert out.loss.requires_grad
    # a random-init model over a V-way vocabulary: loss is near log(V), certainly not 0
    assert 0.5 * math.log(vocab) < out.loss.item() < 2.0 * math.log(vocab)
    assert out.num_target_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_each_sample_sees_only_its_own_image(tiny_model) -> None:
    """A mixed batch gives every row the logits it gets alone: images are scattered in order."""
    model, tokenizer = tiny_model
    model.eval()
    has_image = [True, False, True]
    batch = _batch(model, tokenizer, has_image)
    with torch.no_grad():
        base = _logits(model, batch)
        other = dict(batch, pixel_values=batch["pixel_values"] * -1.0)
        changed = _logits(model, other)
        alone = [
            _logits(model, _batch(model, tokenizer, [h], start=i)) for i, h in enumerate(has_image)
        ]
    mask = batch["attention_mask"].bool()
    # other pixels change the image rows, never the text-only row
    assert not torch.allclose(base[0][mask[0]], changed[0][mask[0]])
    assert not torch.allclose(base[2][mask[2]], changed[2][mask[2]])
    torch.testing.assert_close(base[1][mask[1]], changed[1][mask[1]])
    for i, single in enumerate(alone):
        n = int(mask[i].sum())
        assert single.shape[1] == n
        torch.testing.assert_close(base[i, :n], single[0], atol=1e-4, rtol=1e-4)
    # and the two image rows really differ in their image (red vs green)
    assert not torch.allclose(batch["pixel_values"][0], batch["pixel_values"][1])


def test_image_token_count_mismatch_raises(tiny_model) -> None:
    model, tokenizer = tiny_model
    m = model.num_image_tokens
    bos = tokenizer.bos_token_id
    text = tokenizer("What is it?", add_special_tokens=False)["input_ids"]
    pixel_values = torch.zeros(1, 3, model.encoder.image_size, model.encoder.image_size)

    def ids(n_image: int) -> torch.Tensor:
        return torch.tensor([[bos, *([model.image_token_id] * n_image), *text]])

    good = ids(m)
    out = model(good, torch.ones_like(good), pixel_values=pixel_values)
    assert out.logits.shape[:2] == good.shape
    for wrong in (m - 1, m + 1, 2 * m):
        bad = ids(wrong)
        with pytest.raises(ValueError, match=rf"{wrong} image tokens.*1 images x {m} tokens"):
            model(bad, torch.ones_like(bad), pixel_values=pixel_values)
    with pytest.raises(ValueError, match=rf"{m} image tokens but no pixel_values"):
        model(good, torch.ones_like(good), pixel_values=None)
    with pytest.raises(ValueError, match=rf"{m} image tokens but 2 images"):
        model(good, torch.ones_like(good), pixel_values=pixel_values.repeat(2, 1, 1, 1))


# ----------------------------------------------------------------------------- encoders


def _reference_hidden_states(encoder: HFVisionEncoder, pixel_values: torch.Tensor) -> list:
    """Hidden states recomputed layer by layer, independently of `output_hidden_states`."""
    vision = encoder.vision
    h = vision.embeddings(pixel_values)
    if encoder.family == "clip":
        h = vision.pre_layrnorm(h)
    states = [h]
    for layer in vision.encoder.layers:
        out = layer(states[-1], None)
        states.append(out[0] if isinstance(out, tuple) else out)
    return states


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1, -4])
@pytest.mark.parametrize(
    ("family", "select_feature", "cls_offset"),
    [("clip", "patch", 1), ("clip", "cls_patch", 0), ("siglip", "patch", 0)],
)
def test_encoder_selects_layer_and_tokens(
    family: str, select_feature: str, cls_offset: int, select_layer: int
) -> None:
    transform = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize": "exact"}
    encoder = HFVisionEncoder(
        family=family,
        config=TINY_VISION,
        transform=transform,
        select_layer=select_layer,
        select_feature=select_feature,
    ).eval()
    num_patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    assert encoder.num_patches == num_patches == 16
    expected_tokens = num_patches + (1 if family == "clip" and select_feature == "cls_patch" else 0)
    assert encoder.num_tokens == expected_tokens
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(pixel_values)
        hf = encoder.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        ref = _reference_hidden_states(encoder, pixel_values)
    assert features.shape == (2, expected_tokens, TINY_VISION["hidden_size"])
    assert len(hf) == len(ref) == TINY_VISION["num_hidden_layers"] + 1
    torch.testing.assert_close(features, hf[select_layer][:, cls_offset:])
    torch.testing.assert_close(features, ref[select_layer][:, cls_offset:], atol=1e-5, rtol=1e-5)
    # and not some other layer
    for k in range(len(ref)):
        if k != select_layer % len(ref):
            assert not torch.allclose(features, ref[k][:, cls_offset:], atol=1e-4)


def test_siglip_has_no_cls_and_keeps_every_patch() -> None:
    encoder = HFVisionEncoder(
        family="siglip",
        config=TINY_VISION,
        transform={"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "exact"},
        select_feature="patch",
    )
    assert encoder.has_cls is False
    pixel_values = encoder.image_transform(Image.new("RGB", (40, 30), (10, 20, 30)))
    assert pixel_values.shape == (3, 32, 32)
    with torch.no_grad():
        out = encoder(pixel_values[None])
    assert out.shape[1] == encoder.num_tokens == (32 // 8) ** 2


def test_tiny_clip_preset_drops_cls(compose_cfg) -> None:
    cfg = compose_cfg()
    encoder = instantiate(cfg.encoder, _convert_="all")
    keep = instantiate(cfg.encoder, select_feature="cls_patch", _convert_="all")
    pixel_values = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert encoder(pixel_values).shape[1] == encoder.num_tokens == (64 // 16) ** 2
        assert keep(pixel_values).shape[1] == keep.num_tokens == (64 // 16) ** 2 + 1


@pytest.mark.parametrize("select_layer", [4, -5, 100])
def test_select_layer_out_of_range(select_layer: int) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.select_layer") as info:
        HFVisionEncoder(
            family="clip",
            config=TINY_VISION,
            transform={"mean": [0.5] * 3, "std": [0.5] * 3},
            select_layer=select_layer,
        )
    assert info.value.key == "encoder.select_layer"
    assert str(select_layer) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [("encoder.select_layer=5", "encoder.select_layer"), ("connector.depth=0", "connector.depth")],
)
def test_config_errors_of_instantiated_parts_stay_config_errors(
    compose_cfg, override: str, key: str
) -> None:
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)


# ----------------------------------------------------------------------------- assembly

BUILDER_CALLS: list[dict[str, Any]] = []


def recording_llm_builder(tokenizer: Any, **kwargs: Any) -> Any:
    """An LLM family of its own (`llm._target_: tests.test_models.recording_llm_builder`)."""
    from vlmlab.models.llm import build_llm

    BUILDER_CALLS.append(kwargs)
    return build_llm(tokenizer, **{**kwargs, "config": {**kwargs["config"], "model_type": "qwen2"}})


def test_the_llm_builder_is_the_presets_target(compose_cfg) -> None:
    """A new LLM family is one builder plus one YAML naming it: build_vlm calls `llm._target_`
    with the preset's keys (not the tokenizer/template keys others read)."""
    cfg = compose_cfg()
    llm = OmegaConf.to_container(cfg.llm, resolve=True)
    assert isinstance(llm, dict)
    llm["_target_"] = "tests.test_models.recording_llm_builder"
    BUILDER_CALLS.clear()
    model, _ = build_vlm(cfg.encoder, cfg.connector, OmegaConf.create(llm))
    assert len(BUILDER_CALLS) == 1 and model.llm.config.model_type == "qwen2"
    assert {"config", "dtype", "init_seed", "quantization"} <= set(BUILDER_CALLS[0])
    assert not {"template", "tokenizer", "warmup_stage", "_target_"} & set(BUILDER_CALLS[0])
    llm["_target_"] = "tests.test_models.no_such_builder"
    with pytest.raises(ConfigError, match=re.escape("llm._target_")):
        build_vlm(cfg.encoder, cfg.connector, OmegaConf.create(llm))


def test_one_assembly_on_meta_equals_the_real_build(compose_cfg) -> None:
    """`weights="none", device="meta"` (plan, HF import) builds the same shapes as training."""
    cfg = compose_cfg()
    real, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    meta, same = build_vlm(
        cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta", tokenizer=tokenizer
    )
    assert same is tokenizer and meta.image_token_id == real.image_token_id
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in meta.named_parameters()} == shapes
    assert all(p.is_meta for p in meta.parameters())
    assert not any(p.is_meta for p in real.parameters())


def test_llm_backbone_adapter_declares_decoder_layers(compose_cfg) -> None:
    """The transformers LLM's blocks (FSDP units, train_last, checkpointing) are its decoder
    layers, also through a LoRA wrapper; `stage.train_last.llm` trains exactly the last ones."""
    from vlmlab.models.backbone import backbone_of
    from vlmlab.models.contracts import LLMBackbone
    from vlmlab.stages import apply

    cfg = compose_cfg("stage=1", "+stage.train_last.llm=1")
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    backbone = backbone_of(model.llm, "llm")
    assert isinstance(backbone, LLMBackbone)
    layers = list(model.llm.model.layers)
    assert backbone.blocks() == layers and backbone.hidden_size == model.llm.config.hidden_size
    assert backbone.unused_parameters() == []
    apply(cfg.stage, model)
    trained = {id(p) for p in model.llm.parameters() if p.requires_grad}
    assert trained == {id(p) for p in layers[-1].parameters()}

    lora_cfg = compose_cfg("stage=2_lora")
    wrapped, _ = build_vlm(lora_cfg.encoder, lora_cfg.connector, lora_cfg.llm)
    layers = list(wrapped.llm.model.layers)
    apply(lora_cfg.stage, wrapped)
    assert type(wrapped.llm).__name__.startswith("Peft")
    assert backbone_of(wrapped.llm, "llm").blocks() == layers  # adapters sit inside the layers


# ----------------------------------------------------------------------------- connectors


@pytest.mark.parametrize("option", ["linear", "mlp", "tiny"])
def test_connectors_shape_tokens_and_gradients(compose_cfg, option: str) -> None:
    cfg = compose_cfg(f"connector={option}")
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    connector = model.connector
    expected_cls = LinearConnector if option == "linear" else MLPConnector
    assert type(connector) is expected_cls
    llm_hidden = model.llm.config.hidden_size
    in_features = model.encoder.hidden_size
    features = torch.randn(3, 7, in_features, requires_grad=True)
    out = connector(features)
    assert out.shape == (3, 7, llm_hidden)
    for n in (1, 7, 577):
        assert connector.num_tokens(n) == n
    assert model.num_image_tokens == model.encoder.num_tokens
    out.pow(2).mean().backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) > 0, name
    assert features.grad is not None


def test_connector_parameter_counts() -> None:
    with torch.device("meta"):
        linear = LinearConnector(1024, 4096)
        mlp = MLPConnector(1024, 4096, depth=2)
        mlp3 = MLPConnector(1024, 4096, depth=3)
    assert _n_params(linear) == 1024 * 4096 + 4096
    assert _n_params(mlp) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert _n_params(mlp3) == _n_params(mlp) + 4096 * 4096 + 4096
    with pytest.raises(ConfigError, match=r"connector\.depth"):
        MLPConnector(8, 8, depth=0)


# ----------------------------------------------------------------------------- stages


def test_stage1_freezes_encoder_and_llm(compose_cfg) -> None:
    from vlmlab.stages import apply

    cfg = compose_cfg("stage=1")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    plan = apply(cfg.stage, model)
    assert plan.trainable and all(name.startswith("connector.") for name in plan.trainable)
    model.train()
    assert not model.encoder.training
    assert all(not m.training for m in model.encoder.modules())
    assert model.connector.training and model.llm.training
    batch = _batch(model, tokenizer, [True, False])
    _forward(model, batch).loss.backward()
    for name, param in model.encoder.named_parameters():
        assert not param.requires_grad and param.grad is None, f"encoder.{name}"
    for name, param in model.llm.named_parameters():
        assert not param.requires_grad and param.grad is None, f"llm.{name}"
    for name, param in model.connector.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, f"connector.{name}"


def test_stage2_trains_llm_but_encoder_stays_frozen_and_eval(compose_cfg) -> None:
    from vlmlab.stages import apply

    cfg = compose_cfg("stage=2")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    apply(cfg.stage, model)
    model.train()
    assert not model.encoder.training
    _forward(model, _batch(model, tokenizer, [True])).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.connector.parameters())
    assert model.llm.get_input_embeddings().weight.grad is not None


# ----------------------------------------------------------------------------- init


def test_random_init_is_a_function_of_the_config(compose_cfg) -> None:
    cfg = compose_cfg()
    torch.manual_seed(1)
    first, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    torch.manual_seed(12345)
    torch.randn(1000)
    second, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the seed in the config is what matters: another init_seed gives other weights
    other_cfg = compose_cfg("encoder.init_seed=1", "connector.init_seed=1", "llm.init_seed=1")
    other, _ = build_vlm(other_cfg.encoder, other_cfg.connector, other_cfg.llm)
    c = other.state_dict()
    for prefix in ("encoder.", "connector.", "llm."):
        keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point()]
        assert keys, prefix
        assert any(not torch.equal(a[k], c[k]) for k in keys), f"{prefix}* ignores init_seed"


# ----------------------------------------------------------------------------- real presets


def _vision_model_on_meta(encoder_cfg: Any) -> torch.nn.Module:
    import transformers

    arch = OmegaConf.to_container(encoder_cfg.config, resolve=True)
    family = {"clip": "CLIPVision", "siglip": "SiglipVision"}[encoder_cfg.family]
    config = getattr(transformers, f"{family}Config")(**arch)
    with torch.device("meta"):
        return getattr(transformers, f"{family}Model")(config)


@pytest.mark.parametrize(
    ("option", "family", "patches", "params", "name"),
    [
        ("clip336", "clip", 576, 303.5e6, "openai/clip-vit-large-patch14-336"),
        ("clip224", "clip", 256, 303.2e6, "openai/clip-vit-large-patch14"),
        ("siglip", "siglip", 729, None, "google/siglip-so400m-patch14-384"),
    ],
)
def test_encoder_presets(
    compose_cfg, option: str, family: str, patches: int, params: float | None, name: str
) -> None:
    cfg = compose_cfg(f"encoder={option}")
    assert cfg.encoder.family == family
    assert cfg.encoder.name_or_path == name
    assert cfg.encoder.pretrained is True
    assert cfg.encoder.select_layer == -2
    hf = _vision_model_on_meta(cfg.encoder)
    embeddings = getattr(hf, "vision_model", hf).embeddings
    assert embeddings.num_patches == patches
    if params is not None:
        assert _n_params(hf) == pytest.approx(params, rel=0.005)
    # the vlmlab encoder built from the same preset (random init, on meta) agrees
    with torch.device("meta"):
        encoder = instantiate(cfg.encoder, pretrained=False, _convert_="all")
    assert encoder.num_patches == patches
    assert encoder.num_tokens == patches  # select_feature=patch: no CLS, no patch dropped
    assert encoder.image_transform.size == cfg.encoder.config.image_size
    assert _n_params(encoder) == _n_params(hf)


def test_vicuna7b_preset_is_llama2_7b(compose_cfg) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = compose_cfg("llm=vicuna7b")
    assert cfg.llm.name_or_path == "lmsys/vicuna-7b-v1.5"
    assert cfg.llm.tokenizer.name_or_path == "lmsys/vicuna-7b-v1.5"
    assert cfg.llm.tokenizer.add_bos_token is True
    assert cfg.llm.template == "vicuna_v1"
    arch = OmegaConf.to_container(cfg.llm.config, resolve=True)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    assert type(llm).__name__ == "LlamaForCausalLM"
    assert _n_params(llm) == pytest.approx(6.74e9, rel=0.005)
    assert llm.get_input_embeddings().num_embeddings == 32000


# ----------------------------------------------------------------------------- image transform


def test_pad_mode_fills_with_mean_before_resize() -> None:
    size = 64
    pad = ImageTransform(size=size, mean=CLIP_MEAN, std=CLIP_STD, aspect="pad")
    wide = Image.new("RGB", (200, 50), (255, 0, 0))  # 4:1, resized down after padding
    out = pad(wide)
    assert out.shape == (3, size, size)
    assert out.dtype == torch.float32
    for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
        assert torch.allclose(out[:, y, x], torch.zeros(3), atol=0.02), (y, x, out[:, y, x])
    red = torch.tensor([(c - m) / s for c, m, s in zip((1.0, 0.0, 0.0), CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out[:, size // 2, size // 2], red, atol=0.02, rtol=0)
    # the band of the original image keeps its aspect: 50/200 of the height, centred
    is_red = (out[0] - red[0]).abs() < 0.05
    red_rows = is_red[:, size // 2].nonzero().flatten()
    assert size // 4 - 2 <= len(red_rows) <= size // 4 + 2


@pytest.mark.parametrize("aspect", ["crop", "resize"])
def test_non_pad_modes_have_no_mean_border(aspect: str) -> None:
    transform = ImageTransform(size=32, mean=CLIP_MEAN, std=CLIP_STD, aspect=aspect)
    out = transform(Image.new("RGB", (120, 40), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    assert out[0, 0, 0] > 1.5  # red corner, not the mean colour


def test_exact_resize_and_tall_images() -> None:
    transform = ImageTransform(size=48, mean=(0.5,) * 3, std=(0.5,) * 3, resize="exact")
    tall = transform(Image.new("RGB", (30, 90), (255, 255, 255)))
    assert tall.shape == (3, 48, 48)
    fill = (int(0.5 * 255) / 255 - 0.5) / 0.5
    assert torch.allclose(tall[:, 24, 0], torch.full((3,), fill), atol=1e-3)  # left pad
    assert torch.allclose(tall[:, 24, 24], torch.ones(3), atol=1e-3)  # white centre
    with pytest.raises(ValueError, match="aspect"):
        ImageTransform(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, aspect="stretch")


@pytest.mark.parametrize("option", [o for o in LLM_OPTIONS if o != "tiny"])
def test_llm_preset_builds_at_tiny_size_and_runs(compose_cfg, option: str) -> None:
    """Each preset's own architecture class, shrunk, inside a real VLM forward and backward."""
    tiny = [
        "llm.pretrained=false",
        "llm.tokenizer={name_or_path: 'pkg://tiny_tokenizer'}",
        "++llm.tokenizer.backend=auto",  # the bundled tokenizer is byte-level BPE
        "llm.config.hidden_size=64",
        "llm.config.intermediate_size=128",
        "llm.config.num_hidden_layers=2",
        "llm.config.num_attention_heads=4",
        "llm.config.num_key_value_heads=2",
        "llm.config.vocab_size=null",
        "++llm.config.bos_token_id=null",
        "++llm.config.eos_token_id=null",
        "++llm.config.pad_token_id=null",
    ]
    cfg = compose_cfg(f"llm={option}", *tiny)
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert model.llm.config.model_type == cfg.llm.config.model_type
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *[model.image_token_id] * model.num_image_tokens, 10, 11, 12]]
    )
    pixels = torch.randn(1, 3, model.encoder.image_size, model.encoder.image_size)
    out = model(
        ids, torch.ones_like(ids), pixels, labels=ids.masked_fill(ids == model.image_token_id, -100)
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.connector.parameters())
