"""Text from data and from chat users never becomes a control token (issue 13, item 2).

Every template of the registry, with a real tokenizer for it (tests/test_templates.py builds them
offline: the SentencePiece model of mistral_common for vicuna_v1/mistral, Phi-3's rstrip markers
on it, byte-level BPEs for llama3/chatml, the bundled tiny BPE with the markers for the others),
and every special token of that tokenizer put into a question or a reply: the sample is rejected
(`special_token_text`) or trains with that text as text; in both cases no control token comes
from the data and none is a target beyond the template's own. And a sample without such text
tokenises exactly as before (tests/pre13_tokenize.py, the encoder before this change), with
SentencePiece in both legacy modes.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests import pre13_tokenize as pre13
from tests.helpers import label_runs, mistral_sentencepiece_tokenizer, squash
from tests.test_official_masking import generate_conversations
from tests.test_templates import conversation_for, marker_tokenizer, tokenizer_for
from tests.test_templates import tokenizers as tokenizers  # a fixture, shared
from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import (
    DataText,
    Template,
    Turn,
    available_templates,
    get_template,
)

TEMPLATES = available_templates()
M = 3


def _encoder(tok: Any, template: Template, **options: Any) -> TextEncoder:
    return TextEncoder(tok, template, M, tok.convert_tokens_to_ids(IMAGE_TOKEN), 8192, **options)


def _conv(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [
        m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})
    ]


def _special_tokens(tok: Any) -> list[str]:
    """Every special token of the tokenizer (named ones and added special tokens)."""
    added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return sorted({*tok.all_special_tokens, *added})


def _outcome(encoder: TextEncoder, conv: list[dict[str, str]], has_image: bool) -> Any:
    try:
        out = encoder.encode(conv, has_image)
    except BadSample as err:
        return err.reason
    return out["input_ids"].tolist(), out["labels"].tolist(), out["image_tokens"]


# --------------------------------------------------------------------------- templates mark data


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_mark_each_turn_as_data(name: str) -> None:
    """The text of every turn a template renders is a DataText segment of its own (the encoder
    must know where data is); the template's own text never is."""
    template = get_template(name)
    pairs = [("Q1 question", "A1 reply"), ("Q2 question", "A2 reply")]
    try:
        segments = template.render(
            [Turn(r, t) for q, a in pairs for r, t in (("human", q), ("gpt", a))]
        )
    except ValueError:  # single-exchange templates
        pairs = pairs[:1]
        segments = template.render([Turn("human", pairs[0][0]), Turn("gpt", pairs[0][1])])
    data = [str(piece) for piece, _ in segments if isinstance(piece, DataText)]
    rendered = "".join(piece for piece, _ in segments)
    expected = [t for q, a in pairs for t in (q, a) if t in rendered]  # plain drops the question
    assert data == expected
    prompt = template.prompt_segments([Turn("human", "Q1 question")])
    assert "".join(p for p, _ in prompt) == template.prompt([Turn("human", "Q1 question")])
    assert not any(is_target for _, is_target in prompt)


# --------------------------------------------------------------------------- acceptance 2


def _variants(pairs: list[tuple[str, str]], special: str) -> list[list[tuple[str, str]]]:
    """The special token's text in the middle, at the start and at the end of the first reply,
    alone as a reply, and inside the first question."""
    (q, a), rest = pairs[0], pairs[1:]
    return [
        [(q, a[:2] + special + a[2:]), *rest],
        [(q, special + a), *rest],
        [(q, a + special), *rest],
        [(q, f" {special} "), *rest],
        [(q.replace("colour", f"col{special}our"), a), *rest],
    ]


@pytest.mark.parametrize("name", TEMPLATES)
def test_special_token_text_never_trains_a_control_token(
    tokenizers: dict[str, Any], name: str
) -> None:
    """Acceptance 2 of issue 13, over every template of the registry and every special token of
    its tokenizer, under both `data.special_text` policies."""
    tok = tokenizer_for(name, tokenizers)
    template = get_template(name, tok.eos_token)
    pairs = conversation_for(template)[:2]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    controls = {tok.convert_tokens_to_ids(s) for s in _special_tokens(tok)} - {image_id}
    clean = _encoder(tok, template).encode(_conv(pairs), True)
    clean_ids, clean_labels = clean["input_ids"].tolist(), clean["labels"].tolist()
    reject = _encoder(tok, template, special_text="reject")
    as_text = _encoder(tok, template, special_text="as_text")
    specials = _special_tokens(tok)
    assert IMAGE_TOKEN in specials and len(specials) >= 4
    outcomes: Counter[tuple[str | None, str]] = Counter()
    for special in specials:
        for sample in _variants(pairs, special):
            conv = _conv(sample)
            if special == IMAGE_TOKEN:  # beyond the counted one: rejected, or one image (front)
                for encoder in (reject, as_text):
                    out = _outcome(encoder, conv, True)
                    assert out in ("image_token_count", "image_token_position") or (
                        encoder.image_placement == "front" and out[0].count(image_id) == M
                    ), (special, sample)
                continue
            rendered = "".join(
                p for p, _ in template.render([Turn(m["from"], m["value"]) for m in conv])
            )
            for encoder in (reject, as_text):
                out = _outcome(encoder, conv, True)
                outcomes[encoder.special_text, out if isinstance(out, str) else "trains"] += 1
                if isinstance(out, str):
                    assert (encoder.special_text, out) == ("reject", "special_token_text")
                    continue
                assert encoder.special_text == "as_text" or special not in rendered
                ids, labels, _ = out
                for control in controls:  # exactly the template's own control tokens
                    assert ids.count(control) == clean_ids.count(control), (special, sample)
                    assert labels.count(control) == clean_labels.count(control), (special, sample)
                runs = label_runs([lab != IGNORE_INDEX for lab in labels])
                assert len(runs) == len(sample)
                for (start, end), (_, reply) in zip(runs, sample):
                    decoded = tok.decode(ids[start:end], skip_special_tokens=False)
                    assert squash(decoded) == squash(reply + template.stop), (special, sample)
    # reject rejects every sample whose rendered text holds the token; as_text trains them all
    assert outcomes["reject", "special_token_text"] > 0, outcomes
    assert outcomes["as_text", "special_token_text"] == 0, outcomes


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_text_never_becomes_a_control_token(tokenizers: dict[str, Any], name: str) -> None:
    """What `vlmlab chat` and eval send (`encode_prompt`): the user's text is text."""
    tok = tokenizer_for(name, tokenizers)
    template = get_template(name, tok.eos_token)
    encoder = _encoder(tok, template)
    image_id = encoder.image_token_id
    controls = {tok.convert_tokens_to_ids(s) for s in _special_tokens(tok)} - {image_id}
    for special in _special_tokens(tok):
        if special == IMAGE_TOKEN:
            continue
        turns = [
            Turn("human", f"<image>\nWhat {special}is it?"),
            Turn("gpt", f"A {special}"),
            Turn("human", f"{special} And?"),
        ]
        ids = encoder.encode_prompt(turns).tolist()
        assert ids.count(image_id) == M
        plain_ids = encoder.encode_prompt(
            [Turn(t.role, t.text.replace(special, "")) for t in turns]
        ).tolist()
        for control in controls:  # the special text adds none of them
            assert ids.count(control) == plain_ids.count(control), (special, control)


def test_chat_user_text_cannot_inject_control_tokens(tiny_model: Any) -> None:
    """`vlmlab chat`: `</s>`, `<s>`, `<unk>`, `<pad>` typed by the user are text in the prompt the
    model sees; `<image>` typed is refused (the chat places the image itself)."""
    from vlmlab.eval.chat import Conversation
    from vlmlab.eval.generate import GenerationConfig, Generator, Request

    model, tokenizer = tiny_model
    generator = Generator(
        model.eval(),
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.encoder.image_transform,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    chat = Conversation(generator, image, GenerationConfig(max_new_tokens=2))
    chat.ask("a</s>b<s>c<unk>d<pad>e")
    ids = generator.prompt_ids(Request(chat.turns[:1], image)).tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    for control in ("</s>", "<unk>", "<pad>"):
        assert tokenizer.convert_tokens_to_ids(control) not in ids, control
    assert "a</s>b<s>c<unk>d<pad>e" in tokenizer.decode(ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="<image>"):
        chat.ask("and this <image>?")
    assert len(chat.turns) == 2  # the refused question left no trace


# --------------------------------------------------------------------------- unchanged when clean


@pytest.fixture(scope="module")
def sp_legacy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("sp_legacy_true")
    mistral_sentencepiece_tokenizer(folder, legacy=True)
    return build_tokenizer({"name_or_path": str(folder), "add_bos_token": True, "legacy": True})


def _clean_cases(tok: Any, max_turns: int) -> list[Any]:
    specials = _special_tokens(tok)
    return [
        case
        for case in generate_conversations(300, max_turns, seed=1)
        if not any(s in m["value"] for s in specials for m in case.conv if s != IMAGE_TOKEN)
    ]


def _front(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA's preprocess_multimodal, written out: the data as the front placement sees it."""
    out = []
    for message in conv:
        value = message["value"]
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append({**message, "value": value})
    return out


def _only_stripping_markers(tok: Any, old: Any, new: Any) -> bool:
    """The masking fix that comes with this change: a marker that strips whitespace (phi3's
    `<|assistant|>`, rstrip) ate a reply's leading space, and the old encoder made the marker a
    target for it. Same ids; the labels differ only there, target before, -100 now."""
    if isinstance(old, str) or isinstance(new, str) or old[0] != new[0] or old[2] != new[2]:
        return False
    ids, old_labels, new_labels = old[0], old[1], new[1]
    changed = [i for i, (a, b) in enumerate(zip(old_labels, new_labels)) if a != b]
    stripping = {i for i, t in tok.added_tokens_decoder.items() if t.rstrip or t.lstrip}
    return bool(changed) and all(
        ids[i] in stripping and old_labels[i] == ids[i] and new_labels[i] == IGNORE_INDEX
        for i in changed
    )


def _old(encoder: Any, conv: list[dict[str, str]], has_image: bool) -> Any:
    try:
        out = encoder.encode(conv, has_image)
    except pre13.BadSample as err:
        return err.reason
    return out["input_ids"].tolist(), out["labels"].tolist(), out["image_tokens"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_samples_without_special_text_tokenise_as_before(
    tokenizers: dict[str, Any], sp_legacy: Any, name: str
) -> None:
    """New path == the pre-issue-13 encoder (ids, labels, image counts or the BadSample reason)
    on generated conversations without special-token text, with the template's tokenizer (phi3:
    rstrip markers; SentencePiece: `▁` after a control token), SentencePiece with legacy=true and
    the bundled tiny BPE; both special_text policies; `as_is`, and `front` against the old path
    on data placed as LLaVA places it. The one intended difference: _only_stripping_markers."""
    template = get_template(name)
    max_turns = len(conversation_for(template))
    counts: dict[str, tuple[int, int, int]] = {}
    for tok in (tokenizer_for(name, tokenizers), sp_legacy, marker_tokenizer(template)):
        template = get_template(name, tok.eos_token)
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        old = pre13.TextEncoder(tok, template, M, image_id, 8192)
        new = [
            _encoder(tok, template, image_placement=placement, special_text=policy)
            for placement in ("as_is", "front")
            for policy in ("reject", "as_text")
        ]
        cases = _clean_cases(tok, max_turns)
        assert len(cases) >= 200
        trained = fixed = 0
        for case in cases:
            expected = _old(old, case.conv, case.has_image)
            trained += not isinstance(expected, str)
            placed = _front(case.conv) if case.has_image else case.conv
            expected_front = _old(old, placed, case.has_image)
            for encoder in new:
                want = expected if encoder.image_placement == "as_is" else expected_front
                got = _outcome(encoder, case.conv, case.has_image)
                if got != want:
                    assert _only_stripping_markers(tok, want, got), (name, case)
                    fixed += 1
        counts[tok.name_or_path.rsplit("/", 1)[-1]] = trained, len(cases), fixed
    logging.getLogger(__name__).info("%s: (trained, compared, fixed) %s", name, counts)
    assert sum(t for t, _, _ in counts.values()) >= 300, counts  # not only rejections compared
    assert all(f == 0 for t, _, f in counts.values()) or name == "phi3", counts


def test_placement_and_policy_are_checked() -> None:
    tok = marker_tokenizer(get_template("vicuna_v1"))
    with pytest.raises(ConfigError, match=r"data\.image_placement"):
        _encoder(tok, get_template("vicuna_v1"), image_placement="back")
    with pytest.raises(ConfigError, match=r"data\.special_text"):
        _encoder(tok, get_template("vicuna_v1"), special_text="keep")
    defaults = {
        n: (get_template(n).image_placement, get_template(n).special_text) for n in TEMPLATES
    }
    assert defaults["vicuna_v1"] == defaults["plain"] == ("front", "reject")  # LLaVA's dataset
    for n in ("llama3", "chatml", "mistral", "phi3"):
        assert defaults[n] == ("as_is", "as_text")  # HF processors keep the tag where it stands


class _Unmarked(Template):
    """A template from outside vlmlab that marks no DataText."""

    name = "unmarked"

    def render(self, turns: list[Turn]) -> list[tuple[str, bool]]:
        return [
            (f"Q: {t.text}\nA:", False) if t.role == "human" else (f" {t.text}</s>", True)
            for t in turns
        ]


def test_template_without_data_marks_rejects_special_text() -> None:
    tok = marker_tokenizer(get_template("vicuna_v1"))
    encoder = _encoder(tok, _Unmarked())
    assert encoder.encode(_conv([("Hi", "Hello")]), False)["labels"].ne(IGNORE_INDEX).any()
    with pytest.raises(BadSample) as info:
        encoder.encode(_conv([("Hi", "Hel</s>lo")]), False)
    assert info.value.reason == "special_token_text"
    with pytest.raises(ValueError, match="special_token_text"):  # a prompt: the chat reports it
        encoder.encode_prompt([Turn("human", "Hi</s>")])


def test_the_data_keys_reach_training(compose_cfg: Any) -> None:
    """`data.image_placement` / `data.special_text` are what the stage's TextEncoder uses."""
    from vlmlab.train import train

    with pytest.raises(ConfigError, match=r"data\.special_text"):
        train(compose_cfg("data.special_text=escape", "logger=none"))
    with pytest.raises(ConfigError, match=r"data\.image_placement"):
        train(compose_cfg("data.image_placement=back", "logger=none"))
