"""Generation on real tiny models: the KV cache changes nothing, batches equal single prompts,
sampling is seeded, stop strings cut the text where they start (even across tokens)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.errors import ConfigError
from vlmlab.eval.generate import GenerationConfig, Generator, Request, generate_ids
from vlmlab.models import build_vlm
from vlmlab.text.templates import Turn, get_template

CONNECTORS = {
    "linear": (),
    "mlp": (),
    "tiny": (),
    "resampler": ("connector.num_queries=8",),
    # the shipped Q-Former is BERT-base sized; same code at test widths (as in test_connectors)
    "qformer": (
        "connector.hidden_size=64",
        "connector.num_heads=4",
        "connector.intermediate_size=128",
        "connector.depth=2",
        "connector.num_queries=8",
    ),
}
NEW = 10
# A wider random init than the preset's 0.02: greedy decoding of a near-uniform random LM
# collapses to one repeated token, which would make "equal token for token" say little.
DIVERSE = ("+llm.config.initializer_range=0.1",)


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _generator(compose_cfg: Any, connector: str = "mlp", template: str = "vicuna_v1") -> Generator:
    cfg = compose_cfg(f"connector={connector}", *CONNECTORS[connector], *DIVERSE)
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    return Generator(
        model, tokenizer, get_template(template, tokenizer.eos_token), model.encoder.image_transform
    )


def _requests() -> list[Request]:
    """Different lengths, with and without an image: left padding and the image scatter matter."""
    return [
        Request([Turn("human", "<image>\nWhat colour is the shape?")], _image(0)),
        Request([Turn("human", "Describe the picture in a few words, please.")]),
        Request([Turn("human", "<image>\nWhere?")], _image(1)),
    ]


def _ids(gen: Generator, requests: list[Request], config: GenerationConfig) -> list[list[int]]:
    prompts = [gen.prompt_ids(r) for r in requests]
    images = [gen.image_transform(r.image) for r in requests if r.image is not None]
    pixels = torch.stack(images) if images else None
    return generate_ids(gen.model, prompts, pixels, config, gen.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def mlp_generator() -> Generator:
    from vlmlab.config import compose

    cfg = compose(["connector=mlp", *DIVERSE])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    return Generator(
        model,
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.encoder.image_transform,
    )


@pytest.mark.parametrize("connector", list(CONNECTORS))
def test_greedy_with_cache_equals_without_for_every_connector(compose_cfg, connector: str) -> None:
    gen = _generator(compose_cfg, connector)
    requests = _requests()
    cached = _ids(gen, requests, GenerationConfig(max_new_tokens=NEW, use_cache=True))
    recomputed = _ids(gen, requests, GenerationConfig(max_new_tokens=NEW, use_cache=False))
    assert cached == recomputed
    assert all(len(ids) == NEW for ids in cached)  # nothing stops early: the whole run is compared
    assert len({tuple(ids) for ids in cached}) == len(requests)  # the rows really differ
    assert len({t for ids in cached for t in ids}) > NEW  # and are not one repeated token


def test_batch_with_left_padding_equals_one_prompt_at_a_time(mlp_generator: Generator) -> None:
    requests = _requests()
    config = GenerationConfig(max_new_tokens=NEW)
    batched = _ids(mlp_generator, requests, config)
    single = [_ids(mlp_generator, [r], config)[0] for r in requests]
    assert batched == single


def test_image_changes_the_answer(mlp_generator: Generator) -> None:
    turns = [Turn("human", "<image>\nWhat colour is the shape?")]
    config = GenerationConfig(max_new_tokens=NEW)
    first = _ids(mlp_generator, [Request(turns, _image(0))], config)
    other = _ids(mlp_generator, [Request(turns, _image(5))], config)
    assert first != other


def test_sampling_is_seeded_and_top_k_1_is_greedy(mlp_generator: Generator) -> None:
    requests = _requests()
    greedy = _ids(mlp_generator, requests, GenerationConfig(max_new_tokens=NEW))
    sample = GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=7)
    first, again = _ids(mlp_generator, requests, sample), _ids(mlp_generator, requests, sample)
    assert first == again  # same seed, same tokens
    other = _ids(
        mlp_generator, requests, GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=8)
    )
    assert other != first
    assert first != greedy  # a hot random model almost never samples its argmax 30 times
    top1 = GenerationConfig(max_new_tokens=NEW, temperature=1.5, top_k=1, seed=3)
    assert _ids(mlp_generator, requests, top1) == greedy
    tiny_p = GenerationConfig(max_new_tokens=NEW, temperature=1.5, top_p=1e-6, seed=3)
    assert _ids(mlp_generator, requests, tiny_p) == greedy  # the nucleus keeps only the best
    # sampling with a cache equals sampling without (same seed, same draws)
    no_cache = GenerationConfig(max_new_tokens=NEW, temperature=1.5, seed=7, use_cache=False)
    assert _ids(mlp_generator, requests, no_cache) == first


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_makes_every_tensor_on_the_models_device(
    mlp_generator: Generator, use_cache: bool
) -> None:
    """What a GPU run needs, checked on CPU: under `torch.device("meta")` a tensor made without
    `device=` lands on meta and the first op mixing it with the model's CPU tensors raises
    (verified by dropping `device=` from one torch.tensor call). Same tokens as without it."""
    gen = mlp_generator
    requests = _requests()
    prompts = [gen.prompt_ids(r) for r in requests]
    pixels = torch.stack([gen.image_transform(r.image) for r in requests if r.image is not None])
    config = GenerationConfig(
        max_new_tokens=NEW, temperature=1.0, top_k=50, top_p=0.9, seed=0, use_cache=use_cache
    )
    pad = gen.tokenizer.pad_token_id
    expected = generate_ids(gen.model, prompts, pixels, config, pad)
    with torch.device("meta"):
        got = generate_ids(gen.model, prompts, pixels, config, pad)
    assert got == expected


def test_stop_string_across_tokens_cuts_text_and_generation(mlp_generator: Generator) -> None:
    gen = mlp_generator
    tokenizer = gen.tokenizer
    request = _requests()[0]
    ids = _ids(gen, [request], GenerationConfig(max_new_tokens=NEW))[0]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    # a stop string made of the last character of a token's text and the first of the next one
    stop = next(
        text[len(head) - 1 : len(head) + 1]
        for head in (tokenizer.decode(ids[:k], skip_special_tokens=False) for k in range(1, NEW))
        if head
        and text.startswith(head)
        and len(text) > len(head)
        and text[len(head) - 1 : len(head) + 1].isprintable()
        and text[len(head) - 1 : len(head) + 1] not in head
    )
    expected = text[: text.find(stop)]
    for special in tokenizer.all_special_tokens:
        expected = expected.replace(special, "")
    assert gen([request], GenerationConfig(max_new_tokens=NEW, stop=(stop,))) == [expected.strip()]
    # generation itself ended at the token that completed the stop string
    cut = generate_ids(
        gen.model,
        [gen.prompt_ids(request)],
        gen.image_transform(request.image)[None],
        GenerationConfig(max_new_tokens=NEW),
        tokenizer.pad_token_id,
        should_stop=lambda _, new: stop in tokenizer.decode(new, skip_special_tokens=False),
    )[0]
    first = min(
        k for k in range(1, NEW + 1) if stop in tokenizer.decode(ids[:k], skip_special_tokens=False)
    )
    assert cut == ids[:first] and first < NEW


def test_eos_stops_a_row_and_template_stop_is_used(mlp_generator: Generator) -> None:
    gen = mlp_generator
    request = _requests()[1]
    ids = _ids(gen, [request], GenerationConfig(max_new_tokens=NEW))[0]
    prompts = [gen.prompt_ids(request)]
    stopped = generate_ids(
        gen.model,
        prompts,
        None,
        GenerationConfig(max_new_tokens=NEW),
        gen.tokenizer.pad_token_id,
        stop_ids={ids[3]},
    )[0]
    assert stopped == ids[: ids.index(ids[3])]  # the stop token itself is not returned
    assert gen.stop_strings() == ("</s>",)
    assert get_template("chatml").stop == "<|im_end|>"


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"max_new_tokens": 0},
    ],
)
def test_bad_generation_settings_name_the_setting(mlp_generator: Generator, bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        mlp_generator(_requests()[:1], GenerationConfig(**bad))


def test_image_count_must_match_placeholders(mlp_generator: Generator) -> None:
    with pytest.raises(ValueError, match="<image>"):
        mlp_generator([Request([Turn("human", "no placeholder")], _image(0))])
