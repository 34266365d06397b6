"""Label masking: only assistant tokens are targets, `<image>` expands to M ignored tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import label_runs, mistral_sentencepiece_tokenizer, squash
from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import Turn, get_template

QUESTION = "What colour is the shape?"
THREE_TURNS = [
    ("<image>\nWhat colour is the shape?", "Red"),
    ("What shape is it?", "A circle."),
    ("Is it large or small?", "It is small and round."),
]


def _conv(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for question, answer in turns:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def _text_encoder(
    tokenizer: Any, template: str, num_image_tokens: int = 16, max_length: int = 4096
) -> TextEncoder:
    return TextEncoder(
        tokenizer=tokenizer,
        template=get_template(template, tokenizer.eos_token),
        image_tokens=num_image_tokens,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        max_length=max_length,
    )


def _check_vicuna(
    tokenizer: Any, encoder: TextEncoder, turns: list[tuple[str, str]], has_image: bool
) -> None:
    """The masking contract of vicuna_v1, for any Llama-style tokenizer."""
    out = encoder.encode(_conv(turns), has_image=has_image)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert len(ids) == len(labels)
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    # BOS first, never a target
    assert ids[0] == tokenizer.bos_token_id
    assert labels[0] == IGNORE_INDEX
    # <image>: exactly M contiguous copies, all ignored
    image_id, m = encoder.image_token_id, encoder.tokens_for().count
    image_pos = [i for i, t in enumerate(ids) if t == image_id]
    if has_image:
        assert len(image_pos) == m
        assert image_pos == list(range(image_pos[0], image_pos[0] + m))
        assert all(labels[i] == IGNORE_INDEX for i in image_pos)
    else:
        assert image_pos == []
    # a label is either ignored or the token itself
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels))
    target = [lab != IGNORE_INDEX for lab in labels]
    runs = label_runs(target)
    # one contiguous target run per assistant turn, each ending with EOS
    assert len(runs) == len(turns)
    eos = tokenizer.eos_token_id
    for (start, end), (_, answer) in zip(runs, turns):
        assert ids[end - 1] == eos
        run_text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        assert squash(run_text) == squash(answer + tokenizer.eos_token)
    assert sum(1 for t in ids if t == eos) == len(turns)  # every EOS is a target
    labelled = tokenizer.decode([lab for lab in labels if lab != IGNORE_INDEX])
    expected = "".join(f" {answer}{tokenizer.eos_token}" for _, answer in turns)
    assert squash(labelled) == squash(expected)
    # the prompt side (system, roles, questions) is all ignored
    context = tokenizer.decode(
        [t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX and t != image_id],
        skip_special_tokens=True,
    )
    assert "A chat between a curious user" in context
    assert context.count("USER:") == len(turns)
    assert context.count("ASSISTANT:") == len(turns)
    for question, _ in turns:
        assert squash(question.replace(IMAGE_TOKEN, "")) in squash(context)
    for _, answer in turns:
        assert squash(answer) not in squash(context)


# ----------------------------------------------------------------------------- tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, int]:
    """(tokenizer, M) of the default tiny VLM, built once per module like `tiny_model`."""
    from vlmlab.config import compose
    from vlmlab.models import build_vlm

    cfg = compose([f"paths.root={tmp_path_factory.mktemp('masking')}"])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    return tokenizer, model.num_image_tokens


def test_tiny_fixture_matches_tiny_model(tiny, tiny_model) -> None:
    tokenizer, m = tiny
    model, reference = tiny_model
    assert m == model.num_image_tokens == 16
    assert tokenizer.get_vocab() == reference.get_vocab()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.image_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"


@pytest.mark.parametrize(
    ("turns", "has_image"),
    [
        (THREE_TURNS[:1], True),
        (THREE_TURNS, True),
        ([(q.replace("<image>\n", ""), a) for q, a in THREE_TURNS], False),
        ([("Say a colour.", "Blue")], False),
    ],
    ids=["one-turn-image", "three-turns-image", "three-turns-text", "one-turn-text"],
)
def test_vicuna_masking_tiny_tokenizer(tiny, turns, has_image: bool) -> None:
    tokenizer, m = tiny
    _check_vicuna(tokenizer, _text_encoder(tokenizer, "vicuna_v1", m), turns, has_image)


def test_vicuna_image_position_and_length(tiny) -> None:
    """Expansion adds exactly M - 1 tokens compared with the unexpanded text."""
    tokenizer, m = tiny
    encoder = _text_encoder(tokenizer, "vicuna_v1", m)
    out = encoder.encode(_conv(THREE_TURNS[:1]), has_image=True)
    template = get_template("vicuna_v1", tokenizer.eos_token)
    turns = [Turn("human", THREE_TURNS[0][0]), Turn("gpt", THREE_TURNS[0][1])]
    text = "".join(piece for piece, _ in template.render(turns))
    raw = tokenizer(text)["input_ids"]
    assert raw.count(encoder.image_token_id) == 1
    assert len(out["input_ids"]) == len(raw) + m - 1
    first = out["input_ids"].tolist().index(encoder.image_token_id)
    assert first == raw.index(encoder.image_token_id)


def test_plain_template_labels_are_caption_and_newline(tiny) -> None:
    tokenizer, m = tiny
    encoder = _text_encoder(tokenizer, "plain", m)
    caption = "A small red circle on a white background."
    conv = _conv([("<image>\nDescribe the image.", caption)])
    out = encoder.encode(conv, has_image=True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    caption_ids = tokenizer(caption + "\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[1 : 1 + m] == [encoder.image_token_id] * m
    assert labels[: 1 + m] == [IGNORE_INDEX] * (1 + m)
    assert ids[1 + m :] == caption_ids  # the question is dropped, as in LLaVA's preprocess_plain
    assert labels[1 + m :] == caption_ids
    assert [lab for lab in labels if lab != IGNORE_INDEX] == caption_ids
    assert tokenizer.decode(caption_ids) == caption + "\n"


# ----------------------------------------------------------------------------- bad samples


def _reason(encoder: TextEncoder, conv: list[dict[str, str]], has_image: bool) -> str:
    with pytest.raises(BadSample) as info:
        encoder.encode(conv, has_image=has_image)
    return info.value.reason


def test_bad_samples_have_stable_reasons(tiny) -> None:
    tokenizer, m = tiny
    encoder = _text_encoder(tokenizer, "vicuna_v1", m)
    gpt_first = [{"from": "gpt", "value": "Red"}, {"from": "human", "value": "<image>\nColour?"}]
    assert _reason(encoder, gpt_first, True) == "wrong_role_order"
    ends_with_human = [*_conv([("<image>\nColour?", "Red")]), {"from": "human", "value": "And?"}]
    assert _reason(encoder, ends_with_human, True) == "wrong_role_order"
    assert _reason(encoder, [], False) == "empty_conversation"
    two_tags = _conv([("<image>\n<image>\nColour?", "Red")])
    as_is = TextEncoder(tokenizer, encoder.template, m, encoder.image_token_id, 4096, "as_is")
    assert _reason(as_is, two_tags, True) == "image_token_count"
    # vicuna_v1 places images as LLaVA's preprocess_multimodal does: the tags of one message
    # become one `<image>\n` in front of it
    assert encoder.image_placement == "front"
    assert encoder.encode(two_tags, True)["input_ids"].tolist() == (
        encoder.encode(_conv([("<image>\nColour?", "Red")]), True)["input_ids"].tolist()
    )
    tag_in_second_turn = _conv([("<image>\nColour?", "Red"), ("<image> again?", "Yes")])
    assert _reason(encoder, tag_in_second_turn, True) == "image_token_count"
    assert _reason(encoder, _conv([("<image>\nColour?", "Red")]), False) == "image_token_count"
    assert _reason(encoder, _conv([("Colour?", "Red")]), True) == "image_token_count"
    # the single-turn plain template cannot render a multi-turn sample
    plain = _text_encoder(tokenizer, "plain", m)
    assert _reason(plain, _conv(THREE_TURNS[:2]), True) == "template_mismatch"
    # the good versions of these samples encode
    assert encoder.encode(_conv([("<image>\nColour?", "Red")]), True)["labels"].ne(-100).any()
    assert encoder.encode(_conv([("Colour?", "Red")]), False)["labels"].ne(-100).any()


def test_truncation_reasons(tiny) -> None:
    tokenizer, m = tiny
    image_conv = _conv([("<image>\nWhat colour is the shape?", "Red")])
    text_conv = _conv([("What colour is the shape?", "Red")])
    full = _text_encoder(tokenizer, "vicuna_v1", m).encode(image_conv, True)
    labels = full["labels"].tolist()
    first_target = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    image_start = full["input_ids"].tolist().index(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    assert image_start + m < first_target
    # truncation inside the image tokens
    for max_length in (image_start + 1, image_start + m - 1):
        encoder = _text_encoder(tokenizer, "vicuna_v1", m, max_length=max_length)
        assert _reason(encoder, image_conv, True) == "too_long"
    # image intact but every answer token cut off
    encoder = _text_encoder(tokenizer, "vicuna_v1", m, max_length=first_target)
    assert _reason(encoder, image_conv, True) == "no_targets"
    text_full = _text_encoder(tokenizer, "vicuna_v1", m).encode(text_conv, False)["labels"]
    text_first_target = int(text_full.ne(IGNORE_INDEX).nonzero()[0])
    encoder = _text_encoder(tokenizer, "vicuna_v1", m, max_length=text_first_target)
    assert _reason(encoder, text_conv, False) == "no_targets"
    assert _reason(_text_encoder(tokenizer, "vicuna_v1", m, max_length=3), text_conv, False) == (
        "no_targets"
    )
    # one more token keeps the first target: the sample is kept, truncated
    kept = _text_encoder(tokenizer, "vicuna_v1", m, max_length=first_target + 1).encode(
        image_conv, True
    )
    assert len(kept["input_ids"]) == first_target + 1
    assert kept["labels"].tolist()[-1] == labels[first_target]
    assert kept["input_ids"].tolist().count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == m


# ----------------------------------------------------------------------------- real Llama SP


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tokenizer = mistral_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    # through vlmlab's own loader, configured like the vicuna7b preset
    saved = tmp_path_factory.mktemp("sp_saved")
    tokenizer.save_pretrained(saved)
    return build_tokenizer(
        {"name_or_path": str(saved), "use_fast": True, "add_bos_token": True, "pad_token": "<unk>"}
    )


def test_llama_tokenizer_has_image_token(llama_tokenizer) -> None:
    tok = llama_tokenizer
    assert len(tok) == 32001
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 32000
    assert tok.pad_token == "<unk>"
    ids = tok("USER: <image>\nHi")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert ids.count(32000) == 1  # <image> is one special token, never split
    assert tok.tokenize("Hello world") == ["▁Hello", "▁world"]


@pytest.mark.parametrize(
    ("turns", "has_image"),
    [
        (THREE_TURNS[:1], True),
        (THREE_TURNS, True),
        ([("Name a colour.", "Blue")], False),
    ],
    ids=["one-turn-image", "three-turns-image", "text-only"],
)
def test_vicuna_masking_llama_tokenizer(llama_tokenizer, turns, has_image: bool) -> None:
    encoder = _text_encoder(llama_tokenizer, "vicuna_v1", num_image_tokens=576)
    _check_vicuna(llama_tokenizer, encoder, turns, has_image)


def test_plain_masking_llama_tokenizer(llama_tokenizer) -> None:
    tok = llama_tokenizer
    encoder = _text_encoder(tok, "plain", num_image_tokens=576)
    caption = "A small red circle."
    out = encoder.encode(_conv([("<image>\nDescribe.", caption)]), has_image=True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert ids[0] == tok.bos_token_id
    assert ids[1:577] == [32000] * 576
    assert labels[:577] == [IGNORE_INDEX] * 577
    target = [lab for lab in labels if lab != IGNORE_INDEX]
    assert target == ids[577:]
    assert squash(tok.decode(target)) == squash(caption)
    assert tok.decode(target).endswith("\n")
