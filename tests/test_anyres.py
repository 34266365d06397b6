"""AnyRes differential tests: our tiles, grids, token counts and merged feature sequences
against both references, transformers' LlavaNext (the default mode, what HF export and eval
must match) and llava-torch's LLaVA-NeXT code (the `llava` mode), on real objects offline."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.models.anyres import (
    LLAVA_NEXT_PINPOINTS,
    AnyResImages,
    AnyResMode,
    AnyResTokens,
    UnusableImageError,
    pack_tile_features,
    parse_grid_pinpoints,
    prepare_image,
)
from vlmlab.visual import ImageTokenCounter

# conf/encoder/clip336.yaml's transform: CLIP-L/14 at 336 px -> 24 x 24 features per tile.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TILE, SIDE = 336, 24

# (width, height): tiny, square, landscape and portrait up to 4:1 and 1:4, odd sizes, and the
# sizes where the two references pick different grids (squares, tiny, exact ties).
SIZES = [
    (13, 17), (17, 13), (64, 48), (48, 64), (100, 100), (336, 336), (672, 672), (1008, 1008),
    (640, 480), (480, 640), (800, 600), (1024, 768), (768, 1024), (1000, 333), (333, 1000),
    (1344, 336), (336, 1344), (1200, 300), (300, 1200), (672, 336), (336, 672), (500, 1000),
    (1001, 499), (337, 335), (2000, 1500), (450, 1600),
    # float error in the unpad scale (23.999999999999996): transformers rounds, llava truncates
    (47, 188), (176, 55), (188, 188), (307, 307),
]  # fmt: skip


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + size[0] * 7919 + size[1])
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _counter(mode: AnyResMode = "transformers", **kw: Any) -> AnyResTokens:
    return AnyResTokens(LLAVA_NEXT_PINPOINTS, TILE, SIDE, mode=mode, **kw)


def _images(mode: AnyResMode = "transformers") -> AnyResImages:
    return AnyResImages(LLAVA_NEXT_PINPOINTS, TILE, MEAN, STD, mode=mode)


# --------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def hf_processor() -> Any:
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
        image_mean=list(MEAN),
        image_std=list(STD),
    )


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """A tiny random-init LlavaNextForConditionalGeneration with CLIP-L/14-336's geometry."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration as Model

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=TILE, patch_size=14, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=[list(p) for p in LLAVA_NEXT_PINPOINTS],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_token_index=127,
    )
    return Model(cfg).eval()


@pytest.fixture(scope="module")
def llava_ref() -> Any:
    """llava-torch's mm_utils and llava_arch (import needs the transformers-5 shim, ENV.md)."""
    import transformers

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        transformers.trainer.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]  # type: ignore[attr-defined]
    from llava import mm_utils
    from llava.model import llava_arch

    return mm_utils, llava_arch


# --------------------------------------------------------------------------- pixels


def test_tiles_equal_transformers_processor_pixel_for_pixel(hf_processor: Any) -> None:
    ours, counter = _images(), _counter()
    for size in SIZES:
        image = _image(size)
        ref = hf_processor(image, return_tensors="pt")
        assert tuple(ref["image_sizes"][0].tolist()) == (size[1], size[0])  # HF: (H, W)
        got = ours(image)
        rows, cols = counter(size).grid or (1, 1)
        assert got.shape == (1 + rows * cols, 3, TILE, TILE), size
        assert torch.equal(got, ref["pixel_values"][0]), size


def test_grid_and_token_counts_equal_transformers_model(hf_processor: Any, hf_model: Any) -> None:
    """Token counts against what LlavaNext's get_image_features really packs (tiny random
    CLIP + projector, pixel values from its own processor, a batch of mixed shapes)."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    counter = _counter()
    pins = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    for size in SIZES:
        hw = (size[1], size[0])
        assert counter(size).grid == get_anyres_image_grid_shape(hw, pins, TILE), size
        rows, cols = counter(size).grid or (1, 1)
        assert 1 + rows * cols == image_size_to_num_patches(hw, pins, TILE), size
    for start in range(0, len(SIZES), 9):
        sizes = SIZES[start : start + 9]
        batch = hf_processor([_image(s) for s in sizes], return_tensors="pt")
        with torch.no_grad():
            out = hf_model.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            )
        assert [f.shape[0] for f in out.pooler_output] == [counter(s).count for s in sizes]


def test_672_square_gives_2928_tokens(hf_processor: Any, hf_model: Any) -> None:
    tokens = _counter()((672, 672))
    assert (tokens.count, tokens.grid) == (576 + 2304 + 48, (2, 2))
    batch = hf_processor(_image((672, 672)), return_tensors="pt")
    with torch.no_grad():
        out = hf_model.model.get_image_features(**batch)
    assert out.pooler_output[0].shape[0] == 2928


def test_max_count_bounds_every_image_and_is_reached() -> None:
    counter = _counter()
    assert isinstance(counter, ImageTokenCounter) and counter.fixed_count is None
    assert pickle.loads(pickle.dumps(counter)) == counter  # travels into DataLoader workers
    counts = [counter(s).count for s in SIZES]
    assert counter.max_count == 2928 == max(counts)
    assert _counter("llava").max_count == 2928
    pooled = _counter(
        pool_budget_tiles=2
    )  # pooling is not monotone in the size: a sweep, not a max
    sweep = [(w, h) for w in range(300, 1400, 37) for h in range(300, 1400, 53)]
    assert max(pooled(s).count for s in sweep) <= pooled.max_count < counter.max_count


def test_llava_mode_equals_llava_torch(llava_ref: Any) -> None:
    from transformers import CLIPImageProcessorPil

    mm_utils, _ = llava_ref
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    ours, counter = _images("llava"), _counter("llava")
    pins = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    for size in SIZES:
        image = _image(size)
        ref = mm_utils.process_anyres_image(image, processor, pins)
        assert torch.equal(ours(image), ref), size
        w_tiles, h_tiles = mm_utils.get_anyres_image_grid_shape(size, pins, TILE)
        assert counter(size).grid == (h_tiles, w_tiles), size


def test_modes_disagree_where_the_issue_says() -> None:
    """The references read pinpoints transposed: ties (squares, tiny images) flip the grid."""
    hf, llava = _counter(), _counter("llava")
    for size in [(336, 336), (64, 48), (13, 17)]:
        assert hf(size).grid != llava(size).grid, size
    assert hf((336, 336)).grid == (1, 2) and llava((336, 336)).grid == (2, 1)
    assert hf((1000, 333)).grid == llava((1000, 333)).grid == (1, 3)


# --------------------------------------------------------------------------- features


def _random_tiles(
    counter: AnyResTokens, size: tuple[int, int], dim: int, seed: int
) -> torch.Tensor:
    rows, cols = counter(size).grid or (1, 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 + rows * cols, SIDE * SIDE, dim, generator=g)


def test_merge_equals_transformers_pack_image_features(hf_model: Any) -> None:
    counter, dim = _counter(), hf_model.config.text_config.hidden_size
    newline = hf_model.model.image_newline.detach()
    feats = [_random_tiles(counter, s, dim, i) for i, s in enumerate(SIZES)]
    sizes_hw = torch.tensor([[h, w] for w, h in SIZES])
    with torch.no_grad():
        ref, lens = hf_model.model.pack_image_features(feats, sizes_hw, "default", newline)
    for f, size, r, n in zip(feats, SIZES, ref, lens.tolist(), strict=True):
        got = pack_tile_features(f, size, counter, newline)
        assert got.shape[0] == n == counter(size).count, size
        assert torch.equal(got, r), size


def _llava_merge(llava_arch: Any, feature: torch.Tensor, size: Any, pins: Any, nl: Any) -> Any:
    """llava/model/llava_arch.py lines 166-186 (`spatial_unpad` + `anyres` branch of
    prepare_inputs_labels_for_multimodal), transcribed because calling it needs a whole model;
    its helpers `get_anyres_image_grid_shape` and `unpad_image` are the real ones."""
    base_image_feature = feature[0]
    image_feature = feature[1:]
    height = width = SIDE
    assert height * width == base_image_feature.shape[0]
    num_patch_width, num_patch_height = llava_arch.get_anyres_image_grid_shape(size, pins, TILE)
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = llava_arch.unpad_image(image_feature, size)
    image_feature = torch.cat(
        (image_feature, nl[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1
    )
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((base_image_feature, image_feature), dim=0)


def test_merge_equals_llava_torch_spatial_unpad(llava_ref: Any) -> None:
    _, llava_arch = llava_ref
    counter, dim = _counter("llava"), 8
    newline = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    pins = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    # float error where llava's truncation cuts a different padding than rounding would
    llava_edges = [(55, 176), (176, 110), (352, 836), (1000, 1001), (997, 333), (300, 1201)]
    for i, size in enumerate([*SIZES, *llava_edges]):
        f = _random_tiles(counter, size, dim, i)
        got = pack_tile_features(f, size, counter, newline)
        assert got.shape[0] == counter(size).count, size
        assert torch.equal(got, _llava_merge(llava_arch, f, size, pins, newline)), size


def test_anyres_max_pooling_equals_transformers_onevision() -> None:
    """`pool_budget_tiles=N` is LLaVA-OneVision's anyres_max_N: against LlavaOnevisionModel's
    pack_image_features (tiny random config) with (1x1)..(4x4) pinpoints, budget 4 tiles."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionModel,
    )

    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=TILE, patch_size=14,
    )  # fmt: skip
    text = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=64)  # fmt: skip
    pins = parse_grid_pinpoints("(1x1),...,(4x4)", TILE)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=[list(p) for p in pins]
    )
    model = LlavaOnevisionModel(cfg).eval()
    counter = AnyResTokens(pins, TILE, SIDE, pool_budget_tiles=4)
    newline = model.image_newline.detach()
    sizes = [(1344, 1344), (1300, 700), (336, 1344), (640, 480), (300, 300), (2000, 900)]
    sizes += [(339, 706), (339, 1141)]  # 1.0 < ratio <= 1.1: over the budget but not pooled
    feats = [_random_tiles(counter, s, 8, i) for i, s in enumerate(sizes)]
    with torch.no_grad():
        ref, lens = model.pack_image_features(
            feats, torch.tensor([[h, w] for w, h in sizes]), newline, "anyres_max_4"
        )
    pooled = 0
    for f, size, r, n in zip(feats, sizes, ref, lens.tolist(), strict=True):
        got = pack_tile_features(f, size, counter, newline)
        assert got.shape[0] == n == counter(size).count, size
        torch.testing.assert_close(got, r, rtol=0, atol=0)
        pooled += n < AnyResTokens(pins, TILE, SIDE)(size).count
    assert pooled >= 2  # the budget did shrink some images


def test_range_form_equals_onevision_pinpoints() -> None:
    from transformers import LlavaOnevisionConfig

    ref = [
        tuple(p) for p in LlavaOnevisionConfig().image_grid_pinpoints or []
    ]  # (1x1)..(6x6) @ 384
    assert list(parse_grid_pinpoints("(1x1),...,(6x6)", 384)) == ref
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 336) == (
        (336, 336), (336, 672), (672, 336), (672, 672),
    )  # fmt: skip
    assert parse_grid_pinpoints([[336, 672], [672, 336]], 336) == ((336, 672), (672, 336))
    six = parse_grid_pinpoints("(1x1),...,(6x6)", 336, max_tiles=9)
    assert (1008, 1008) in six and (672, 1680) not in six and len(six) == 17
    assert max((a // 336) * (b // 336) for a, b in six) == 9
    with pytest.raises(ValueError, match=r"encoder\.anyres\.max_tiles"):
        parse_grid_pinpoints("(2x2),...,(3x3)", 336, max_tiles=3)
    for bad in ["3x3", [[336, 500]], [], [[336]]]:
        with pytest.raises(ValueError, match=r"encoder\.anyres\.grid_pinpoints"):
            parse_grid_pinpoints(bad, 336)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bad input


def test_image_smaller_than_one_patch_is_refused() -> None:
    counter = _counter()
    assert counter((13, 17)).count > 576  # tiny but more pixels than one 14x14 patch: tiled
    for size in [(10, 10), (1, 1), (13, 14)]:
        with pytest.raises(UnusableImageError, match="one encoder patch"):
            counter(size)


def test_panorama_100_to_1_is_refused_not_emptied() -> None:
    counter = _counter()
    for size in [(3360, 34), (34, 3360), (10000, 100)]:
        with pytest.raises(UnusableImageError, match="too elongated"):
            counter(size)
    assert counter((1500, 100)).count > 576  # 15:1 still leaves rows: tiled
    with pytest.raises(UnusableImageError):
        pack_tile_features(torch.zeros(4, SIDE * SIDE, 8), (3360, 34), counter, torch.zeros(8))


def test_cmyk_16bit_and_exif_rotated_images() -> None:
    ours, counter = _images(), _counter()
    rgb = _image((640, 480))
    cmyk = rgb.convert("CMYK")
    assert torch.equal(ours(prepare_image(cmyk)), ours(cmyk.convert("RGB")))

    levels = np.array([[0, 255, 256, 32768, 65535] * 20] * 50, dtype=np.uint16)
    sixteen = Image.fromarray(levels)  # mode I;16
    assert sixteen.mode == "I;16"
    eight = prepare_image(sixteen)
    assert eight.mode == "L" and np.asarray(eight)[0, :5].tolist() == [0, 0, 1, 128, 255]
    rows, cols = counter(eight.size).grid or (1, 1)
    assert ours(eight).shape[0] == 1 + rows * cols

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _image((1000, 333)).save(buf, format="JPEG", exif=exif)
    buf.seek(0)
    rotated = Image.open(buf)
    assert rotated.size == (1000, 333)
    upright = prepare_image(rotated)  # tiled and counted as displayed
    assert upright.size == (333, 1000)
    assert counter(upright.size).grid == (3, 1) and counter(rotated.size).grid == (1, 3)


def test_rgba_follows_each_reference(hf_processor: Any) -> None:
    """transformers composites transparency on white, LLaVA's loader drops alpha."""
    rgba = _image((400, 300)).convert("RGBA")
    alpha = np.zeros((300, 400), dtype=np.uint8)
    alpha[:, :200] = 255
    rgba.putalpha(Image.fromarray(alpha))
    ref = hf_processor(rgba, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(_images()(rgba), ref)
    assert not torch.equal(_images("llava")(rgba)[0], ref[0])


def test_mode_and_counter_validation() -> None:
    with pytest.raises(ValueError, match=r"encoder\.anyres\.mode"):
        AnyResTokens(LLAVA_NEXT_PINPOINTS, TILE, SIDE, mode="hf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image size"):
        _counter()()
    with pytest.raises(ValueError, match="expects 5 tiles"):
        pack_tile_features(torch.zeros(3, SIDE * SIDE, 8), (672, 672), _counter(), torch.zeros(8))
