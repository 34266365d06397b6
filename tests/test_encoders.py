"""Vision encoder zoo: presets, the transformers and timm backends, weight mapping, loading,
and exact image preprocessing.

Image transform parity: `ImageTransform` matches transformers' PIL-backend processors
(`CLIPImageProcessorPil`, `SiglipImageProcessorPil`, the slow processors LLaVA was trained with)
exactly: max abs diff 0.0, asserted <= 1e-5. The default (fast, torchvision) processors
`CLIPImageProcessor` / `SiglipImageProcessor` resample differently: measured max abs diff
0.008-0.03 (1-2 grey levels) in general and up to 0.15 (about 19 grey levels, mean 0.003) for a
17x600 image squeezed to a square without padding; asserted max <= 0.2, mean <= 0.005.
`aspect: pad` is compared against LLaVA's own `expand2square` followed by the processor.

Backend parity: with the same weights (mapped by `hf_to_timm_state_dict`), the timm and
transformers towers give bitwise-equal features (asserted <= 1e-5) for CLIP and for SigLIP with
`act_layer=gelu_tanh` (what our presets set). timm's SigLIP default uses exact GELU instead of
SigLIP's tanh approximation, so exact equality is impossible there; that case is checked for
shapes, an identical embedding layer and close (not equal) later layers.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vlmlab.config import compose
from vlmlab.errors import ConfigError
from vlmlab.models.contracts import Backbone, VisionEncoder
from vlmlab.models.encoder import HFVisionEncoder, build_encoder
from vlmlab.models.timm_encoder import (
    TimmVisionEncoder,
    hf_to_timm_state_dict,
    timm_to_hf_state_dict,
)

PRESETS = ["tiny", "tiny_siglip", "clip224", "clip336", "siglip", "siglip224"]
BACKENDS = ["transformers", "timm"]
FAMILY = {
    "tiny": "clip",
    "tiny_siglip": "siglip",
    "clip224": "clip",
    "clip336": "clip",
    "siglip": "siglip",
    "siglip224": "siglip",
}
TIMM_TINY_NAME = {
    "clip": "vit_base_patch16_clip_quickgelu_224",
    "siglip": "vit_base_patch16_siglip_224",
}
ARCH = {  # a 3-layer tower, so -2, -1, 0 and 1 are four different hidden states
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TIMM_ARCH = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}
HALF = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize": "exact"}
IMAGE_SIZES = [(50, 80), (333, 200), (224, 224), (500, 375), (17, 600), (600, 17)]  # (w, h)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(family: str, backend: str, **kw: Any) -> Any:
    """A 3-layer tiny encoder of either backend, built straight from keyword arguments."""
    args: dict[str, Any] = {"family": family, "transform": HALF, "config": ARCH, **kw}
    if backend == "timm":
        timm_kwargs = dict(TIMM_ARCH, **({"act_layer": "gelu_tanh"} if family == "siglip" else {}))
        args = {"timm_name": TIMM_TINY_NAME[family], "timm_kwargs": timm_kwargs, **args}
    return build_encoder(backend=backend, **args).eval()


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (LayerNorm 1/0, zero bias) so a mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


TINY_OVERRIDES = (  # shrink any preset to ARCH with random init, as a user would type it
    "encoder.pretrained=false",
    *[f"encoder.config.{k}={v}" for k, v in ARCH.items()],
    *[f"++encoder.timm_kwargs.{k}={v}" for k, v in TIMM_ARCH.items()],
)


@functools.cache
def _preset(preset: str, *overrides: str) -> DictConfig:
    """The composed `encoder` node of `python train.py encoder=<preset> <overrides>` (cached:
    composing is the slow part of these tests, and nothing here mutates the result)."""
    return compose([f"encoder={preset}", *overrides]).encoder


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_at_tiny_size(preset: str, backend: str) -> None:
    encoder = instantiate(_preset(preset, *TINY_OVERRIDES), backend=backend, _convert_="all").eval()
    expected = HFVisionEncoder if backend == "transformers" else TimmVisionEncoder
    assert type(encoder) is expected
    assert isinstance(encoder, VisionEncoder)
    family = FAMILY[preset]
    assert encoder.family == family and encoder.has_cls is (family == "clip")
    assert (encoder.image_size, encoder.hidden_size, encoder.num_patches) == (32, 32, 16)
    assert encoder.num_tokens == 16  # select_feature=patch: CLS dropped, no patch dropped
    # the preset's own transform, at the built tower's size, feeds the tower
    pixel_values = encoder.image_transform(Image.new("RGB", (70, 40), (200, 30, 90)))
    assert pixel_values.shape == (3, 32, 32)
    with torch.no_grad():
        features = encoder(pixel_values[None])
    assert features.shape == (1, 16, 32) and torch.isfinite(features).all()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_backbone_contract_in_both_backends(family: str) -> None:
    """Blocks, the parameters that never get gradients and activation checkpointing are declared
    by the encoder (contracts.Backbone) and agree across backends: the declared unused ones are
    exactly those a training backward leaves without gradient, and checkpointing each block
    changes no gradient."""
    unused_sizes = {}
    for backend in BACKENDS:
        encoder = _tiny(family, backend)  # select_layer=-2 of 3 layers: the last block idles
        assert isinstance(encoder, Backbone)
        blocks = encoder.blocks()
        assert len(blocks) == ARCH["num_hidden_layers"]
        assert len({_n_params(b) for b in blocks}) == 1  # repeated blocks, not the whole tower
        encoder.train()
        encoder(_pixels()).square().sum().backward()
        grads = {
            name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None
        }
        idle = {id(p) for p in encoder.parameters() if p.grad is None}
        assert {id(p) for p in encoder.unused_parameters()} == idle
        assert {id(p) for p in blocks[-1].parameters()} <= idle
        unused_sizes[backend] = sum(p.numel() for p in encoder.unused_parameters())
        encoder.zero_grad(set_to_none=True)
        encoder.enable_activation_checkpointing()
        encoder(_pixels()).square().sum().backward()
        for name, p in encoder.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
    assert unused_sizes["transformers"] == unused_sizes["timm"]


def _activation(encoder: Any) -> str:
    if isinstance(encoder, HFVisionEncoder):
        return str(encoder.vision.config.hidden_act)
    act = encoder.vision.blocks[0].mlp.act
    return type(act).__name__


@pytest.mark.parametrize(
    ("preset", "patches", "hidden", "layers", "params", "act"),
    [
        ("clip336", 576, 1024, 24, 303.5e6, ("quick_gelu", "QuickGELU")),
        ("clip224", 256, 1024, 24, 303.2e6, ("quick_gelu", "QuickGELU")),
        ("siglip", 729, 1152, 27, 428.2e6, ("gelu_pytorch_tanh", "GELUTanh")),
        ("siglip224", 196, 768, 12, 92.9e6, ("gelu_pytorch_tanh", "GELUTanh")),
    ],
)
def test_full_size_presets_on_meta_in_both_backends(
    preset: str, patches: int, hidden: int, layers: int, params: float, act: tuple
) -> None:
    """Real architecture numbers, no weights, no network: both backends build the same tower."""
    cfg = _preset(preset)
    assert cfg.pretrained is True and cfg.backend == "transformers"
    built = {}
    for backend in BACKENDS:
        with torch.device("meta"):
            built[backend] = instantiate(cfg, backend=backend, pretrained=False)
    hf, tm = built["transformers"], built["timm"]
    for encoder in (hf, tm):
        assert encoder.num_patches == patches
        assert encoder.hidden_size == hidden
        assert encoder.num_tokens == patches
        assert encoder.image_transform == hf.image_transform
        assert encoder.image_transform.size == encoder.image_size == cfg.config.image_size
    assert len(tm.vision.blocks) == hf.vision.config.num_hidden_layers == layers
    assert _n_params(hf) == _n_params(tm) == pytest.approx(params, rel=0.002)
    assert (_activation(hf), _activation(tm)) == act  # QuickGELU for OpenAI CLIP, in both
    with torch.device("meta"):
        keep = instantiate(cfg, backend="timm", pretrained=False, select_feature="cls_patch")
    assert keep.num_tokens == patches + int(FAMILY[preset] == "clip")


@pytest.mark.parametrize("preset", ["clip224", "clip336", "siglip", "siglip224"])
def test_preset_transform_agrees_with_timm_pretrained_cfg(preset: str) -> None:
    """The weights timm would load were trained with the preprocessing the preset declares."""
    import timm

    cfg = _preset(preset)
    pcfg = timm.models.get_pretrained_cfg(cfg.timm_name)
    assert pcfg is not None, cfg.timm_name
    assert cfg.timm_name in timm.list_pretrained(cfg.timm_name)
    size = cfg.config.image_size
    assert pcfg.input_size == (3, size, size)
    assert pcfg.interpolation == cfg.transform.resample == "bicubic"
    np.testing.assert_allclose(pcfg.mean, cfg.transform.mean, atol=1e-8)
    np.testing.assert_allclose(pcfg.std, cfg.transform.std, atol=1e-8)


# ----------------------------------------------------------------------------- backend parity


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_same_weights_same_features_in_both_backends(
    family: str, select_layer: int, select_feature: str
) -> None:
    kw = {"select_layer": select_layer, "select_feature": select_feature}
    hf = _tiny(family, "transformers", **kw)
    _perturb(hf.vision)
    tm = _tiny(family, "timm", init_seed=7, **kw)
    tm.vision.load_state_dict(hf_to_timm_state_dict(family, hf.vision.state_dict()), strict=True)
    pixel_values = _pixels()
    with torch.no_grad():
        a, b = hf(pixel_values), tm(pixel_values)
        states = hf.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    tokens = 16 + int(family == "clip" and select_feature == "cls_patch")
    assert a.shape == b.shape == (2, tokens, 32)
    assert (a - b).abs().max().item() <= 1e-5
    # and it is the selected hidden state, not a neighbour
    start = int(family == "clip" and select_feature == "patch")
    torch.testing.assert_close(b, states[select_layer][:, start:], atol=1e-5, rtol=0)
    other = states[(select_layer + 1) % len(states)][:, start:]
    assert (b - other).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_weight_mapping_is_complete_and_invertible(family: str) -> None:
    """Every tensor maps (pooled outputs agree too) and timm -> transformers inverts it."""
    hf = _tiny(family, "transformers")
    _perturb(hf.vision, seed=1)
    tm = _tiny(family, "timm")
    hf_state = hf.vision.state_dict()
    timm_state = hf_to_timm_state_dict(family, hf_state)
    assert set(timm_state) == set(tm.vision.state_dict())
    tm.vision.load_state_dict(timm_state, strict=True)
    back = timm_to_hf_state_dict(family, tm.vision.state_dict())
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
    # a full CLIP/SigLIP checkpoint names the tower `vision_model.*`: same mapping
    prefixed = hf_to_timm_state_dict(family, {f"vision_model.{k}": v for k, v in hf_state.items()})
    assert all(torch.equal(prefixed[k], timm_state[k]) for k in timm_state)
    # pooled outputs use the weights the patch features never touch (post norm, SigLIP's head)
    pixel_values = _pixels(seed=3)
    with torch.no_grad():
        pooled_hf = hf.vision(pixel_values=pixel_values).pooler_output
        pooled_timm = tm.vision.forward_head(tm.vision.forward_features(pixel_values))
    assert pooled_hf.shape == pooled_timm.shape == (2, 32)
    assert (pooled_hf - pooled_timm).abs().max().item() <= 1e-5


def test_siglip_with_timm_default_exact_gelu_is_close_but_not_equal() -> None:
    """timm's SigLIP uses exact GELU where SigLIP (big_vision, transformers) uses the tanh
    approximation, so without `act_layer=gelu_tanh` the towers cannot agree exactly: the
    embeddings (no activation yet) are identical, later layers drift by about 1e-3."""
    hf = _tiny("siglip", "transformers", select_layer=-1)
    _perturb(hf.vision, seed=2)
    exact_gelu = build_encoder(
        backend="timm",
        family="siglip",
        transform=HALF,
        timm_name=TIMM_TINY_NAME["siglip"],
        timm_kwargs=TIMM_ARCH,  # no act_layer: timm's default nn.GELU
        select_layer=-1,
    ).eval()
    assert type(exact_gelu.vision.blocks[0].mlp.act).__name__ == "GELU"
    exact_gelu.vision.load_state_dict(hf_to_timm_state_dict("siglip", hf.vision.state_dict()))
    pixel_values = _pixels(seed=4)
    vit = exact_gelu.vision
    with torch.no_grad():
        a, b = hf(pixel_values), exact_gelu(pixel_values)
        embeddings = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixel_values)))
        embeddings_equal = torch.equal(embeddings, hf.vision.embeddings(pixel_values))
    assert a.shape == b.shape == (2, 16, 32)
    assert embeddings_equal
    diff = (a - b).abs().max().item()
    assert 1e-6 < diff < 1e-2, diff
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() > 0.9999
    # and our timm config for SigLIP (act_layer=gelu_tanh) would refuse to disagree silently:
    with pytest.raises(ConfigError, match=r"hidden_act: timm 'gelu'") as info:
        build_encoder(
            backend="timm",
            family="siglip",
            transform=HALF,
            config=ARCH,
            timm_name=TIMM_TINY_NAME["siglip"],
            timm_kwargs=TIMM_ARCH,
        )
    assert info.value.key == "encoder.timm_name"


@pytest.mark.parametrize("select_layer", [0, 1, 2, 3, -1, -2, -4])
def test_timm_select_layer_runs_only_the_blocks_it_needs(select_layer: int) -> None:
    encoder = _tiny("clip", "timm", select_layer=select_layer, select_feature="cls_patch")
    vit = encoder.vision
    calls: list[int] = []
    hooks = [
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, block in enumerate(vit.blocks)
    ]
    pixel_values = _pixels(seed=5)
    with torch.no_grad():
        features = encoder(pixel_values)
    for hook in hooks:
        hook.remove()
    index = select_layer % 4
    assert calls == list(range(index))
    with torch.no_grad():
        if index == 0:  # hidden state 0: embeddings after CLIP's pre-norm
            ref = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixel_values)))
        else:
            spatial, prefix = vit.forward_intermediates(
                pixel_values,
                indices=[index - 1],
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )[0]
            ref = torch.cat([prefix, spatial], dim=1)
    torch.testing.assert_close(features, ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("layout", ["vision_model", "full_model"])
def test_pretrained_loads_from_a_local_folder_in_both_backends(
    compose_cfg, tmp_path: Path, family: str, layout: str
) -> None:
    """save_pretrained -> our encoder with pretrained=true (HF_HUB_OFFLINE=1): the transformers
    backend via name_or_path, the timm backend via timm_checkpoint (mapped weights). The
    `full_model` layout is what the hub holds for openai/clip-* and google/siglip-*."""
    import transformers

    prefix = "CLIP" if family == "clip" else "Siglip"
    vision_cfg = getattr(transformers, f"{prefix}VisionConfig")(**ARCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        if layout == "vision_model":
            saved = getattr(transformers, f"{prefix}VisionModel")(vision_cfg)
            tower = saved
        else:
            text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
            text |= {"num_attention_heads": 2, "vocab_size": 99, "max_position_embeddings": 16}
            full_cfg = getattr(transformers, f"{prefix}Config")(
                text_config=text, vision_config=vision_cfg.to_dict()
            )
            saved = getattr(transformers, f"{prefix}Model")(full_cfg)
            tower = saved.vision_model
    _perturb(saved, seed=6)
    saved.save_pretrained(tmp_path / "model")
    preset = "clip336" if family == "clip" else "siglip"
    cfg = compose_cfg(
        f"encoder={preset}",
        f"encoder.name_or_path={tmp_path / 'model'}",
        f"encoder.timm_checkpoint={tmp_path / 'model'}",
        "encoder.select_layer=-1",
        *[f"encoder.config.{k}={v}" for k, v in ARCH.items()],
        *[f"++encoder.timm_kwargs.{k}={v}" for k, v in TIMM_ARCH.items()],
    )
    assert cfg.encoder.pretrained is True
    pixel_values = _pixels(seed=8)
    tower.eval()
    with torch.no_grad():
        ref = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    ref = ref[:, 1:] if family == "clip" else ref
    for backend in BACKENDS:
        encoder = instantiate(cfg.encoder, backend=backend, _convert_="all").eval()
        assert next(encoder.parameters()).dtype == torch.float32
        with torch.no_grad():
            features = encoder(pixel_values)
        assert features.shape == ref.shape == (2, 16, 32)
        assert (features - ref).abs().max().item() <= 1e-5, backend


def test_timm_loads_its_own_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = _tiny("siglip", "timm", init_seed=3)
    _perturb(source.vision, seed=9)
    save_file(source.vision.state_dict(), str(tmp_path / "tower.safetensors"))
    loaded = _tiny(
        "siglip",
        "timm",
        pretrained=True,
        timm_checkpoint=str(tmp_path / "tower.safetensors"),
        init_seed=4,
    )
    pixel_values = _pixels(seed=10)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values), source(pixel_values))
    fresh = _tiny("siglip", "timm", init_seed=4)
    with torch.no_grad():
        assert not torch.allclose(fresh(pixel_values), source(pixel_values))


def test_dtype_is_what_the_config_says(tmp_path: Path) -> None:
    """transformers 5 would keep a float16 checkpoint in float16; `encoder.dtype` decides."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**ARCH)).half().save_pretrained(tmp_path)
    encoder = _tiny("clip", "transformers", pretrained=True, name_or_path=str(tmp_path))
    assert encoder.vision.dtype == torch.float32
    half = _tiny("clip", "timm", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half(_pixels()).dtype == torch.bfloat16  # float32 pixels are cast, not rejected


def test_timm_backend_in_a_full_vlm(compose_cfg) -> None:
    from vlmlab.models import build_vlm

    cfg = compose_cfg("encoder=tiny_siglip", "encoder.backend=timm")
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert type(model.encoder) is TimmVisionEncoder
    image = Image.new("RGB", (90, 40), (0, 120, 255))
    pixel_values = model.encoder.image_transform(image)[None]
    embeds = model.encode_images(pixel_values)
    assert embeds.shape == (1, model.num_image_tokens, model.llm.config.hidden_size)
    assert model.num_image_tokens == 16  # SigLIP: every patch, no CLS


# ----------------------------------------------------------------------------- errors


def _expect_key(key: str, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_encoder(**kwargs)
    assert info.value.key == key, info.value
    return info.value


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_family_and_select_layer_name_their_key(backend: str) -> None:
    base = {"backend": backend, "transform": HALF, "config": ARCH}
    if backend == "timm":
        base |= {"timm_name": TIMM_TINY_NAME["clip"], "timm_kwargs": TIMM_ARCH}
    _expect_key("encoder.family", family="dino", **base)
    for bad in (4, -5, 100):
        error = _expect_key("encoder.select_layer", family="clip", select_layer=bad, **base)
        assert str(bad) in str(error) and "[-4, 3]" in str(error)
    for good in (3, -4):
        assert build_encoder(family="clip", select_layer=good, **base).num_tokens == 16
    _expect_key("encoder.select_feature", family="clip", select_feature="cls", **base)
    _expect_key("encoder.dtype", family="clip", dtype="fp8", **base)


def test_bad_backend_and_timm_names_name_their_key() -> None:
    args = {"family": "clip", "transform": HALF, "config": ARCH}
    _expect_key("encoder.backend", backend="onnx", **args)
    timm = {**args, "backend": "timm", "timm_kwargs": TIMM_ARCH}
    error = _expect_key(
        "encoder.timm_name", timm_name="vit_large_patch14_clip_quickgelu_337", **timm
    )
    assert "vit_large_patch14_clip_quickgelu_336" in str(error)  # a suggestion
    error = _expect_key(
        "encoder.timm_name", timm_name="vit_base_patch16_clip_quickgelu_224.nope", **timm
    )
    assert "openai" in str(error)  # the tags that exist
    # a CLIP tower needs QuickGELU and a CLS token: the GELU model and a SigLIP model are refused
    error = _expect_key("encoder.timm_name", timm_name="vit_base_patch16_clip_224", **timm)
    assert "hidden_act: timm 'gelu' vs encoder.config 'quick_gelu'" in str(error)
    _expect_key("encoder.timm_name", timm_name=TIMM_TINY_NAME["siglip"], **timm)
    # architecture numbers that disagree with encoder.config
    error = _expect_key(
        "encoder.timm_name",
        timm_name=TIMM_TINY_NAME["clip"],
        **{**timm, "config": {**ARCH, "num_hidden_layers": 4}},
    )
    assert "num_hidden_layers: timm 3 vs encoder.config 4" in str(error)
    _expect_key(
        "encoder.timm_checkpoint",
        timm_name=TIMM_TINY_NAME["clip"],
        pretrained=True,
        timm_checkpoint="/nonexistent/weights.safetensors",
        **timm,
    )


def test_config_errors_reach_the_user_through_hydra(compose_cfg) -> None:
    """Through `instantiate` (what build_vlm does) the message still names the key."""
    for overrides, key in (
        (["encoder.backend=onnx"], "encoder.backend"),
        (["encoder.backend=timm", "encoder.timm_name=vit_nonexistent"], "encoder.timm_name"),
        (["encoder.family=dino"], "encoder.family"),
    ):
        cfg = compose_cfg(*overrides)
        with pytest.raises(Exception, match=key.replace(".", r"\.")):
            instantiate(cfg.encoder, _convert_="all")


# ----------------------------------------------------------------------------- image transform


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Verbatim from LLaVA (llava/mm_utils.py), the reference for `aspect: pad`."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _processor(family: str, size: int, variant: str) -> Any:
    """The processor of the real checkpoint, built offline from its preprocessor_config numbers
    (mean/std from transformers' constants, not from our YAML)."""
    import transformers
    from transformers.image_utils import (
        IMAGENET_STANDARD_MEAN,
        IMAGENET_STANDARD_STD,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        PILImageResampling,
    )

    suffix = "Pil" if variant == "pil" else ""
    if family == "clip":
        processor = getattr(transformers, f"CLIPImageProcessor{suffix}")(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            resample=PILImageResampling.BICUBIC,
        )
    else:
        processor = getattr(transformers, f"SiglipImageProcessor{suffix}")(
            size={"height": size, "width": size},
            image_mean=IMAGENET_STANDARD_MEAN,
            image_std=IMAGENET_STANDARD_STD,
            resample=PILImageResampling.BICUBIC,
        )
    backend = "PilBackend" if variant == "pil" else "TorchvisionBackend"
    assert backend in [c.__name__ for c in type(processor).__mro__]
    return processor


@functools.cache
def _encoder_transform(preset: str) -> tuple[int, Any]:
    """(image size, image transform) of the encoder a preset builds (on meta: no weights)."""
    with torch.device("meta"):
        encoder = instantiate(_preset(preset), pretrained=False, _convert_="all")
    return encoder.image_size, encoder.image_transform


@pytest.mark.parametrize("variant", ["pil", "fast"])
@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("preset", PRESETS)
def test_image_transform_matches_transformers_processor(
    preset: str, aspect: str, variant: str
) -> None:
    size, preset_transform = _encoder_transform(preset)
    assert preset_transform.aspect == "pad"  # every preset pads, like LLaVA-1.5
    transform = dataclasses.replace(preset_transform, aspect=aspect)
    processor = _processor(FAMILY[preset], size, variant)
    fill = tuple(int(x * 255) for x in processor.image_mean)
    rng = np.random.default_rng(0)
    worst, mean_diff = 0.0, []
    for width, height in IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        reference_input = expand2square(image, fill) if aspect == "pad" else image
        ref = processor(reference_input, return_tensors="pt")["pixel_values"][0]
        ours = transform(image)
        assert ours.dtype == torch.float32
        assert ours.shape == ref.shape == (3, size, size)
        diff = (ours - ref.float()).abs()
        worst = max(worst, diff.max().item())
        mean_diff.append(diff.mean().item())
    if variant == "pil":
        assert worst <= 1e-5, worst
    else:  # torchvision resampling: close, not equal (see the module docstring)
        assert worst <= 0.2 and max(mean_diff) <= 0.005, (worst, max(mean_diff))


def test_preset_transforms_carry_the_processor_numbers() -> None:
    for preset in PRESETS:
        transform = OmegaConf.to_container(_preset(preset).transform)
        assert isinstance(transform, dict)
        clip = FAMILY[preset] == "clip"
        assert transform["resize"] == ("shortest_edge" if clip else "exact"), preset
        assert transform["aspect"] == "pad" and transform["resample"] == "bicubic", preset
        assert transform["mean"] == ([0.48145466, 0.4578275, 0.40821073] if clip else [0.5] * 3)
