"""Differential test: our TextEncoder against the official LLaVA preprocessing code.

`llava-torch==1.2.2.post1` (the LLaVA repository on PyPI, installed with --no-deps) is a dev
dependency: if it is missing these tests fail, they never skip. For `vicuna_v1` we compare with
`llava.train.train.preprocess_v1`, for `plain` with `preprocess_plain`, on a deterministic set of
generated conversations, after expanding LLaVA's IMAGE_TOKEN_INDEX (-200) into our M image tokens.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import mistral_sentencepiece_tokenizer
from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import Template, get_template

M = 5  # image tokens per image: small keeps the comparison readable, the logic is the same
OFFICIAL_IMAGE_INDEX = -200
NUM_CONVERSATIONS = 240

WORDS = [
    "colour", "shape", "the", "a", "red", "circle", "café", "naïve", "Größe", "日本語",
    "Ελληνικά", "🙂", "3.14", "42", "1,000", "-7", "x²", "(yes)", "well...", "why?!", "it's",
    "\"quoted\"", "a/b", "50%", "#tag", "e-mail", "ünïcödé", "—", "ok;", "[1]",
]  # fmt: skip


def _sentence(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.3:
        text = rng.choice([" ", "  ", "\n"]) + text  # leading whitespace
    if rng.random() < 0.3:
        text = text + rng.choice([" ", "  ", "\n", "."])  # trailing whitespace / punctuation
    return text


def generate_conversations(n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], bool]]:
    """(conversations, has_image): 1-6 turns, text-only and image samples, `<image>` first or last."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        num_turns = 1 + i % 6
        has_image = i % 3 != 0
        conv: list[dict[str, str]] = []
        for turn in range(num_turns):
            question = _sentence(rng)
            if has_image and turn == 0:
                question = f"{IMAGE_TOKEN}\n{question}" if i % 2 else f"{question}\n{IMAGE_TOKEN}"
            conv += [{"from": "human", "value": question}, {"from": "gpt", "value": _sentence(rng)}]
        out.append((conv, has_image))
    return out


@pytest.fixture(scope="module")
def llava() -> Any:
    """The official LLaVA training module (import needs a transformers-5 shim, see ENV.md)."""
    import torch
    import transformers

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        transformers.trainer.ALL_LAYERNORM_LAYERS = [torch.nn.LayerNorm]
    try:
        import llava.train.train as llava_train
        from llava import conversation
    except ImportError as err:
        pytest.fail(
            f"llava-torch is a dev dependency ({err}): "
            "pip install --no-deps llava-torch==1.2.2.post1"
        )
    return llava_train, conversation


def _load(folder: Path, add_bos_token: bool) -> Any:
    # model_max_length as LLaVA's training script sets it (the official code truncates to it)
    return build_tokenizer(
        {"name_or_path": str(folder), "add_bos_token": add_bos_token, "model_max_length": 4096}
    )


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mistral_sp")
    mistral_sentencepiece_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(sp_folder: Path) -> Any:
    tok = _load(sp_folder, add_bos_token=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == 1
    return tok


def _encoder(tokenizer: Any, template: str | Template) -> TextEncoder:
    if isinstance(template, str):
        template = get_template(template, tokenizer.eos_token)
    return TextEncoder(
        tokenizer, template, M, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), max_length=8192
    )


def _expand(ids: list[int], labels: list[int], image_id: int) -> tuple[list[int], list[int]]:
    """Official ids/labels with the one -200 replaced by our M image tokens (label -100)."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == OFFICIAL_IMAGE_INDEX:
            assert label == IGNORE_INDEX
            out_ids += [image_id] * M
            out_labels += [IGNORE_INDEX] * M
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def _official_v1(llava: Any, tokenizer: Any, conv: list[dict[str, str]], has_image: bool) -> Any:
    llava_train, conversation = llava
    conversation.default_conversation = conversation.conv_templates["v1"]
    out = llava_train.preprocess_v1([copy.deepcopy(conv)], tokenizer, has_image=has_image)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


def test_generated_set_covers_the_cases() -> None:
    convs = generate_conversations(NUM_CONVERSATIONS)
    assert len(convs) >= 200
    assert {len(c) // 2 for c, _ in convs} == set(range(1, 7))
    firsts = [c[0]["value"] for c, has_image in convs if has_image]
    assert any(f.startswith(IMAGE_TOKEN) for f in firsts)
    assert any(f.endswith(IMAGE_TOKEN) for f in firsts)
    assert any(not has_image for _, has_image in convs)
    values = [m["value"] for c, _ in convs for m in c]
    assert any(v != v.strip() for v in values)  # leading/trailing whitespace
    assert any(not v.isascii() for v in values)
    assert convs == generate_conversations(NUM_CONVERSATIONS)  # deterministic


def test_vicuna_v1_matches_preprocess_v1(llava: Any, tokenizer: Any) -> None:
    encoder = _encoder(tokenizer, "vicuna_v1")
    image_id = encoder.image_token_id
    differ = []
    for n, (conv, has_image) in enumerate(generate_conversations(NUM_CONVERSATIONS)):
        ids, labels = _official_v1(llava, tokenizer, conv, has_image)
        assert any(lab != IGNORE_INDEX for lab in labels), f"official code zeroed sample {n}"
        expected = _expand(ids, labels, image_id)
        ours = encoder.encode(conv, has_image=has_image)
        if (ours["input_ids"].tolist(), ours["labels"].tolist()) != expected:
            differ.append(n)
    assert differ == [], f"{len(differ)} conversations differ from LLaVA's preprocess_v1"


def test_plain_matches_preprocess_plain(llava: Any, tokenizer: Any) -> None:
    llava_train, conversation = llava
    conversation.default_conversation = conversation.conv_templates["plain"]
    encoder = _encoder(tokenizer, "plain")
    single_turn_image = [
        (conv[:2], True)
        for conv, has_image in generate_conversations(NUM_CONVERSATIONS)
        if has_image
    ]
    assert len(single_turn_image) >= 100
    for n, (conv, _) in enumerate(single_turn_image):
        out = llava_train.preprocess_plain([copy.deepcopy(conv)], tokenizer)
        ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
        expected = _expand(ids, labels, encoder.image_token_id)
        ours = encoder.encode(conv, has_image=True)
        assert (ours["input_ids"].tolist(), ours["labels"].tolist()) == expected, n


def test_piecewise_image_tokenisation_is_what_llava_does(llava: Any, tokenizer: Any) -> None:
    """The case that made our whole-string tokenisation differ: SentencePiece's dummy prefix `▁`
    after `<image>`, which LLaVA checkpoints were trained with."""
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    ids, _ = _official_v1(llava, tokenizer, conv, True)
    after = ids[ids.index(OFFICIAL_IMAGE_INDEX) + 1 : ids.index(OFFICIAL_IMAGE_INDEX) + 3]
    assert tokenizer.convert_ids_to_tokens(after) == ["▁", "<0x0A>"]
    ours = _encoder(tokenizer, "vicuna_v1").encode(conv, has_image=True)["input_ids"].tolist()
    assert (
        ours
        == _expand(ids, [IGNORE_INDEX] * len(ids), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))[0]
    )


def test_no_bos_tokenizer_is_rejected_where_llava_zeroes_every_label(
    llava: Any, sp_folder: Path
) -> None:
    """LLaVA's known bug: without BOS its length bookkeeping is off by one, every label becomes
    -100 and the sample trains with zero loss (only a printed warning). Ours refuses the sample
    with a counted reason instead."""
    no_bos = _load(sp_folder, add_bos_token=False)
    assert no_bos("hi")["input_ids"][0] != no_bos.bos_token_id
    conv = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}] * 2
    _, labels = _official_v1(llava, no_bos, conv, False)  # two rounds: off by one -> mismatch
    assert all(lab == IGNORE_INDEX for lab in labels)  # the official silent zero-loss sample
    with pytest.raises(BadSample) as info:
        _encoder(no_bos, "vicuna_v1").encode(conv, has_image=False)
    assert info.value.reason == "no_bos"


class _SplitWordTemplate(Template):
    """A template whose reply starts inside a word: no tokenizer can separate prompt and reply."""

    name = "split_word"

    def render(self, turns: list[Any]) -> list[tuple[str, bool]]:
        return [(f"USER: {turns[0].text} ASSISTANT: Hel", False), (f"lo{turns[1].text}", True)]


def test_reply_boundary_inside_a_token_is_rejected(tokenizer: Any) -> None:
    conv = [{"from": "human", "value": "Greet."}, {"from": "gpt", "value": " there"}]
    pieces = tokenizer.tokenize("ASSISTANT: Hello there")
    assert "▁Hello" in pieces  # one token across the boundary "Hel|lo"
    with pytest.raises(BadSample) as info:
        _encoder(tokenizer, _SplitWordTemplate()).encode(conv, has_image=False)
    assert info.value.reason == "tokenization_mismatch"
