"""Interchange with transformers' `LlavaForConditionalGeneration` (the llava-hf layout).

Export (`export_hf_llava`, `vlmlab export`): our composition maps module for module onto
Llava when the connector is the LLaVA-1.5 MLP of depth 2 and the encoder is a transformers
CLIP/SigLIP tower:

    encoder.vision                        -> model.vision_tower
    connector.layers.0 / connector.layers.2 -> model.multi_modal_projector.linear_1 / linear_2
    llm.<base model> / llm.lm_head        -> model.language_model / lm_head
    encoder.select_layer                  -> vision_feature_layer
    select_feature + has_cls              -> vision_feature_select_strategy
                                             ("default" drops CLS; "full" keeps every token,
                                             which is what SigLIP (no CLS) needs)

The directory also holds the tokenizer (with `<image>`), a `LlavaProcessor` whose image
processor reproduces the encoder's transform (`LlavaImageProcessor`: CLIP-style resize and
crop or exact resize, plus `do_pad`, LLaVA's expand-to-square with the mean colour; its PIL
backend, `backend="pil"`, matches our transform exactly) and a chat template derived from the
LLM's template. Other connectors have no Llava equivalent and save in vlmlab's own format.

AnyRes models (`encoder.image=anyres`) export as `LlavaNextForConditionalGeneration`: the same
modules plus `image_newline` -> `model.image_newline`, `image_grid_pinpoints` in transformers'
(height, width) convention, and a `LlavaNextProcessor` whose `LlavaNextImageProcessor` (PIL
backend) cuts the same tiles. Only `encoder.anyres.mode=transformers` is exported: a `llava`-mode
model reads its pinpoints as (width, height) and breaks ties the other way, so transformers would
give square and tiny images another grid (other tokens) than the model was trained with; such an
export is refused, naming the key. So are OneVision pooling (`pool_budget_tiles`) and
`newline=false`, which LlavaNext cannot express.

Import (`load_hf_llava`): an HF Llava or LlavaNext directory becomes our composition, so it can
be trained further; `load_hf_weights` loads such a directory into an already built composition
(the hook for `stage.init_from=hf:<dir>`), and `component_configs` gives the
encoder/connector/llm configs that build the matching composition with `build_vlm`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.connectors.mlp import MLPConnector
from vlmlab.models.encoder import HFVisionEncoder
from vlmlab.models.llm import build_tokenizer
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IMAGE_PLACEHOLDER, IMAGE_TOKEN
from vlmlab.text.templates import Template, Turn

log = logging.getLogger(__name__)

# transformers vision config model_type -> our encoder family
FAMILY_OF = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_RESAMPLE_CODES = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values
_FAMILY_NORM = {  # image_mean/std when a directory has no preprocessor config
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
_MODEL_TYPES = ("llava", "llava_next")  # Llava, LlavaNext (AnyRes)
_CONFIG_NOISE = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")
_OWN_FORMAT = (
    "save it in vlmlab's own format instead: checkpoints under runs/checkpoints, or "
    "`vlmlab merge CKPT --out DIR` for one file with every weight."
)


# ----------------------------------------------------------------------------- export


def _base_model(llm: Any) -> nn.Module:
    prefix = getattr(llm, "base_model_prefix", "")
    base = getattr(llm, prefix, None) if prefix else None
    if not isinstance(base, nn.Module):
        raise ConfigError(
            "llm",
            f"{type(llm).__name__} has no base model under `base_model_prefix` (LoRA still "
            "wrapped?).",
            "export a merged model: `vlmlab export --checkpoint` folds LoRA adapters in.",
        )
    return base


def check_exportable(model: VisionLanguageModel) -> None:
    """Raise a ConfigError naming the component that has no transformers Llava equivalent."""
    connector = model.connector
    layers = list(getattr(connector, "layers", []))
    is_mlp2 = (
        isinstance(connector, MLPConnector)
        and len(layers) == 3
        and isinstance(layers[0], nn.Linear)
        and isinstance(layers[1], nn.GELU)
        and layers[1].approximate == "none"
        and isinstance(layers[2], nn.Linear)
        and (layers[0].bias is None) == (layers[2].bias is None)
    )
    if not is_mlp2:
        kind = type(connector).__name__
        if isinstance(connector, MLPConnector):
            kind += f" of depth {(len(layers) + 1) // 2}"
        raise ConfigError(
            "connector",
            f"{kind} has no transformers Llava equivalent: LlavaForConditionalGeneration's "
            "projector is exactly Linear -> GELU -> Linear (connector=mlp with depth: 2).",
            _OWN_FORMAT,
        )
    encoder = model.encoder
    if not isinstance(encoder, HFVisionEncoder) or encoder.family not in ("clip", "siglip"):
        raise ConfigError(
            "encoder.backend",
            f"{type(encoder).__name__} is not a transformers CLIP/SigLIP tower, which Llava needs.",
            "export with encoder.backend=transformers (the same preset), or " + _OWN_FORMAT,
        )
    if type(encoder.vision).__name__ not in ("CLIPVisionModel", "SiglipVisionModel"):
        raise ConfigError("encoder", f"{type(encoder.vision).__name__} is not exportable.")
    _base_model(model.llm)
    counter = model.anyres
    if counter is None:
        return
    if counter.mode != "transformers":
        raise ConfigError(
            "encoder.anyres.mode",
            "llava: LLaVA-NeXT's own tiling reads grid_pinpoints as (width, height) and breaks "
            "ties the other way, so transformers' LlavaNext would cut square and tiny images "
            "into another grid (other image tokens) than this model was trained with.",
            "export models trained with encoder.anyres.mode=transformers (the default), or "
            + _OWN_FORMAT,
        )
    if counter.pool_budget_tiles is not None:
        raise ConfigError(
            "encoder.anyres.pool_budget_tiles",
            f"{counter.pool_budget_tiles}: LlavaNext never pools tile features (that is "
            "LLaVA-OneVision's anyres_max_N).",
            "export with pool_budget_tiles=null, or " + _OWN_FORMAT,
        )
    if not counter.newline or model.image_newline is None:
        raise ConfigError(
            "encoder.anyres.newline",
            "false: LlavaNext always appends image_newline after every grid row.",
            _OWN_FORMAT,
        )


def llava_parts(model: VisionLanguageModel) -> tuple[HFVisionEncoder, MLPConnector, Any]:
    """Encoder, connector and LLM as the classes Llava maps, once `check_exportable` passed."""
    check_exportable(model)
    return cast(HFVisionEncoder, model.encoder), cast(MLPConnector, model.connector), model.llm


def feature_select_strategy(encoder: HFVisionEncoder) -> Literal["default", "full"]:
    """Llava's "default" drops hidden-state index 0: only right when that is a CLS token."""
    return "default" if encoder.has_cls and encoder.select_feature == "patch" else "full"


def hf_config(model: VisionLanguageModel) -> Any:
    """The LlavaConfig of our composition (LlavaNextConfig for an AnyRes model)."""
    from transformers import LlavaConfig, LlavaNextConfig

    encoder, connector, llm = llava_parts(model)
    linear_1 = connector.layers[0]
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = int(llm.get_output_embeddings().weight.shape[0])
    common = {
        "vision_config": copy.deepcopy(encoder.vision.config),
        "text_config": text_config,
        "image_token_index": int(model.image_token_id),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": int(encoder.select_layer),
        "vision_feature_select_strategy": feature_select_strategy(encoder),
        "multimodal_projector_bias": linear_1.bias is not None,
        "tie_word_embeddings": bool(getattr(llm.config, "tie_word_embeddings", False)),
    }
    counter = model.anyres
    if counter is None:
        return LlavaConfig(image_seq_length=int(model.num_image_tokens), **common)
    return LlavaNextConfig(  # mode transformers: our pairs are already (height, width)
        image_grid_pinpoints=[list(p) for p in counter.pinpoints],
        image_seq_length=counter.side**2,  # tokens of one tile (llava-hf's 576 at 336 px)
        **common,
    )


def _no_meta(module: nn.Module, what: str) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left on the meta device: {left[:5]}")


def _same_structure(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    if type(ours) is not type(theirs):
        raise ConfigError(
            what,
            f"is a {type(ours).__name__}, transformers Llava builds a {type(theirs).__name__}.",
        )
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    other = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    if mine != other:
        diff = sorted(set(mine.items()) ^ set(other.items()))[:4]
        raise ConfigError(what, f"differs from the transformers Llava layout: {diff}.")


def to_hf_model(model: VisionLanguageModel) -> Any:
    """A LlavaForConditionalGeneration (LlavaNext for AnyRes) sharing our modules (no copy)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = hf_config(model)
    cls = (
        LlavaForConditionalGeneration if model.anyres is None else LlavaNextForConditionalGeneration
    )
    with torch.device("meta"):
        hf = cls(config)
    encoder, connector, llm = llava_parts(model)
    pairs = [
        (encoder.vision, hf.model, "vision_tower", "encoder"),
        (connector.layers[0], hf.model.multi_modal_projector, "linear_1", "connector"),
        (connector.layers[2], hf.model.multi_modal_projector, "linear_2", "connector"),
        (_base_model(llm), hf.model, "language_model", "llm"),
        (llm.get_output_embeddings(), hf, "lm_head", "llm"),
    ]
    for ours, parent, attr, key in pairs:
        _same_structure(ours, getattr(parent, attr), key)
        setattr(parent, attr, ours)
    if model.image_newline is not None:
        if model.image_newline.shape != hf.model.image_newline.shape:
            raise ConfigError("connector", "image_newline differs from LlavaNext's.")
        hf.model.image_newline = model.image_newline
    _no_meta(hf, "export")
    hf.eval()
    return hf


def anyres_processor_kwargs(model: VisionLanguageModel) -> dict[str, Any]:
    """LlavaNextImageProcessor arguments that cut our AnyRes tiles (`AnyResImages`).

    Tiles and the overview are square tile-size crops/resizes (bicubic), so the per-tile resize
    (shortest edge) and centre crop are identities; `do_pad` pads the tile count for batching.
    """
    counter = model.anyres
    assert counter is not None
    t: Any = model.encoder.image_transform
    side = int(counter.tile_size)
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": side},
        "resample": _RESAMPLE_CODES["bicubic"],
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(t.mean),
        "image_std": list(t.std),
        "do_pad": True,
        "image_grid_pinpoints": [list(p) for p in counter.pinpoints],
    }


def image_processor_kwargs(encoder: HFVisionEncoder) -> dict[str, Any]:
    """LlavaImageProcessor arguments that reproduce the encoder's ImageTransform."""
    t = encoder.image_transform
    square = {"height": t.size, "width": t.size}
    exact = t.resize == "exact" or t.aspect == "resize"
    return {
        "do_convert_rgb": True,
        "do_pad": t.aspect == "pad",  # expand to square with the mean colour first
        "do_resize": True,
        "size": square if exact else {"shortest_edge": t.size},
        "resample": _RESAMPLE_CODES[t.resample],
        "do_center_crop": not exact,
        "crop_size": square,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(t.mean),
        "image_std": list(t.std),
    }


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


def chat_template_for(template: Template, tokenizer: Any) -> str | None:
    """A Jinja chat template equivalent to `template`, or None when it cannot be derived.

    Rendering marker turns splits the template into the text before the first question, between
    question and answer, between answer and next question, after the last answer, and the
    generation cue. The result is checked against `template` on 1-3 turn conversations with
    the tokenizer's own chat-template renderer; a template that does not fit the pattern
    (e.g. `plain`, which drops the question) gives None.

    No BOS in it, as in the llava-hf checkpoints: the tokenizer adds BOS when the rendered text
    is tokenised (`processor(text=apply_chat_template(...))`, the model-card idiom lmms-eval also
    uses; `apply_chat_template(tokenize=True)`). vLLM's chat path adds no special tokens: ask its
    server with `add_special_tokens: true`, as for any llava-hf checkpoint.
    """
    q0, a0, q1, a1 = "\x01Q0\x01", "\x01A0\x01", "\x01Q1\x01", "\x01A1\x01"
    try:
        full = "".join(
            t
            for t, _ in template.render(
                [Turn("human", q0), Turn("gpt", a0), Turn("human", q1), Turn("gpt", a1)]
            )
        )
        one = template.prompt([Turn("human", q0)])
    except ValueError:
        return None
    marks = [full.find(m) for m in (q0, a0, q1, a1)]
    if -1 in marks or marks != sorted(marks) or not one.startswith(full[: marks[0]] + q0):
        return None
    ends = [m + len(q0) for m in marks]
    first, between, after = full[: marks[0]], full[ends[0] : marks[1]], full[ends[1] : marks[2]]
    end, cue = full[ends[3] :], one[len(first) + len(q0) :]
    if full[ends[2] : marks[3]] != between:
        return None
    padded = "".join(t for t, _ in template.render([Turn("human", " x "), Turn("gpt", "y")]))
    trim = "" if " x " in padded else " | trim"  # the template strips message text
    jinja = (
        "{%- macro text(content) -%}{%- if content is string -%}{{ content" + trim + " }}"
        "{%- else -%}{%- for part in content if part['type'] == 'image' -%}"
        + "{{ "
        + _literal(IMAGE_PLACEHOLDER + "\n")
        + " }}"
        "{%- endfor -%}{%- for part in content if part['type'] == 'text' -%}"
        "{{ part['text']" + trim + " }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ (" + _literal(first) + " if loop.first else " + _literal(after) + ") }}"
        "{{ text(message['content']) }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ " + _literal(between) + " }}{{ text(message['content']) }}"
        "{%- if loop.last -%}{{ " + _literal(end) + " }}{%- endif -%}"
        "{%- else -%}{{ raise_exception('this template has a fixed system prompt and takes "
        "user/assistant turns only') }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + _literal(cue) + " }}{%- endif -%}"
    )
    checks = [
        ([Turn("human", f"{IMAGE_PLACEHOLDER}\nWhat is it?")], True),
        ([Turn("human", "Hi"), Turn("gpt", "Hello."), Turn("human", "Colour?")], True),
        ([Turn("human", f"{IMAGE_PLACEHOLDER}\nWhat is it?"), Turn("gpt", "A red square.")], False),
    ]
    for turns, generate in checks:
        messages = [
            {"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns
        ]
        expected = (
            template.prompt(turns) if generate else "".join(t for t, _ in template.render(turns))
        )
        got = tokenizer.apply_chat_template(
            messages, chat_template=jinja, tokenize=False, add_generation_prompt=generate
        )
        if got != expected:
            log.warning("chat template %s could not be expressed in Jinja", template.name)
            return None
    return jinja


def build_processor(model: VisionLanguageModel, tokenizer: Any, template: Template | None) -> Any:
    """LlavaProcessor (LlavaNextProcessor for AnyRes): tokenizer + image processor + chat
    template, matching our pipeline."""
    from transformers import (
        LlavaImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    encoder = llava_parts(model)[0]
    chat_template = chat_template_for(template, tokenizer) if template is not None else None
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    if model.anyres is None:
        processor_cls: Any = LlavaProcessor
        image_processor: Any = LlavaImageProcessorPil(**image_processor_kwargs(encoder))
    else:
        processor_cls = LlavaNextProcessor
        image_processor = LlavaNextImageProcessorPil(**anyres_processor_kwargs(model))
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(encoder.vision.config.patch_size),
        vision_feature_select_strategy=feature_select_strategy(encoder),
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(encoder.has_cls),
    )
    return processor


def _drop_local_only(file: Path) -> None:
    """transformers records how the tokenizer was loaded (offline); a shared folder should not."""
    if file.is_file():
        data = json.loads(file.read_text())
        dropped = [data.pop(key) for key in ("local_files_only", "is_local") if key in data]
        if dropped:
            file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def llava_hf_state_dict(hf: Any) -> dict[str, torch.Tensor]:
    """The state dict with the vision tower under `vision_tower.vision_model.*` once saved.

    transformers 5 builds CLIP/SigLIP towers without their `vision_model` level and, for a
    model that was not loaded from disk, saves them that way; the llava-hf checkpoints users
    know, vLLM's loader and transformers 4 need the level. transformers 5 loads either layout
    (its CLIPVisionModel conversion mapping drops the prefix), and `save_pretrained` maps
    `model.vision_tower` back to the llava-hf `vision_tower` itself.
    """
    return {
        re.sub(
            r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model.", k
        ): v
        for k, v in hf.state_dict().items()
    }


def export_hf_llava(
    model: VisionLanguageModel,
    tokenizer: Any,
    out_dir: str | Path,
    template: Template | None = None,
) -> Path:
    """Write a transformers Llava directory: weights, config, tokenizer, processor, template."""
    out = Path(out_dir)
    hf = to_hf_model(model)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.image_token_id:
        raise ConfigError("llm.tokenizer", f"{IMAGE_TOKEN} is not the model's image token.")
    processor = build_processor(model, tokenizer, template)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, state_dict=llava_hf_state_dict(hf))
    processor.save_pretrained(out)
    _drop_local_only(out / "tokenizer_config.json")
    log.info(
        "exported %s (%s, %s image tokens, vision_feature_layer=%d, strategy=%s) to %s",
        type(hf).__name__,
        type(model.llm).__name__,
        model.num_image_tokens if model.anyres is None else f"up to {model.anyres.max_count}",
        hf.config.vision_feature_layer,
        hf.config.vision_feature_select_strategy,
        out,
    )
    return out


# ----------------------------------------------------------------------------- import


def _arch(config: Any, keep_model_type: bool) -> dict[str, Any]:
    data = {k: v for k, v in config.to_diff_dict().items() if k not in _CONFIG_NOISE}
    if not keep_model_type:
        data.pop("model_type", None)
    return data


def _processor_spec(path: Path) -> dict[str, Any] | None:
    """The directory's image processor settings (transformers 4 or 5 layout), or None."""
    file = path / "preprocessor_config.json"  # transformers 4.x layout, llava-hf repos
    if file.is_file():
        return cast(dict[str, Any], json.loads(file.read_text()))
    if (path / "processor_config.json").is_file():  # transformers 5 nests it here
        nested = json.loads((path / "processor_config.json").read_text()).get("image_processor")
        return cast(dict[str, Any], nested) if nested else None
    return None


def _transform_from_processor(path: Path, family: str, image_size: int) -> dict[str, Any]:
    """Our ImageTransform arguments from the directory's preprocessor_config.json."""
    mean, std = _FAMILY_NORM[family]
    spec = _processor_spec(path)
    file = path / "preprocessor_config.json"
    if not spec:
        log.warning("%s has no image processor config: %s defaults", path, family)
        resize = "shortest_edge" if family == "clip" else "exact"
        return {"mean": mean, "std": std, "resize": resize, "aspect": "pad", "resample": "bicubic"}
    size = spec.get("size") or {}
    shortest = "shortest_edge" in size
    side = size.get("shortest_edge") if shortest else size.get("height")
    if side is not None and int(side) != image_size:
        log.warning(
            "%s resizes to %s px, the tower takes %d: using %d", file, side, image_size, image_size
        )
    resample = {code: name for name, code in _RESAMPLE_CODES.items()}.get(
        int(spec.get("resample", 3)), "bicubic"
    )
    if spec.get("do_pad"):
        aspect = "pad"
    elif shortest and spec.get("do_center_crop", True):
        aspect = "crop"
    else:
        aspect = "resize"
    return {
        "mean": list(spec.get("image_mean") or mean),
        "std": list(spec.get("image_std") or std),
        "resize": "shortest_edge" if shortest else "exact",
        "aspect": aspect,
        "resample": resample,
    }


def _anyres_from(path: Path, config: Any) -> dict[str, Any]:
    """`encoder.anyres` of a LlavaNext directory: the model's pinpoints ((height, width), the
    transformers mode), newline on, no pooling; a processor with other pinpoints is warned of."""
    pinpoints = [[int(a), int(b)] for a, b in config.image_grid_pinpoints]
    spec = _processor_spec(path)
    theirs = (spec or {}).get("image_grid_pinpoints")
    if theirs is not None and [list(map(int, p)) for p in theirs] != pinpoints:
        log.warning(
            "%s: the processor's image_grid_pinpoints %s differ from the model's %s; "
            "using the model's",
            path,
            theirs,
            pinpoints,
        )
    return {
        "grid_pinpoints": pinpoints,
        "mode": "transformers",
        "newline": True,
        "max_tiles": None,
        "pool_budget_tiles": None,
    }


def component_configs(
    path: str | Path, template: str = "vicuna_v1", dtype: str = "float32"
) -> dict[str, dict[str, Any]]:
    """encoder/connector/llm configs (as in conf/) that build the composition of an HF Llava dir.

    `build_vlm` on them gives random weights of the right shapes; `load_hf_weights` fills them.
    """
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type not in _MODEL_TYPES:
        raise ConfigError(
            "hf", f"{path} holds a {config.model_type!r} model, not llava or llava_next."
        )
    vision = config.vision_config
    family = FAMILY_OF.get(vision.model_type)
    if family is None:
        raise ConfigError(
            "hf",
            f"{path}: vision tower {vision.model_type!r} is not supported.",
            f"supported: {sorted(FAMILY_OF)}.",
        )
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(
            "hf", f"{path}: vision_feature_layer={layer} (several layers) is not supported."
        )
    has_cls = family == "clip"
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and not has_cls:
        raise ConfigError(
            "hf",
            f"{path}: vision_feature_select_strategy='default' drops the first patch of a tower "
            "without CLS token; vlmlab never drops a real patch.",
        )
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise ConfigError(
            "hf",
            f"{path}: projector act={config.projector_hidden_act!r}, "
            f"bias={config.multimodal_projector_bias}; vlmlab's MLP connector is exact GELU with bias.",
        )
    encoder = {
        "_target_": "vlmlab.models.encoder.HFVisionEncoder",
        "family": family,
        "name_or_path": None,
        "pretrained": False,
        "config": _arch(vision, keep_model_type=False),
        "select_layer": int(layer),
        "select_feature": "patch" if (strategy == "default" or not has_cls) else "cls_patch",
        "init_seed": 0,
        "dtype": dtype,
        "transform": _transform_from_processor(path, family, int(vision.image_size)),
    }
    if config.model_type == "llava_next":
        encoder["image"] = "anyres"
        encoder["anyres"] = _anyres_from(path, config)
    connector = {
        "_target_": "vlmlab.models.connectors.mlp.MLPConnector",
        "depth": 2,
        "init_seed": 0,
    }
    llm = {
        "name_or_path": None,
        "pretrained": False,
        "dtype": dtype,
        "init_seed": 0,
        "template": template,
        "warmup_stage": None,
        "config": _arch(config.text_config, keep_model_type=True),
        "tokenizer": {"name_or_path": str(path)},
    }
    return {"encoder": encoder, "connector": connector, "llm": llm}


def _load_hf(path: Path, dtype: str | torch.dtype) -> Any:
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if AutoConfig.from_pretrained(path, trust_remote_code=False).model_type == "llava_next":
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=False
        ).eval()
    return LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, trust_remote_code=False
    ).eval()


def _parts(hf: Any) -> list[tuple[str, nn.Module]]:
    projector = hf.model.multi_modal_projector
    return [
        ("encoder.vision", hf.model.vision_tower),
        ("connector.layers.0", projector.linear_1),
        ("connector.layers.2", projector.linear_2),
        ("llm.base", hf.model.language_model),
        ("llm.lm_head", hf.lm_head),
    ]


def _check_image_strategy(model: VisionLanguageModel, hf: Any, path: Path | str) -> None:
    """A LlavaNext directory fits an AnyRes model with the same pinpoints, Llava a pad model."""
    theirs = getattr(hf.config, "image_grid_pinpoints", None)
    if model.anyres is None and theirs is None:
        return
    ours = None if model.anyres is None else [list(p) for p in model.anyres.pinpoints]
    mode = None if model.anyres is None else model.anyres.mode
    if theirs is None or ours is None or mode != "transformers" or ours != theirs:
        raise ConfigError(
            "encoder.image",
            f"{path} is a {type(hf).__name__} (image_grid_pinpoints {theirs}); this model has "
            f"encoder.image={model.image_strategy}"
            + (f", mode {mode}, grid_pinpoints {ours}" if ours is not None else "")
            + ".",
            "use encoder.image=anyres with encoder.anyres.grid_pinpoints equal to the "
            "directory's (mode transformers) for a LlavaNext folder, encoder.image=pad for Llava.",
        )


def _our_part(model: VisionLanguageModel, name: str) -> nn.Module:
    llm: Any = model.llm
    if name == "llm.base":
        return _base_model(llm)
    if name == "llm.lm_head":
        return llm.get_output_embeddings()
    return model.get_submodule(name)


def load_hf_weights(
    model: VisionLanguageModel, path: str | Path, dtype: str | torch.dtype = "float32"
) -> None:
    """Copy every weight of an HF Llava directory into a built composition of the same shapes.

    The hook for `stage.init_from=hf:<dir>`: build the composition (e.g. from
    `component_configs(dir)`, or presets with pretrained=false), then call this.
    """
    encoder = llava_parts(model)[0]
    hf = _load_hf(Path(path), dtype)
    if int(hf.config.image_token_id) != int(model.image_token_id):
        raise ConfigError(
            "stage.init_from",
            f"{path} uses image token id {hf.config.image_token_id}, this model "
            f"{model.image_token_id}.",
            f"use the directory's tokenizer: llm.tokenizer.name_or_path={path}.",
        )
    if hf.config.vision_feature_layer != encoder.select_layer or (
        hf.config.vision_feature_select_strategy != feature_select_strategy(encoder)
    ):
        raise ConfigError(
            "encoder.select_layer",
            f"{path} reads layer {hf.config.vision_feature_layer} with strategy "
            f"{hf.config.vision_feature_select_strategy!r}; this encoder reads "
            f"{encoder.select_layer} / {feature_select_strategy(encoder)!r}.",
        )
    _check_image_strategy(model, hf, path)
    for name, theirs in _parts(hf):
        ours = _our_part(model, name)
        try:
            ours.load_state_dict(theirs.state_dict(), strict=True)
        except RuntimeError as err:
            raise ConfigError(
                "stage.init_from", f"{path} does not fit this model's {name}: {err}"
            ) from err
    if model.image_newline is not None:
        newline = hf.model.image_newline
        if newline.shape != model.image_newline.shape:
            raise ConfigError(
                "stage.init_from", f"{path}: image_newline is {tuple(newline.shape)}."
            )
        with torch.no_grad():
            model.image_newline.copy_(newline)
    log.info("loaded every weight of %s", path)


def load_hf_llava(
    path: str | Path, dtype: str | torch.dtype = "float32", template: str = "vicuna_v1"
) -> tuple[VisionLanguageModel, Any]:
    """Our composition (and tokenizer) from an HF Llava directory, ready to train further.

    The composition is built as a meta-device shell from `component_configs`, then its parts
    are replaced by the modules transformers loaded, so weights exist once in memory.
    """
    from vlmlab.models import build_vlm

    path = Path(path)
    cfgs = component_configs(path, template=template)
    tokenizer = build_tokenizer(cfgs["llm"]["tokenizer"])
    hf = _load_hf(path, dtype)
    image_token_id = int(hf.config.image_token_id)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ConfigError(
            "hf", f"{path}: the tokenizer's {IMAGE_TOKEN} is not image_token_id={image_token_id}."
        )
    model, _ = build_vlm(
        cfgs["encoder"],
        cfgs["connector"],
        cfgs["llm"],
        weights="none",
        device="meta",
        tokenizer=tokenizer,
    )
    llm: Any = model.llm
    for name, theirs in _parts(hf):
        ours = _our_part(model, name)
        _same_structure(ours, theirs, name)
        if name == "llm.base":
            setattr(llm, llm.base_model_prefix, theirs)
        elif name == "llm.lm_head":
            llm.set_output_embeddings(theirs)
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, theirs)
    if model.anyres is not None:
        _check_image_strategy(model, hf, path)
        model.image_newline = hf.model.image_newline
    llm.config = copy.deepcopy(hf.config.text_config)
    _no_meta(model, f"import of {path}")
    model.eval()
    counter = model.image_token_counter()
    log.info(
        "imported %s (%s): %s image tokens per image",
        path,
        type(hf).__name__,
        counter.fixed_count or f"up to {counter.max_count}",
    )
    return model, tokenizer
