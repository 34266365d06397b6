"""The SentencePiece backend (`llm.tokenizer.backend: sentencepiece`) against the tokenizer
LLaVA-1.5 trained with: transformers 4.37.2's slow `LlamaTokenizer`, run in its own
environment (tests/sp_reference.py) on the same Vicuna-style folder (tokenizer.model +
tokenizer_config.json, the mistral-common 32K model of the Llama-2 family).

The reference environment is built once under ~/.cache/vlmlab-tests/tf437 (about 20 s from
the pip mirror; `VLMLAB_TF437_ENV` points elsewhere) and reused: the test never skips.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from vlmlab.data.tokenize import BadSample, TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.llm import build_tokenizer
from vlmlab.models.sp_tokenizer import SentencePieceTokenizer
from vlmlab.text import IGNORE_INDEX, IMAGE_TOKEN
from vlmlab.text.templates import get_template

REFERENCE = Path(__file__).with_name("sp_reference.py")
REF_ENV = Path(
    os.environ.get("VLMLAB_TF437_ENV", Path.home() / ".cache" / "vlmlab-tests" / "tf437")
)
REF_PACKAGES = ["transformers==4.37.2", "sentencepiece==0.2.3", "protobuf<5"]
N_STRINGS = 5000
N_CONVERSATIONS = 1200
IMAGE_TOKEN_INDEX = -200  # LLaVA's id for the image slot


def _reference_python() -> Path:
    """The reference environment's python, built on first use (atomically: a half-built
    environment is never reused)."""
    python = REF_ENV / "bin" / "python"
    if (REF_ENV / "READY").is_file():
        return python
    building = REF_ENV.with_name(f"{REF_ENV.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
    subprocess.run(
        [str(building / "bin" / "pip"), "install", "-q", *REF_PACKAGES],
        check=True,
        timeout=900,
    )
    (building / "READY").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    if (REF_ENV / "READY").is_file():  # another session finished first: use that one
        shutil.rmtree(building, ignore_errors=True)
        return python
    shutil.rmtree(REF_ENV, ignore_errors=True)  # a half-built leftover
    building.rename(REF_ENV)  # venv scripts use absolute paths: call bin/python, not bin/pip
    return python


def reference(folder: Path, jobs: list[dict[str, Any]], add_image_token: bool) -> dict[str, Any]:
    """Run tests/sp_reference.py in the reference environment."""
    request = {"folder": str(folder), "add_image_token": add_image_token, "jobs": jobs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(_reference_python()), str(REFERENCE)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def vicuna_style_folder(folder: Path, legacy: bool | None) -> Path:
    """tokenizer.model + tokenizer_config.json only, as the Vicuna v1.5 repositories ship."""
    folder.mkdir(parents=True, exist_ok=True)
    model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    (folder / "tokenizer.model").write_bytes(model.read_bytes())

    def added(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False,
                "normalized": False, "rstrip": False, "single_word": False}  # fmt: skip

    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": added("<unk>"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "not_legacy"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vicuna_style_folder(tmp_path_factory.mktemp("vicuna_tok"), legacy=request.param)


WORDS = ["hello", "world", "The", "cat", "a", "b", "USER:", "ASSISTANT:", "What", "is", "this?",
         "2+2", "x=1", "don't", "e.g.", "(a)", "[1]", "#", "http://a.b/c", "OCR", "TextCaps",
         "déjà", "vu", "naïve", "Größe", "日本語", "中文", "한국어", "🙂", "👍🏽", "Ω", "ﬁ", "\u210c",
         "e\u0301", "\u00a0", "\u3000", "▁", "▁▁x", "</s>", "<s>", "<unk>", "<image>",
         "<|im_end|>", "[INST]", "<0x0A>", "<<SYS>>"]  # fmt: skip
SPACES = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\n ", "\t ", "\r\n", ""]


def generated_strings(n: int, seed: int = 0) -> list[str]:
    """Words and whitespace mixed: repeated, leading and trailing spaces, tabs, newlines,
    unicode (combining marks, CJK, emoji, byte-fallback), special-token and marker text."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "a  b", "  leading", "trailing  ", " USER: hi", "a</s>b", "\n", "▁"]
    while len(out) < n:
        parts = [rng.choice(SPACES) if rng.random() < 0.3 else ""]
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(SPACES))
        if rng.random() < 0.5:
            parts.pop()
        out.append("".join(parts))
    return out


def _sp(folder: Path) -> Any:
    return build_tokenizer(
        {"name_or_path": str(folder), "backend": "sentencepiece", "pad_token": "<unk>"}
    )


def test_vicuna_style_folder_loads_with_both_backends(folder: Path) -> None:
    """Acceptance 5: tokenizer.model + tokenizer_config.json only load after the install
    (without the `sentencepiece` package transformers 5 falls back to tiktoken and fails)."""
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    sp = _sp(folder)
    auto = build_tokenizer({"name_or_path": str(folder), "add_bos_token": True})
    assert isinstance(sp, SentencePieceTokenizer)
    assert not isinstance(auto, SentencePieceTokenizer)
    legacy = json.loads((folder / "tokenizer_config.json").read_text())["legacy"]
    assert sp.legacy is legacy
    for tok in (sp, auto):
        ids = tok("Hello world")["input_ids"]
        assert ids[0] == tok.bos_token_id == 1 and len(ids) == 3
        assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == 32000 == len(tok) - 1
        assert tok.eos_token_id == 2 and tok.pad_token == "<unk>"


def test_differential_against_transformers_437(folder: Path) -> None:
    """Acceptance 5: ids equal 4.37.2's slow LlamaTokenizer on 5,000 generated strings, with
    and without BOS and with `split_special_tokens`, and so does decoding; the fast (auto)
    backend differs on them."""
    texts = generated_strings(N_STRINGS)
    sp = _sp(folder)
    jobs = [
        {"kind": "ids", "text": t, "add_special_tokens": True, "split_special_tokens": False}
        for t in texts
    ] + [
        {"kind": "ids", "text": t, "add_special_tokens": False, "split_special_tokens": True}
        for t in texts[:1000]
    ]
    ref = reference(folder, jobs, add_image_token=True)
    assert ref["legacy"] is sp.legacy
    ours = [
        sp(j["text"], add_special_tokens=j["add_special_tokens"],
           split_special_tokens=j["split_special_tokens"])["input_ids"]
        for j in jobs
    ]  # fmt: skip
    wrong = [(j["text"], o, r) for j, o, r in zip(jobs, ours, ref["results"]) if o != r]
    assert not wrong, f"{len(wrong)} of {len(jobs)} differ, e.g. {wrong[:3]}"
    # decoding (generation output) as 4.37 decodes, special tokens kept or skipped
    decode = [{"kind": "decode", "ids": ids, "skip_special_tokens": skip}
              for ids in ours[:1000] for skip in (False, True)]  # fmt: skip
    texts_back = reference(folder, decode, add_image_token=True)["results"]
    got = [sp.decode(j["ids"], skip_special_tokens=j["skip_special_tokens"]) for j in decode]
    wrong = [(j["ids"], g, r) for j, g, r in zip(decode, got, texts_back) if g != r]
    assert not wrong, f"{len(wrong)} of {len(decode)} decode differently, e.g. {wrong[:3]}"
    # offsets: one pair per id, inside the text, never going back
    for text in texts[:1000]:
        enc = sp(text, return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
        ends = [e for _, e in enc["offset_mapping"]]
        assert ends == sorted(ends) and all(0 <= s <= e <= len(text) for s, e in
                                            enc["offset_mapping"])  # fmt: skip
    # the default backend (transformers 5, BPE merges from tokenizer.model) is not the reference
    auto = build_tokenizer({"name_or_path": str(folder), "add_bos_token": True})
    differ = same = 0
    for text, want in zip(texts, ref["results"]):
        fast = auto(text, return_offsets_mapping=True)
        if fast["input_ids"] != want:
            differ += 1
            continue
        # where the ids agree, so do the offsets (the label masking reads them): byte-fallback
        # pieces get their whole character, a lone dummy-prefix `▁` the character after it
        enc = sp(text, return_offsets_mapping=True)
        assert [tuple(o) for o in fast["offset_mapping"]] == enc["offset_mapping"], text
        same += 1
    print(f"legacy={sp.legacy}: backend auto differs on {differ} of {N_STRINGS} strings")
    assert differ > N_STRINGS // 5 and same > N_STRINGS // 5, (differ, same)


def generated_conversations(
    n: int, seed: int = 1, plain: bool = False
) -> list[tuple[list[dict[str, str]], bool]]:
    """LLaVA-style samples (the tag already where `preprocess_multimodal` puts it), 1-3 rounds,
    double spaces, tabs, newlines, unicode and whitespace at the ends of later messages.
    No special-token text (how data text with `</s>` is encoded is the template's decision)
    and no role names (`ASSISTANT:` in a message makes LLaVA mis-mask): those are the masking
    tests' subject, the tokenizer is this one's."""
    rng = random.Random(seed)
    drop = ("</s>", "<s>", "<unk>", "<image>", "▁", "▁▁x", "USER:", "ASSISTANT:")
    words = [w for w in WORDS if w not in drop]

    def message(edges: bool) -> str:
        parts = []
        for _ in range(rng.randint(1, 10)):
            parts += [rng.choice(words), rng.choice(SPACES[:-1])]
        text = "".join(parts[:-1])
        if not text.strip():
            return message(edges)
        if edges and rng.random() < 0.3:
            text = rng.choice(SPACES[:-1]) + text
        if edges and rng.random() < 0.3:
            text += rng.choice(SPACES[:-1])
        return text

    out = []
    for _ in range(n):
        has_image = plain or rng.random() < 0.7
        turns = []
        for r in range(1 if plain else rng.randint(1, 3)):
            question = message(edges=r > 0)
            if r == 0:
                question = question.strip() or "x"
                if has_image:
                    question = "<image>\n" + question
            turns += [{"from": "human", "value": question},
                      {"from": "gpt", "value": message(edges=True)}]  # fmt: skip
        out.append((turns, has_image))
    return out


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_conversation_masking_equals_llava_with_437_tokenizer(folder: Path, template: str) -> None:
    """Acceptance 5 through the masking path: TextEncoder ids (and labels where LLaVA keeps the
    sample) equal LLaVA's preprocess_multimodal + preprocess_v1 / preprocess_plain running with
    the 4.37 tokenizer. The LLaVA code is transcribed into tests/sp_reference.py (llava's
    modules import torch, which the reference environment does without)."""
    sp = _sp(folder)
    image_id = sp.convert_tokens_to_ids(IMAGE_TOKEN)
    encoder = TextEncoder(sp, get_template(template, sp.eos_token), 1, image_id, 1 << 20)
    plain = template == "plain"
    samples = generated_conversations(N_CONVERSATIONS, plain=plain)
    kind = "plain" if plain else "v1"
    jobs = [{"kind": kind, "conversation": c, "has_image": h} for c, h in samples]
    ref = reference(folder, jobs, add_image_token=False)["results"]
    compared = zeroed = rejected = 0
    for (conversation, has_image), want in zip(samples, ref):
        try:
            got = encoder.encode(conversation, has_image)
        except BadSample as err:
            assert err.reason == "tokenization_mismatch", err
            rejected += 1
            continue
        ids = [IMAGE_TOKEN_INDEX if t == image_id else t for t in got["input_ids"].tolist()]
        assert ids == want["input_ids"], conversation
        if want["zeroed"]:
            zeroed += 1
            continue
        labels = got["labels"].tolist()
        assert labels == want["labels"], (conversation, labels, want["labels"])
        assert any(t != IGNORE_INDEX for t in labels)
        compared += 1
    print(f"{template} legacy={sp.legacy}: {compared} equal, {zeroed} zeroed, {rejected} rejected")
    assert compared >= 1000
    # the default backend trains on other ids for the same samples
    auto = build_tokenizer({"name_or_path": str(folder), "add_bos_token": True})
    fast = TextEncoder(auto, encoder.template, 1, auto.convert_tokens_to_ids(IMAGE_TOKEN), 1 << 20)
    differ = 0
    for (conversation, has_image), want in zip(samples, ref):
        try:
            ids = fast.encode(conversation, has_image)["input_ids"].tolist()
        except BadSample:
            differ += 1
            continue
        differ += [IMAGE_TOKEN_INDEX if t == image_id else t for t in ids] != want["input_ids"]
    print(f"{template} legacy={sp.legacy}: backend auto differs on {differ} of {len(samples)}")
    assert differ > len(samples) // 10


def test_missing_model_file_or_package_is_a_config_error(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"llm\.tokenizer\.backend.*no tokenizer\.model"):
        build_tokenizer({"name_or_path": str(tmp_path), "backend": "sentencepiece"})
    with pytest.raises(ConfigError, match=r"llm\.tokenizer\.backend.*'spm'"):
        build_tokenizer({"name_or_path": str(folder), "backend": "spm"})
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install sentencepiece"):
        build_tokenizer({"name_or_path": str(folder), "backend": "sentencepiece"})


def test_saved_folder_reloads_with_the_backend(folder: Path, tmp_path: Path) -> None:
    """save_pretrained (checkpoint tokenizer, HF export) records the backend: `auto` reloads
    the same tokenizer, not transformers 5's BPE reading of tokenizer.model."""
    sp = _sp(folder)
    sp.save_pretrained(tmp_path)
    again = build_tokenizer({"name_or_path": str(tmp_path)})
    assert isinstance(again, SentencePieceTokenizer)
    assert (again.legacy, again.add_bos_token, len(again)) == (sp.legacy, True, len(sp))
    text = "a  b\n\n  <image>\tc  "
    assert again(text)["input_ids"] == sp(text)["input_ids"]
    # DataLoader workers started with spawn receive it pickled
    assert pickle.loads(pickle.dumps(sp))(text)["input_ids"] == sp(text)["input_ids"]
    decoded = again.decode(sp("héllo 🙂  wörld")["input_ids"], skip_special_tokens=True)
    assert decoded == "héllo 🙂  wörld"


def test_hf_export_keeps_the_backend(tmp_path: Path) -> None:
    """An HF Llava export of a model trained with the backend holds tokenizer.model and says
    `backend: sentencepiece`: import (load_hf_llava) and template detection (eval loading)
    reload the SentencePiece tokenizer, not transformers 5's BPE reading of the same file."""
    from vlmlab.config import compose
    from vlmlab.eval.loading import detect_hf_template
    from vlmlab.models import build_vlm
    from vlmlab.models.hf_llava import export_hf_llava, load_hf_llava

    folder = vicuna_style_folder(tmp_path / "tok", legacy=False)
    cfg = compose(
        ["encoder=tiny", f"llm.tokenizer.name_or_path={folder}",
         "+llm.tokenizer.backend=sentencepiece", "+llm.tokenizer.add_bos_token=true"]
    )  # fmt: skip
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    out = export_hf_llava(model, tokenizer, tmp_path / "hf", get_template("vicuna_v1", "</s>"))
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.model").is_file() and saved["backend"] == "sentencepiece"
    assert saved["tokenizer_class"] == "LlamaTokenizer" and saved["legacy"] is False
    _, again = load_hf_llava(out)
    assert isinstance(again, SentencePieceTokenizer) and len(again) == len(tokenizer)
    text = "USER:  two  spaces\n\n  ASSISTANT: ok"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert detect_hf_template(out) == "vicuna_v1"
