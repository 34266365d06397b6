"""Model zoo: `build_vlm`, the one assembly of encoder, connector and LLM from their config groups.

Training, `vlmlab plan` (meta device, architecture numbers only) and the HF Llava import all
build through it; the parts' contracts are in `vlmlab.models.contracts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from vlmlab.errors import ConfigError
from vlmlab.models.anyres import AnyResMode, AnyResTokens, parse_grid_pinpoints
from vlmlab.models.contracts import Connector, LanguageModel, VisionEncoder
from vlmlab.models.llm import build_tokenizer, check_attn_implementation
from vlmlab.models.vlm import VisionLanguageModel, tile_side
from vlmlab.schema import AnyResConfig
from vlmlab.text import IMAGE_TOKEN

__all__ = ["VisionLanguageModel", "build_tokenizer", "build_vlm"]


def instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a ConfigError raised by the target surfaces unwrapped."""
    try:
        return _hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def as_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Resolved plain dict of a config node (a plain mapping is copied)."""
    if not OmegaConf.is_config(cfg):
        return {str(k): v for k, v in dict(cfg).items()}
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


# The LLM builder a preset uses when it names none (`llm._target_`): any transformers causal LM.
DEFAULT_LLM_BUILDER = "vlmlab.models.llm.build_llm"
# llm preset keys read by others (tokenizer, templates, the stage chain), not by the builder
_LLM_OWN_KEYS = ("_target_", "tokenizer", "template", "warmup_stage")
WEIGHTS = ("preset", "none")
LOAD = "load"  # `tokenizer=LOAD`: build llm.tokenizer
IMAGE_STRATEGIES = ("pad", "anyres")  # encoder.image


def llm_builder(target: str | None) -> Callable[..., Any]:
    """The callable `llm._target_` names (default: transformers' AutoModelForCausalLM path)."""
    from hydra.utils import get_object

    name = target or DEFAULT_LLM_BUILDER
    try:
        builder = get_object(name)
    except Exception as err:  # ImportError, AttributeError: a config problem either way
        raise ConfigError(
            "llm._target_", f"cannot import {name!r} ({err}).", "name an LLM builder function."
        ) from None
    if not callable(builder):
        raise ConfigError("llm._target_", f"{name!r} is not callable.")
    return cast(Callable[..., Any], builder)


def build_vlm(
    encoder_cfg: DictConfig | Mapping[str, Any],
    connector_cfg: DictConfig | Mapping[str, Any],
    llm_cfg: DictConfig | Mapping[str, Any],
    quantization: dict[str, Any] | None = None,
    *,
    weights: Literal["preset", "none"] = "preset",
    device: str | torch.device | None = None,
    tokenizer: Any = LOAD,
    vision: VisionEncoder | None = None,
) -> tuple[VisionLanguageModel, Any]:
    """The one assembly of encoder -> connector -> LLM: training, `vlmlab plan`, HF import.

    `weights`: "preset" loads what the presets say (pretrained or random init, as training
    does); "none" builds every part from its architecture numbers (`config:`), never loading
    a checkpoint. `device`: where parameters are created ("meta": shapes only, no memory).
    `tokenizer`: LOAD builds `llm.tokenizer`; a tokenizer is used as given; None builds
    without one (vocabulary from `llm.config.vocab_size`, image token id -1). `vision`: built
    instead of the tower (`CachedFeatures`: training on a feature cache never loads the
    encoder). Connector widths come from the built parts. Returns the model and the tokenizer
    (or None).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    llm_args = as_dict(llm_cfg)
    encoder_args = as_dict(encoder_cfg)
    # the VLM's image strategy, not encoder constructor arguments
    image = str(encoder_args.pop("image", "pad") or "pad")
    anyres_args = encoder_args.pop("anyres", None) or {}
    connector_args = as_dict(connector_cfg)
    if image not in IMAGE_STRATEGIES:
        raise ConfigError(
            "encoder.image", f"got {image!r}.", f"use one of {list(IMAGE_STRATEGIES)}."
        )
    if image == "anyres":  # refused before any weights load
        check_anyres_connector(encoder_args, connector_args, llm_args)
    # an attention kernel this machine cannot run is refused before any weights load
    with torch.device(device) if device is not None else contextlib.nullcontext():
        check_attn_implementation(llm_args.get("attn_implementation"), "llm.attn_implementation")
        if weights == "none":
            encoder_args["pretrained"] = False
            llm_args["pretrained"] = False
        encoder = vision if vision is not None else instantiate(encoder_args, _convert_="all")
        if isinstance(tokenizer, str) and tokenizer == LOAD:
            tokenizer = build_tokenizer(llm_args["tokenizer"])
        builder = llm_builder(llm_args.get("_target_"))
        llm = builder(
            tokenizer,
            quantization=quantization,
            **{k: v for k, v in llm_args.items() if k not in _LLM_OWN_KEYS},
        )
        width = llm.get_input_embeddings().embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(connector_args.pop("init_seed", 0)))
            connector = instantiate(
                connector_args, in_features=encoder.hidden_size, out_features=width
            )
            # LLaVA-NeXT's init (llava_arch.py initialize_vision_modules): randn(D) / sqrt(D),
            # drawn after the connector's weights, so they are the same as without AnyRes
            newline = torch.randn(width) * width**-0.5 if image == "anyres" else None
    for part, protocol, key in (
        (encoder, VisionEncoder, "encoder"),
        (connector, Connector, "connector"),
        (llm, LanguageModel, "llm"),
    ):
        if not isinstance(part, protocol):
            raise ConfigError(
                f"{key}._target_", f"{type(part).__name__} does not implement {protocol.__name__}."
            )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else -1
    counter = None
    if image == "anyres":
        counter = anyres_counter(anyres_args, encoder, connector)
        if not counter.newline:
            newline = None
    model = VisionLanguageModel(
        encoder, connector, llm, image_token_id, anyres=counter, image_newline=newline
    )
    return model, tokenizer


def anyres_counter(
    spec: AnyResConfig | Mapping[str, Any], encoder: VisionEncoder, connector: Connector
) -> AnyResTokens:
    """The AnyRes token counter of a built encoder + connector from `encoder.anyres`.

    Tiles are the encoder's `image_size`; each gives the connector's tokens per tile, which
    must form a square grid (side x side) for the tiles to be laid out in 2D.
    """
    args = dataclasses.asdict(spec) if isinstance(spec, AnyResConfig) else dict(spec)
    unknown = set(args) - {f.name for f in dataclasses.fields(AnyResConfig)}
    if unknown:
        raise ConfigError("encoder.anyres", f"unknown keys {sorted(unknown)}.")
    cfg = AnyResConfig(**args)
    per_tile = connector.num_tokens(encoder.num_tokens)
    side, grid = tile_side(per_tile), tile_side(encoder.num_tokens)
    if side is None or grid is None or not _grid_scales(connector, grid):
        raise ConfigError(
            "encoder.image",
            f"anyres lays every tile's tokens out as a square grid, but encoder + connector give "
            f"{per_tile} tokens per tile from {encoder.num_tokens} features (connector "
            f"{type(connector).__name__}, encoder.select_feature).",
            "use connector=mlp or linear with encoder.select_feature=patch, or encoder.image=pad.",
        )
    tile = int(encoder.image_size)
    try:
        pinpoints = parse_grid_pinpoints(cfg.grid_pinpoints, tile, cfg.max_tiles)
        return AnyResTokens(
            pinpoints,
            tile,
            side,
            mode=cast(AnyResMode, cfg.mode),
            newline=bool(cfg.newline),
            pool_budget_tiles=cfg.pool_budget_tiles,
        )
    except ValueError as err:  # the message starts with the encoder.anyres key it is about
        text = str(err)
        found = re.match(r"encoder\.anyres\.\w+", text)
        key = found.group(0) if found else "encoder.anyres"
        raise ConfigError(key, text.removeprefix(key).lstrip(": ")) from None


def _grid_scales(connector: Any, grid: int) -> bool:
    """Whether the connector's tokens follow the patch grid: a square count that grows with it
    (linear, mlp, a pooling projector) and is not a fixed number of learned queries."""
    first = int(connector.num_tokens(grid * grid))
    return tile_side(first) is not None and int(connector.num_tokens(4 * grid * grid)) == 4 * first


def check_anyres_connector(
    encoder_args: Mapping[str, Any], connector_args: Mapping[str, Any], llm_args: Mapping[str, Any]
) -> None:
    """`encoder.image=anyres` needs tile tokens on a square grid: refuse a connector of learned
    queries (qformer, resampler) or CLS-kept features before any weights load.

    The connector is probed on the meta device at the configured widths (no memory, no init).
    """
    arch = dict(encoder_args.get("config") or {})
    image_size, patch = arch.get("image_size"), arch.get("patch_size")
    if encoder_args.get("select_feature", "patch") != "patch":
        raise ConfigError(
            "encoder.select_feature",
            f"{encoder_args.get('select_feature')!r} keeps the CLS token, which has no place in "
            "the tile grid of encoder.image=anyres.",
            "use encoder.select_feature=patch, or encoder.image=pad.",
        )
    if not image_size or not patch:
        return  # no architecture numbers: checked on the built parts (anyres_counter)
    grid = int(image_size) // int(patch)
    args = {k: v for k, v in connector_args.items() if k != "init_seed"}
    width = int((llm_args.get("config") or {}).get("hidden_size") or 64)
    try:
        with torch.device("meta"):
            probe = instantiate(
                args, in_features=int(arch.get("hidden_size") or 64), out_features=width
            )
    except Exception:  # a probe that cannot build is checked on the built parts instead
        return
    if not _grid_scales(probe, grid):
        raise ConfigError(
            "encoder.image",
            f"anyres lays every tile's tokens out as a 2D grid, but connector "
            f"{type(probe).__name__} gives {probe.num_tokens(grid * grid)} tokens per tile "
            "whatever the patch grid (learned queries), so tiles have no rows to unpad.",
            "use connector=mlp (LLaVA-NeXT's mlp2x_gelu) or connector=linear with "
            "encoder.image=anyres, or keep this connector with encoder.image=pad.",
        )
