"""Chat templates and LLM presets.

Every template of the registry (`available_templates()`, so also one added through
$VLMLAB_TEMPLATES) renders replies as the only targets, prompts with exactly the training text
and masks correctly with a real tokenizer; every LLM preset of the `llm` group (conf/ plus any
config dir on `hydra.searchpath`) agrees with its template on BOS, and a random-init preset
trains a stage with it (tests/test_registry.py adds a preset and a template from temp folders).
Each shipped template renders its model's official chat format (checked against the literal
string and the official Jinja template rendered by transformers), and masking keeps exactly the
assistant replies plus their end-of-turn marker. Real tokenizers are built offline, each with its model's
markers as special tokens: the Mistral/Llama-2 32K SentencePiece model shipped in
`mistral_common` (vicuna_v1, mistral, and phi3 with Phi-3's added tokens at Phi-3's ids) and
small byte-level BPEs with the Llama-3 / Qwen2 pre-tokenizer regexes (llama3, chatml).
Each preset's architecture numbers build the real shapes on the meta device.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import (
    group_options,
    label_runs,
    mistral_sentencepiece_tokenizer,
    squash,
)
from vlmlab.config import conf_dir
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import Template, Turn, available_templates, get_template

TEMPLATES = available_templates()  # the registry, not a hand-kept list
M = 7  # image tokens per image
CONVERSATION = [
    ("<image>\nWhat colour is the shape?", "Red."),
    ("What shape is it?", "A small circle."),
    ("Where is it?", "In the top left corner, near the edge."),
    ("Is there anything else?", "No, only the circle."),
]

# --------------------------------------------------------------------------- official formats
# The first two exchanges of CONVERSATION as each model's official chat template writes them.
# vicuna_v1: LLaVA's conv_vicuna_v1.get_prompt() (the tokenizer adds <s>). llama3, chatml, phi3,
# mistral: the `chat_template` of Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct,
# Phi-3-mini-4k-instruct and Mistral-7B-Instruct-v0.2 (tokenizer_config.json) with
# add_generation_prompt=False.
OFFICIAL_TWO_TURNS = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat colour is the shape? ASSISTANT: Red.</s>"
        "USER: What shape is it? ASSISTANT: A small circle.</s>"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat colour is the shape?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat shape is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA small circle.<|eot_id|>"
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA small circle.<|im_end|>\n"
    ),
    "mistral": (
        "<s> [INST] <image>\nWhat colour is the shape? [/INST] Red.</s>"
        " [INST] What shape is it? [/INST] A small circle.</s>"
    ),
    "phi3": (
        "<|user|>\n<image>\nWhat colour is the shape?<|end|>\n"
        "<|assistant|>\nRed.<|end|>\n"
        "<|user|>\nWhat shape is it?<|end|>\n"
        "<|assistant|>\nA small circle.<|end|>\n"
        "<|endoftext|>"
    ),
}
OFFICIAL = sorted(OFFICIAL_TWO_TURNS)
# What the tokenizer contributes in front of our text: its BOS, and for SentencePiece the
# dummy-prefix space that the Mistral Jinja writes as ' ' after '<s>'.
TOKENIZER_PREFIX = {"llama3": "<|begin_of_text|>", "mistral": "<s> "}
# What decoding the ids puts in front of our text (LLaVA's vicuna_v1 string has no BOS in it).
DECODED_PREFIX = {**TOKENIZER_PREFIX, "vicuna_v1": "<s> "}


def _decoded(name: str, text: str) -> str:
    """Our text as the tokenizer round-trips it: its BOS in front, and for phi3 the whitespace
    right of a chat marker absorbed into it (Phi-3's markers are `rstrip` added tokens)."""
    if name == "phi3":
        text = re.sub(r"(<\|(?:user|assistant|system|end)\|>)\s+", r"\1", text)
    return DECODED_PREFIX.get(name, "") + text


# The official Jinja templates (the parts that apply to alternating user/assistant turns).
OFFICIAL_JINJA = {
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}

# Special tokens: (count outside targets, count inside targets) for t turns.
MARKERS = {
    "vicuna_v1": lambda t: {"<s>": (1, 0), "</s>": (0, t)},
    "mistral": lambda t: {"<s>": (1, 0), "</s>": (0, t)},
    "llama3": lambda t: {
        "<|begin_of_text|>": (1, 0),
        "<|start_header_id|>": (2 * t, 0),
        "<|end_header_id|>": (2 * t, 0),
        "<|eot_id|>": (t, t),
    },
    "chatml": lambda t: {"<|im_start|>": (1 + 2 * t, 0), "<|im_end|>": (1 + t, t)},
    "phi3": lambda t: {
        "<s>": (0, 0),
        "<|user|>": (t, 0),
        "<|assistant|>": (t, 0),
        "<|end|>": (t, t),
        "<|endoftext|>": (1, 0),
    },
}
# The text that opens a user turn, just before its content.
USER_OPENER = {
    "vicuna_v1": "USER: ",
    "mistral": "[INST] ",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n",
    "chatml": "<|im_start|>user\n",
    "phi3": "<|user|>\n",
}


def _turns(pairs: list[tuple[str, str]], last_human: str | None = None) -> list[Turn]:
    turns = [t for q, a in pairs for t in (Turn("human", q), Turn("gpt", a))]
    return [*turns, Turn("human", last_human)] if last_human is not None else turns


def _conv(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"from": t.role, "value": t.text} for t in _turns(pairs)]


def _text(template: Template, turns: list[Turn]) -> str:
    return "".join(piece for piece, _ in template.render(turns))


# --------------------------------------------------------------------------- real tokenizers


def _preset_tokenizer(preset: str, folder: Path) -> Any:
    """Load `folder` through vlmlab's loader with the preset's own tokenizer settings."""
    settings = OmegaConf.to_container(OmegaConf.load(conf_dir() / "llm" / f"{preset}.yaml"))
    assert isinstance(settings, dict)
    return build_tokenizer({**settings["tokenizer"], "name_or_path": str(folder)})


# Phi-3-mini's added tokens (ids 32000-32010 on top of the Llama-2 32K vocabulary); the chat
# markers strip whitespace on their right, as in its tokenizer.json.
PHI3_ADDED = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    *[(f"<|placeholder{i}|>", True) for i in (1, 2, 3, 4)],
    ("<|system|>", True),
    ("<|end|>", True),
    *[(f"<|placeholder{i}|>", True) for i in (5, 6)],
    ("<|user|>", True),
]

LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Pre-tokenizer regexes of the Llama-3 (tiktoken cl100k-like) and Qwen2 tokenizers.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_bpe(
    folder: Path, split: str, special: list[str], bos: str | None, **tokens: str
) -> None:
    """A small real byte-level BPE with the model's pre-tokenizer regex and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmlab.data.shapes import corpus_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*corpus_text(), *(a for pair in CONVERSATION for a in pair), "user assistant system"]
    tokenizer.train_from_iterator(corpus * 2, trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, clean_up_tokenization_spaces=False, **tokens
    )
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """template name -> a real tokenizer for it, loaded with the matching preset's settings."""
    from transformers import AddedToken, AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    mistral_sentencepiece_tokenizer(root / "sp")
    phi = AutoTokenizer.from_pretrained(root / "sp", add_bos_token=False)
    phi.add_tokens(
        [AddedToken(t, rstrip=r, normalized=False, special=True) for t, r in PHI3_ADDED],
        special_tokens=True,
    )
    phi.eos_token = "<|endoftext|>"
    phi.save_pretrained(root / "phi3")
    _byte_level_bpe(
        root / "llama3",
        LLAMA3_SPLIT,
        LLAMA3_SPECIAL,
        bos="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    _byte_level_bpe(
        root / "chatml",
        QWEN2_SPLIT,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    return {
        "vicuna_v1": _preset_tokenizer("vicuna7b", root / "sp"),
        "mistral": _preset_tokenizer("mistral7b", root / "sp"),
        "phi3": _preset_tokenizer("phi3_mini", root / "phi3"),
        "llama3": _preset_tokenizer("llama3_8b", root / "llama3"),
        "chatml": _preset_tokenizer("qwen2_7b", root / "chatml"),
    }


def test_tokenizers_are_real_and_have_the_markers(tokenizers: dict[str, Any]) -> None:
    for name, tok in tokenizers.items():
        ids = tok(OFFICIAL_TWO_TURNS[name], add_special_tokens=False)["input_ids"]
        for marker in MARKERS[name](2):
            marker_id = tok.convert_tokens_to_ids(marker)
            assert marker_id is not None and marker_id != tok.unk_token_id, (name, marker)
            if marker in OFFICIAL_TWO_TURNS[name]:  # one token, never split into pieces
                assert marker_id in ids, (name, marker)
        assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == len(tok) - 1  # added by build_tokenizer
        assert tok.pad_token_id is not None
    sp = tokenizers["mistral"]
    assert len(sp) == 32001 and sp.tokenize("Hello world") == ["▁Hello", "▁world"]
    phi = tokenizers["phi3"]
    assert phi.convert_tokens_to_ids(["<|endoftext|>", "<|end|>", "<|user|>"]) == [
        32000,
        32007,
        32010,
    ]
    assert phi.eos_token == "<|endoftext|>"


# --------------------------------------------------------------------------- rendered text


@pytest.mark.parametrize("name", OFFICIAL)
def test_two_turns_render_exactly_the_official_text(tokenizers: dict[str, Any], name: str) -> None:
    tok = tokenizers[name]
    template = get_template(name, tok.eos_token)
    text = _text(template, _turns(CONVERSATION[:2]))
    assert TOKENIZER_PREFIX.get(name, "") + text == OFFICIAL_TWO_TURNS[name]
    # the tokenizer adds exactly the BOS (and SentencePiece's dummy prefix) and nothing else
    ids = tok(text, add_special_tokens=template.adds_bos)["input_ids"]
    assert tok.decode(ids, spaces_between_special_tokens=False) == _decoded(name, text)


@pytest.mark.parametrize("name", sorted(OFFICIAL_JINJA))
@pytest.mark.parametrize("num_turns", [1, 2, 3, 4])
def test_render_and_prompt_equal_the_official_jinja(
    tokenizers: dict[str, Any], name: str, num_turns: int
) -> None:
    """transformers renders the model's Jinja template; ours must agree, turn by turn."""
    tok = tokenizers[name]
    template = get_template(name, tok.eos_token)
    pairs = CONVERSATION[:num_turns]
    messages = [
        {"role": "user" if t.role == "human" else "assistant", "content": t.text}
        for t in _turns(pairs)
    ]
    official = tok.apply_chat_template(messages, chat_template=OFFICIAL_JINJA[name], tokenize=False)
    assert TOKENIZER_PREFIX.get(name, "") + _text(template, _turns(pairs)) == official
    # generation prompt: all previous turns, a new question, the assistant cue
    follow_up = "And its size?"
    official_prompt = tok.apply_chat_template(
        [*messages, {"role": "user", "content": follow_up}],
        chat_template=OFFICIAL_JINJA[name],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = TOKENIZER_PREFIX.get(name, "") + template.prompt(_turns(pairs, follow_up))
    assert prompt == official_prompt


def test_llama3_trims_like_its_jinja(tokenizers: dict[str, Any]) -> None:
    template = get_template("llama3")
    text = _text(template, _turns([("  Colour?\n", "\n Red. ")]))
    assert "\n\nColour?<|eot_id|>" in text and "\n\nRed.<|eot_id|>" in text


# --------------------------------------------------------------------------- every template


def marker_tokenizer(template: Template) -> Any:
    """The bundled tiny BPE (a real byte-level tokenizer) with the template's end markers as
    special tokens, as its model's tokenizer has them: a tokenizer for any registered template."""
    tok = build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})
    markers = [m for m in (template.stop, template.eos) if m.strip() and m not in tok.get_vocab()]
    if markers:
        tok.add_special_tokens({"additional_special_tokens": [*markers, IMAGE_TOKEN]})
    return tok


def tokenizer_for(name: str, tokenizers: dict[str, Any]) -> Any:
    """The model's own tokenizer where we rebuild one offline, else `marker_tokenizer`."""
    return tokenizers.get(name) or marker_tokenizer(get_template(name))


def conversation_for(template: Template) -> list[tuple[str, str]]:
    """CONVERSATION, or its first exchange for a single-exchange template (`plain`)."""
    try:
        template.render(_turns(CONVERSATION[:2]))
    except ValueError:
        template.render(_turns(CONVERSATION[:1]))  # one exchange must render
        return CONVERSATION[:1]
    return CONVERSATION


def _targets(template: Template, turns: list[Turn]) -> list[tuple[int, str]]:
    """(offset in the text, text) of each run of adjacent target segments (a reply's text is a
    segment of its own, `DataText`, next to the template's end-of-turn text)."""
    offset, previous = 0, False
    found: list[tuple[int, str]] = []
    for piece, is_target in template.render(turns):
        if is_target and previous:
            start, text = found[-1]
            found[-1] = (start, text + piece)
        elif is_target:
            found.append((offset, piece))
        offset += len(piece)
        previous = is_target
    return found


@pytest.mark.parametrize("name", TEMPLATES)
def test_only_replies_are_rendered_as_targets(name: str) -> None:
    """Text level, no tokenizer: one target per reply (the reply and the end-of-turn text),
    every question outside the targets, no reply outside them."""
    template = get_template(name)
    pairs = conversation_for(template)
    for k in range(1, len(pairs) + 1):
        turns = _turns(pairs[:k])
        targets = _targets(template, turns)
        assert [squash(t) for _, t in targets] == [squash(a + template.stop) for _, a in pairs[:k]]
        assert all(t.rstrip().endswith(template.stop.strip()) for _, t in targets)
        context = "".join(piece for piece, is_target in template.render(turns) if not is_target)
        keeps_questions = "QQQ" in _text(template, _turns([("QQQ", "A")]))  # plain keeps none
        for question, answer in pairs[:k]:
            if keeps_questions:
                assert squash(question) in squash(context)
            assert squash(answer) not in squash(context)


def _check_template_masking(
    tok: Any, template: Template, pairs: list[tuple[str, str]], has_image: bool
) -> tuple[list[int], list[int]]:
    """What holds for every template with a real tokenizer; returns (ids, labels)."""
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    encoder = TextEncoder(tok, template, M, image_id, max_length=4096)
    out = encoder.encode(_conv(pairs), has_image=has_image)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    # BOS: exactly one, first, where the template uses one; none otherwise
    bos = tok.bos_token_id
    if template.adds_bos:
        assert ids[0] == bos and ids.count(bos) == 1 and labels[0] == IGNORE_INDEX
    elif bos is not None:
        assert bos not in ids
    # <image>: M contiguous ignored copies
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if has_image:
        assert positions == list(range(positions[0], positions[0] + M))
        assert all(labels[i] == IGNORE_INDEX for i in positions)
    else:
        assert positions == []
    # targets: one run per assistant turn = the reply and its end-of-turn text, nothing else
    runs = label_runs([lab != IGNORE_INDEX for lab in labels])
    assert len(runs) == len(pairs)
    for (start, end), (_, answer) in zip(runs, pairs):
        run_text = tok.decode(ids[start:end], skip_special_tokens=False)
        assert squash(run_text) == squash(answer + template.stop)
    # the context holds no answer
    context = tok.decode(
        [t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX and t != image_id],
        skip_special_tokens=True,
    )
    for _, answer in pairs:
        assert squash(answer) not in squash(context)
    return ids, labels


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("has_image", [True, False], ids=["image", "text"])
def test_every_template_masks_all_but_the_replies(name: str, has_image: bool) -> None:
    template = get_template(name)
    tok = marker_tokenizer(template)
    template = get_template(name, tok.eos_token)
    conversation = conversation_for(template)
    for k in range(1, len(conversation) + 1):
        pairs = conversation[:k]
        if not has_image:
            pairs = [(q.replace("<image>\n", ""), a) for q, a in pairs]
        _check_template_masking(tok, template, pairs, has_image)


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_is_the_training_text_up_to_the_assistant_cue(
    tokenizers: dict[str, Any], name: str
) -> None:
    tok = tokenizer_for(name, tokenizers)
    template = get_template(name, tok.eos_token)
    pairs = conversation_for(template)
    turns = _turns(pairs)
    text = _text(template, turns)
    train_ids = tok(text, add_special_tokens=template.adds_bos)["input_ids"]
    targets = _targets(template, turns)
    assert len(targets) == len(pairs)
    for k, (start, reply) in enumerate(targets):
        prompt = template.prompt(turns[: 2 * k + 1])
        assert prompt == text[:start]  # generation sees exactly the training text
        prompt_ids = tok(prompt, add_special_tokens=template.adds_bos)["input_ids"]
        assert train_ids[: len(prompt_ids)] == prompt_ids  # generation sees the training tokens
        with_reply = tok(text[: start + len(reply)], add_special_tokens=template.adds_bos)
        assert len(with_reply["input_ids"]) > len(prompt_ids)
    with pytest.raises(ValueError, match="human"):
        template.prompt(turns)  # ends with a reply: nothing to generate


# --------------------------------------------------------------------------- official masking


def _check_masking(tok: Any, name: str, pairs: list[tuple[str, str]], has_image: bool) -> None:
    """The generic checks, then what the model's official format fixes: marker counts inside
    and outside the targets, where the image goes, the exact token sequence."""
    template = get_template(name, tok.eos_token)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = _check_template_masking(tok, template, pairs, has_image)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if has_image:  # right after the first user turn's opener
        before = tok.decode(ids[: positions[0]], skip_special_tokens=False)
        assert squash(before).endswith(squash(USER_OPENER[name]))
        assert squash(before).count(squash(USER_OPENER[name])) == 1
    runs = label_runs([lab != IGNORE_INDEX for lab in labels])
    stop_id = tok.convert_tokens_to_ids(template.stop)
    for _, end in runs:
        assert ids[end - 1] == stop_id  # the end-of-turn marker is one token, and a target
    # special tokens inside and outside the targets
    for marker, (outside, inside) in MARKERS[name](len(pairs)).items():
        marker_id = tok.convert_tokens_to_ids(marker)
        in_targets = sum(1 for t, lab in zip(ids, labels) if t == marker_id and lab != IGNORE_INDEX)
        assert (ids.count(marker_id) - in_targets, in_targets) == (outside, inside), marker
    # the context holds every question
    context = tok.decode(
        [t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX and t != image_id],
        skip_special_tokens=True,
    )
    for question, _ in pairs:
        assert squash(question.replace(IMAGE_TOKEN, "")) in squash(context)
    # separators: the unexpanded ids decode to exactly the official text
    text = _text(template, _turns(pairs))
    raw = tok(text, add_special_tokens=template.adds_bos)["input_ids"]
    if not (has_image and template.image_pieces):  # LLaVA's piece-wise image tokenisation is
        # compared with LLaVA's own code in tests/test_official_masking.py
        assert [t for t in ids if t != image_id] == [t for t in raw if t != image_id]
    # (a SentencePiece-backend tokenizer decodes as transformers 4's slow one, which puts spaces
    # around added tokens such as `<image>` unless told not to)
    assert tok.decode(raw, spaces_between_special_tokens=False) == _decoded(name, text)


@pytest.mark.parametrize("name", OFFICIAL)
@pytest.mark.parametrize("num_turns", [1, 2, 3, 4])
@pytest.mark.parametrize("has_image", [True, False], ids=["image", "text"])
def test_only_replies_and_their_end_marker_are_targets(
    tokenizers: dict[str, Any], name: str, num_turns: int, has_image: bool
) -> None:
    pairs = CONVERSATION[:num_turns]
    if not has_image:
        pairs = [(q.replace("<image>\n", ""), a) for q, a in pairs]
    _check_masking(tokenizers[name], name, pairs, has_image)


def test_mistral_tokens_equal_mistral_commons_reference(tokenizers: dict[str, Any]) -> None:
    """Mistral's own encoder (mistral_common InstructTokenizerV1) over the same SentencePiece
    model gives the same ids as one pass over our text: training and inference match."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1

    tok = tokenizers["mistral"]

    class Pieces:  # mistral_common's Tokenizer interface: each piece encoded on its own
        bos_id, eos_id = tok.bos_token_id, tok.eos_token_id

        def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
            ids = tok(s, add_special_tokens=False)["input_ids"]
            return [self.bos_id] * bos + ids + [self.eos_id] * eos

        def decode(self, tokens: list[int], *args: Any, **kwargs: Any) -> str:
            return str(tok.decode(tokens))

        def get_special_token(self, s: str) -> int:
            return int(tok.convert_tokens_to_ids(s))

    reference: Any = InstructTokenizerV1(Pieces())  # type: ignore[arg-type]
    template = get_template("mistral", tok.eos_token)
    pairs = [(q.replace("<image>\n", ""), a) for q, a in CONVERSATION]
    for k in range(1, len(pairs) + 1):
        messages: list[Any] = []
        for q, a in pairs[:k]:
            messages += [UserMessage(content=q), AssistantMessage(content=a)]
        expected = reference.encode_instruct(InstructRequest(messages=messages))
        ours = tok(_text(template, _turns(pairs[:k])))["input_ids"]
        assert ours == expected.tokens
        prompt = reference.encode_instruct(
            InstructRequest(messages=[*messages, UserMessage(content="And its size?")])
        )
        assert tok(template.prompt(_turns(pairs[:k], "And its size?")))["input_ids"] == (
            prompt.tokens
        )
    # `<s> [INST] ` and ` [/INST]` as Mistral-7B-Instruct-v0.2 tokenises them
    assert ours[:4] == [1, 733, 16289, 28793]
    assert ours[ours.index(28748) - 1 : ours.index(28748) + 3] == [733, 28748, 16289, 28793]


def test_stop_and_eos_come_from_the_tokenizer() -> None:
    assert get_template("mistral", "</s>").stop == "</s>"
    assert get_template("mistral", "<eos>").stop == "<eos>"
    assert get_template("vicuna_v1", "<eos>").stop == "<eos>"
    assert get_template("llama3", "<|end_of_text|>").stop == "<|eot_id|>"
    assert get_template("chatml", "<|endoftext|>").stop == "<|im_end|>"
    phi3 = get_template("phi3", "<|endoftext|>")
    assert phi3.stop == "<|end|>"
    assert _text(phi3, _turns(CONVERSATION[:1])).endswith("<|end|>\n<|endoftext|>")
    assert get_template("phi3").render(_turns(CONVERSATION[:1]))[-1] == ("<|endoftext|>", False)


def test_unknown_template_names_the_key_and_every_registered_name() -> None:
    with pytest.raises(ConfigError, match=r"stage\.template.*'llama2'") as info:
        get_template("llama2")
    assert info.value.key == "stage.template"
    registered = available_templates()  # now: also templates added since this module's import
    for name in registered:
        assert name in str(info.value)
        assert get_template(name).name == name
    for name in registered:  # a typo gets the closest name
        with pytest.raises(ConfigError, match=f"did you mean '{name}'") as info:
            get_template(name[:-1] + "X", key="llm.template")
        assert info.value.key == "llm.template"


# --------------------------------------------------------------------------- LLM presets


def llm_options(*config_dirs: Path) -> list[str]:
    """The `llm` group's options as Hydra lists them (conf/ plus the extra config dirs)."""
    return group_options("llm", *config_dirs)


def _is_random_init(option: str) -> bool:
    preset = OmegaConf.load(conf_dir() / "llm" / f"{option}.yaml")
    return not preset.get("pretrained", False)  # type: ignore[arg-type]


LLM_OPTIONS = llm_options()
RANDOM_INIT = [o for o in LLM_OPTIONS if _is_random_init(o)]  # trainable on CPU, offline

# option: (name_or_path, template, parameters, architecture class, hidden, layers, heads,
#          kv heads, embedding rows, rope theta, tied embeddings)
PRESETS = {
    "vicuna7b": ("lmsys/vicuna-7b-v1.5", "vicuna_v1", 6.74e9, "Llama", 4096, 32, 32, 32, 32000),
    "vicuna13b": ("lmsys/vicuna-13b-v1.5", "vicuna_v1", 13.0e9, "Llama", 5120, 40, 40, 40, 32000),
    "llama3_8b": (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama3",
        8.03e9,
        "Llama",
        4096,
        32,
        32,
        8,
        128256,
    ),
    "mistral7b": (
        "mistralai/Mistral-7B-Instruct-v0.2",
        "mistral",
        7.24e9,
        "Mistral",
        4096,
        32,
        32,
        8,
        32000,
    ),
    "qwen2_0_5b": ("Qwen/Qwen2-0.5B-Instruct", "chatml", 0.494e9, "Qwen2", 896, 24, 14, 2, 151936),
    "qwen2_7b": ("Qwen/Qwen2-7B-Instruct", "chatml", 7.62e9, "Qwen2", 3584, 28, 28, 4, 152064),
    "phi3_mini": (
        "microsoft/Phi-3-mini-4k-instruct",
        "phi3",
        3.82e9,
        "Phi3",
        3072,
        32,
        32,
        32,
        32064,
    ),
}
ROPE_THETA = {
    "vicuna7b": 1e4,
    "vicuna13b": 1e4,
    "llama3_8b": 5e5,
    "mistral7b": 1e6,
    "qwen2_0_5b": 1e6,
    "qwen2_7b": 1e6,
    "phi3_mini": 1e4,
}


def test_every_pretrained_preset_has_its_published_numbers() -> None:
    """A preset of a real model is checked against its published shapes (PRESETS); a
    random-init one trains a stage instead (test_random_init_preset_trains_with_its_template)."""
    pretrained = {o for o in LLM_OPTIONS if not _is_random_init(o)}
    assert pretrained == set(PRESETS)
    assert RANDOM_INIT, "no random-init llm option: nothing trains offline"


@pytest.mark.parametrize("option", sorted(PRESETS))
def test_llm_preset_builds_the_real_shapes_on_meta(compose_cfg, option: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    name, template, params, arch, hidden, layers, heads, kv_heads, rows = PRESETS[option]
    cfg = compose_cfg(f"llm={option}")
    assert cfg.llm.name_or_path == cfg.llm.tokenizer.name_or_path == name
    assert cfg.llm.pretrained is True
    assert cfg.llm.template == template
    arch_numbers = OmegaConf.to_container(cfg.llm.config, resolve=True)
    assert isinstance(arch_numbers, dict)
    config = AutoConfig.for_model(**{str(k): v for k, v in arch_numbers.items()})
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    assert type(llm).__name__ == f"{arch}ForCausalLM"
    n = sum(p.numel() for p in llm.parameters())
    assert n == pytest.approx(params, rel=0.01)
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert llm.get_input_embeddings().num_embeddings == rows
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == ROPE_THETA[option]
    tied = option == "qwen2_0_5b"
    assert config.tie_word_embeddings is tied
    assert (llm.lm_head.weight is llm.get_input_embeddings().weight) is tied


@pytest.mark.parametrize("option", LLM_OPTIONS)
def test_preset_tokenizer_bos_agrees_with_its_template(compose_cfg, option: str) -> None:
    """A template that expects the tokenizer's BOS gets `add_bos_token: true` and vice versa:
    the silent all--100 bug comes from exactly this mismatch."""
    cfg = compose_cfg(f"llm={option}", "stage=2")
    assert cfg.stage.template == cfg.llm.template
    template = get_template(cfg.llm.template, key="llm.template")
    tokenizer_cfg = OmegaConf.to_container(cfg.llm.tokenizer)
    assert isinstance(tokenizer_cfg, dict)
    if str(tokenizer_cfg["name_or_path"]).startswith("pkg://"):  # bundled: load it and look
        tok = build_tokenizer({str(k): v for k, v in tokenizer_cfg.items()})
        assert (tok("x")["input_ids"][0] == tok.bos_token_id) is template.adds_bos
    else:
        assert tokenizer_cfg.get("add_bos_token", False) is template.adds_bos


@pytest.mark.parametrize("option", RANDOM_INIT)
def test_random_init_preset_trains_with_its_template(compose_cfg, option: str) -> None:
    """The preset composes, its tokenizer masks a conversation in its template correctly, and a
    stage-2 fit (the stage that uses `llm.template`) runs on it with a finite loss."""
    from vlmlab.train import train

    cfg = compose_cfg(
        f"llm={option}",
        "stage=2",
        "stage.init_from=null",
        "stage.evaluate=false",
        "logger=none",
        "trainer.max_steps=2",
    )
    assert cfg.stage.template == cfg.llm.template
    tok = build_tokenizer(OmegaConf.to_container(cfg.llm.tokenizer))  # type: ignore[arg-type]
    template = get_template(cfg.llm.template, tok.eos_token, key="llm.template")
    conversation = conversation_for(template)
    _check_template_masking(tok, template, conversation[:2], has_image=True)
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"])
