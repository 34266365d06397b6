"""Connectors: every option of the `connector` config group builds with the tiny encoder and LLM,
keeps the shape/token-count contract, trains end to end inside the VLM, and has the size its
class's `expected_num_parameters` states (its parameter formula).

The options are the group's YAML files as Hydra lists them (`connector_options`), so a new
connector is one .py plus one YAML, here or in a config dir on `hydra.searchpath`
(tests/test_registry.py adds one from a temp folder and runs these tests on it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from tests.helpers import group_options, searchpath_override
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models import build_vlm
from vlmlab.models.connectors.mlp import MLPConnector
from vlmlab.models.connectors.resampler import ResamplerConnector, sincos_2d
from vlmlab.text import IGNORE_INDEX
from vlmlab.text.templates import get_template

REPO = Path(__file__).resolve().parents[1]


def connector_options(*config_dirs: Path) -> list[str]:
    """The `connector` group's options as Hydra lists them (conf/ plus the extra config dirs)."""
    return group_options("connector", *config_dirs)


class SearchPathCompose:
    """compose_cfg with extra config dirs on Hydra's search path (a drop-in for the fixture)."""

    def __init__(self, compose_cfg: Callable[..., DictConfig], *config_dirs: Path) -> None:
        self.compose_cfg = compose_cfg
        self.override = searchpath_override(*config_dirs)

    def __call__(self, *overrides: str) -> DictConfig:
        return self.compose_cfg(self.override, *overrides)


OPTIONS = connector_options()
# Options too big to train on 2 CPU cores at their shipped size (the BERT-base Q-Former is
# 100M parameters): the same code and YAML, with small widths. Their shipped size is checked on
# the meta device in test_parameter_counts_match_formulas_and_docs.
SMALL = {
    "qformer": (
        "connector.hidden_size=64",
        "connector.num_heads=4",
        "connector.intermediate_size=128",
        "connector.depth=2",
    )
}


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def _compose(compose_cfg: Any, *overrides: str) -> DictConfig:
    """Compose once per override list (composition costs more than building the tiny VLM)."""
    key = (getattr(compose_cfg, "override", ""), *overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_cfg(*overrides)
    return _COMPOSED[key]


def _build(compose_cfg: Any, option: str, *overrides: str) -> tuple[Any, Any]:
    cfg = _compose(compose_cfg, f"connector={option}", *SMALL.get(option, ()), *overrides)
    return build_vlm(cfg.encoder, cfg.connector, cfg.llm)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _features(model: Any, batch: int, num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, model.encoder.hidden_size, generator=gen)


def _knobs(cfg: DictConfig) -> dict[str, Any]:
    """The connector node as constructor arguments (init_seed is build_vlm's, not the class's)."""
    node = OmegaConf.to_container(cfg.connector, resolve=True)
    assert isinstance(node, dict)
    return {str(k): v for k, v in node.items() if k != "init_seed"}


def _formula(cfg: DictConfig, in_features: int, out_features: int) -> int:
    """The size the YAML's class states for its knobs (`expected_num_parameters`)."""
    knobs = _knobs(cfg)
    cls: Any = get_class(str(knobs.pop("_target_")))
    return int(cls.expected_num_parameters(in_features, out_features, **knobs))


def test_the_shipped_options_are_listed() -> None:
    assert {"linear", "mlp", "resampler", "qformer", "tiny"} <= set(OPTIONS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_names_a_connector_with_a_size_formula(compose_cfg, option: str) -> None:
    """`_target_` is a class with num_tokens and its parameter formula as a classmethod."""
    cls = get_class(str(_compose(compose_cfg, f"connector={option}").connector._target_))
    assert callable(getattr(cls, "num_tokens", None)), f"{cls.__name__} has no num_tokens"
    formula = getattr(cls, "expected_num_parameters", None)
    assert callable(formula), f"{cls.__name__} needs a classmethod expected_num_parameters"


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("option", OPTIONS)
def test_shape_tokens_and_gradients(compose_cfg, option: str) -> None:
    model, _ = _build(compose_cfg, option)
    connector: Any = model.connector
    target = _compose(compose_cfg, f"connector={option}").connector._target_
    assert type(model.connector) is get_class(str(target))
    llm_width = model.llm.get_input_embeddings().embedding_dim
    n = model.encoder.num_tokens  # 16 patches (4 x 4) of the tiny encoder
    m = connector.num_tokens(n)
    assert model.num_image_tokens == m
    if hasattr(connector, "num_queries"):  # query connectors: a fixed number of tokens
        assert m == connector.num_queries != n
        assert m == _compose(compose_cfg, f"connector={option}").connector.num_queries
        assert all(connector.num_tokens(k) == m for k in (1, 4, 9, 576))  # N = g*g of any size
    else:
        assert all(connector.num_tokens(k) == k for k in (1, 7, 577))
    features = _features(model, 3, n).requires_grad_()
    out = connector(features)
    assert out.shape == (3, m, llm_width)
    assert torch.isfinite(out).all()
    # another patch count: the output follows num_tokens (9 = a 3 x 3 grid)
    assert connector(_features(model, 2, 9)).shape == (2, connector.num_tokens(9), llm_width)
    out.pow(2).mean().backward()
    for name, param in connector.named_parameters():
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) > 0, name
    assert features.grad is not None and torch.count_nonzero(features.grad) > 0


def _batch(model: Any, tokenizer: Any, has_image: list[bool]) -> dict[str, Any]:
    """A real collated batch: vicuna_v1 conversations, images through the encoder's transform."""
    encoder = TextEncoder(
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.num_image_tokens,
        model.image_token_id,
        max_length=512,
    )
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0)]
    samples: list[dict[str, Any]] = []
    for i, with_image in enumerate(has_image):
        question = "What colour is the shape?"
        conv = [
            {"from": "human", "value": f"<image>\n{question}" if with_image else question},
            {"from": "gpt", "value": ["Red", "Blue", "Green"][i % 3]},
        ]
        image = Image.new("RGB", (80, 48), colours[i % 3])
        pixel_values = model.encoder.image_transform(image) if with_image else None
        samples.append(
            {"id": str(i), "pixel_values": pixel_values, **encoder.encode(conv, with_image)}
        )
    # right padding, as the data module's collate does (not imported: it pulls in Lightning)
    ids = [s["input_ids"] for s in samples]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id),
        "labels": pad_sequence(
            [s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX
        ),
        "attention_mask": pad_sequence(
            [torch.ones_like(i) for i in ids], batch_first=True, padding_value=0
        ),
        "pixel_values": torch.stack(
            [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        ),
    }


@pytest.mark.parametrize("option", OPTIONS)
def test_vlm_forward_gives_finite_loss(compose_cfg, option: str) -> None:
    model, tokenizer = _build(compose_cfg, option)
    batch = _batch(model, tokenizer, [True, False, True])
    m = model.num_image_tokens
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2 * m
    assert (batch["labels"][batch["input_ids"] == model.image_token_id] == IGNORE_INDEX).all()
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    )
    vocab = model.llm.get_input_embeddings().num_embeddings
    assert out.logits is None  # with labels the (B, T, V) logits are never built
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert logits.shape == (*batch["input_ids"].shape, vocab)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert 0.5 * math.log(vocab) < out.loss.item() < 2.0 * math.log(vocab)
    out.loss.backward()
    for name, param in model.connector.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name


# ----------------------------------------------------------------------------- query connectors


@pytest.mark.parametrize("option", ["resampler", "qformer"])
def test_output_depends_on_the_input_row_by_row(compose_cfg, option: str) -> None:
    model, _ = _build(compose_cfg, option)
    connector = model.connector.eval()
    n = model.encoder.num_tokens
    a, b = _features(model, 2, n, seed=1), _features(model, 2, n, seed=2)
    with torch.no_grad():
        out_a, out_b = connector(a), connector(b)
        mixed = connector(torch.stack([a[0], b[1]]))
    assert not torch.allclose(out_a, out_b, atol=1e-3)  # not a constant of the queries
    assert not torch.allclose(out_a[0], out_a[1], atol=1e-3)
    torch.testing.assert_close(mixed[0], out_a[0], atol=1e-5, rtol=1e-5)  # rows independent
    torch.testing.assert_close(mixed[1], out_b[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("option", "overrides", "order_matters"),
    [
        ("resampler", ("connector.pos_embed=none",), False),
        ("resampler", ("connector.pos_embed=sincos2d",), True),
        ("resampler", ("connector.pos_embed=sincos2d", "connector.depth=2"), True),
        ("qformer", (), False),
    ],
    ids=["resampler-none", "resampler-sincos2d", "resampler-sincos2d-depth2", "qformer"],
)
def test_patch_order_matters_only_through_the_position_encoding(
    compose_cfg, option: str, overrides: tuple[str, ...], order_matters: bool
) -> None:
    model, _ = _build(compose_cfg, option, *overrides)
    connector = model.connector.eval()
    n = model.encoder.num_tokens
    features = _features(model, 2, n, seed=3)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(permutation, torch.arange(n))
    with torch.no_grad():
        out = connector(features)
        permuted = connector(features[:, permutation])
    if order_matters:
        assert not torch.allclose(out, permuted, atol=1e-3)
    else:
        torch.testing.assert_close(permuted, out, atol=1e-5, rtol=1e-4)


def test_sincos_2d_encodes_row_and_column() -> None:
    dim, grid = 16, 3
    pos = sincos_2d(dim, grid)
    assert pos.shape == (grid * grid, dim)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    for index in range(grid * grid):
        row, col = divmod(index, grid)  # row-major, like ViT patches
        expected = torch.cat(
            [(row * omega).sin(), (row * omega).cos(), (col * omega).sin(), (col * omega).cos()]
        )
        torch.testing.assert_close(pos[index], expected)
    assert len({tuple(r.tolist()) for r in pos}) == grid * grid  # every patch is distinguishable


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("n", [17, 577, 2, 0])
def test_resampler_sincos_needs_a_square_grid(n: int) -> None:
    connector = ResamplerConnector(8, 8, num_queries=3, num_heads=2, pos_embed="sincos2d")
    with pytest.raises(ConfigError, match=r"connector\.pos_embed.*square") as info:
        connector.num_tokens(n)
    assert info.value.key == "connector.pos_embed"
    assert f"N={n}" in str(info.value)
    if n:
        with pytest.raises(ConfigError, match=r"connector\.pos_embed"):
            connector(torch.zeros(1, n, 8))
        # without a position encoding any N works
        free = ResamplerConnector(8, 8, num_queries=3, num_heads=2, pos_embed="none")
        assert free.num_tokens(n) == 3
        assert free(torch.zeros(1, n, 8)).shape == (1, 3, 8)


def test_resampler_with_cls_token_fails_early_naming_the_key(compose_cfg) -> None:
    model, _ = _build(compose_cfg, "resampler", "encoder.select_feature=cls_patch")
    assert model.encoder.num_tokens == 17  # 4 x 4 patches + CLS
    with pytest.raises(ConfigError, match=r"connector\.pos_embed.*select_feature=patch"):
        _ = model.num_image_tokens
    ok, _ = _build(
        compose_cfg, "resampler", "encoder.select_feature=cls_patch", "connector.pos_embed=none"
    )
    assert ok.num_image_tokens == ok.connector.num_queries


@pytest.mark.parametrize(
    ("option", "knobs", "key"),
    [
        ("resampler", {"pos_embed": "learned"}, "connector.pos_embed"),
        ("resampler", {"num_heads": 3}, "connector.num_heads"),
        ("resampler", {"num_queries": 0}, "connector.num_queries"),
        ("resampler", {"depth": 0}, "connector.depth"),
        ("resampler", {"hidden_size": 66, "num_heads": 2}, "connector.hidden_size"),
        ("resampler", {"mlp_ratio": -1}, "connector.mlp_ratio"),
        ("qformer", {"num_heads": 5}, "connector.num_heads"),
        ("qformer", {"cross_attention_freq": 0}, "connector.cross_attention_freq"),
        ("qformer", {"intermediate_size": 0}, "connector.intermediate_size"),
        ("mlp", {"depth": 0}, "connector.depth"),
    ],
)
def test_bad_knobs_raise_config_errors_naming_the_key(
    option: str, knobs: dict[str, Any], key: str
) -> None:
    node = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "connector" / f"{option}.yaml"))
    assert isinstance(node, dict)
    shipped = {str(k): v for k, v in node.items() if k not in ("_target_", "init_seed")}
    cls = get_class(str(node["_target_"]))
    with torch.device("meta"):  # no memory, no init: only the argument checks run for real
        cls(in_features=64, out_features=128, **shipped)  # as shipped: fine
        with pytest.raises(ConfigError) as info:
            cls(in_features=64, out_features=128, **{**shipped, **knobs})
    assert info.value.key == key
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("option", "override", "key"),
    [
        ("resampler", "connector.pos_embed=learned", "connector.pos_embed"),
        ("qformer", "connector.num_heads=5", "connector.num_heads"),
    ],
)
def test_bad_knob_through_build_vlm_is_a_config_error(
    compose_cfg, option: str, override: str, key: str
) -> None:
    """Not wrapped in Hydra's InstantiationException: the CLI prints it without a traceback."""
    cfg = _compose(compose_cfg, f"connector={option}", *SMALL.get(option, ()), override)
    with pytest.raises(ConfigError) as info:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert info.value.key == key


# ----------------------------------------------------------------------------- sizes

# LLaVA-1.5 shapes: CLIP ViT-L/14-336 (1024) -> Vicuna-7B (4096).
LLAVA15 = (1024, 4096)


def _shipped(compose_cfg: Any, option: str, dv: int, dl: int, *overrides: str) -> Any:
    """The connector as its YAML composes (plus `key=value` overrides), on the meta device."""
    cfg = _compose(compose_cfg, f"connector={option}")
    node = OmegaConf.merge(cfg.connector, OmegaConf.from_dotlist(list(overrides)))
    knobs = _knobs(OmegaConf.create({"connector": node}))
    with torch.device("meta"):
        return instantiate(knobs, in_features=dv, out_features=dl, _convert_="all")


def _shipped_formula(compose_cfg: Any, option: str, dv: int, dl: int, *overrides: str) -> int:
    cfg = _compose(compose_cfg, f"connector={option}")
    node = OmegaConf.merge(cfg.connector, OmegaConf.from_dotlist(list(overrides)))
    return _formula(OmegaConf.create({"connector": node}), dv, dl)


@pytest.mark.parametrize("option", OPTIONS)
def test_shipped_size_matches_its_class_formula(compose_cfg, option: str) -> None:
    """Each YAML as shipped, at LLaVA-1.5 shapes on the meta device: counted == its formula."""
    dv, dl = LLAVA15
    assert _n_params(_shipped(compose_cfg, option, dv, dl)) == _shipped_formula(
        compose_cfg, option, dv, dl
    )


# Sizes published for the original connectors at LLaVA-1.5 shapes, worked out by hand from the
# papers' layer lists (both biases of mlp2x_gelu count; BLIP-2 cross-attends every 2nd layer).
PUBLISHED = {
    ("linear",): 1024 * 4096 + 4096,  # 4,198,400: LLaVA-1's projector
    ("mlp",): 1024 * 4096 + 4096 + 4096 * 4096 + 4096,  # 20,979,712: LLaVA-1.5's mlp2x_gelu
    ("qformer", "cross_attention_freq=2"): 104_775_168,
}


@pytest.mark.parametrize("choice", list(PUBLISHED), ids=lambda c: "-".join(c))
def test_shipped_size_matches_the_published_size(compose_cfg, choice: tuple[str, ...]) -> None:
    """Counted on the meta device and stated by the class formula: both equal the known size."""
    dv, dl = LLAVA15
    option, *overrides = choice
    assert _n_params(_shipped(compose_cfg, option, dv, dl, *overrides)) == PUBLISHED[choice]
    assert _shipped_formula(compose_cfg, option, dv, dl, *overrides) == PUBLISHED[choice]


@pytest.mark.parametrize(
    ("option", "dv", "overrides"),
    [
        ("resampler", 1664, ("num_queries=256",)),  # Qwen-VL: ViT-bigG width, 256 queries
        ("resampler", 1024, ("depth=3", "mlp_ratio=4", "hidden_size=1024", "pos_embed=none")),
        ("qformer", 1024, ("cross_attention_freq=3", "depth=4")),
        ("mlp", 1024, ("depth=3",)),
    ],
    ids=["qwen-vl", "perceiver", "qformer-freq3", "mlp-depth3"],
)
def test_formula_follows_every_knob(
    compose_cfg, option: str, dv: int, overrides: tuple[str, ...]
) -> None:
    dl = LLAVA15[1]
    counted = _n_params(_shipped(compose_cfg, option, dv, dl, *overrides))
    assert counted == _shipped_formula(compose_cfg, option, dv, dl, *overrides)
    assert counted != _shipped_formula(compose_cfg, option, dv, dl)  # the knob changed the size


def test_mlp_formula_without_hydra() -> None:
    with torch.device("meta"):
        assert _n_params(MLPConnector(1024, 4096, depth=3)) == MLPConnector.expected_num_parameters(
            1024, 4096, depth=3
        )


@pytest.mark.parametrize("option", OPTIONS)
def test_built_connector_size_matches_formula(compose_cfg, option: str) -> None:
    """The tiny build (64 -> 128) is the same formula: widths come from the encoder and LLM."""
    model, _ = _build(compose_cfg, option)
    dv, dl = model.encoder.hidden_size, model.llm.config.hidden_size
    assert (dv, dl) == (64, 128)
    cfg = _compose(compose_cfg, f"connector={option}", *SMALL.get(option, ()))
    assert _n_params(model.connector) == _formula(cfg, dv, dl)
