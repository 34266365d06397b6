"""The tokenizer LLaVA-1.5 trained with, as a reference: run by tests/test_sp_tokenizer.py with
the Python of a separate environment holding transformers 4.37.2 + sentencepiece (no torch,
no vlmlab). Reads one JSON request on stdin, writes one JSON list of results on stdout.

Request: {"folder": str, "add_image_token": bool, "jobs": [job, ...]} where a job is
  {"kind": "ids", "text": str, "add_special_tokens": bool, "split_special_tokens": bool}
    -> input_ids of `tokenizer(text, ...)`
  {"kind": "decode", "ids": [int, ...], "skip_special_tokens": bool} -> `tokenizer.decode(...)`
  {"kind": "v1" | "plain", "conversation": [{"from", "value"}, ...], "has_image": bool}
    -> {"input_ids", "labels", "zeroed"}: LLaVA's LazySupervisedDataset path for the
       vicuna_v1 / plain template, `preprocess_multimodal` then `preprocess_v1` /
       `preprocess_plain`.

The LLaVA parts are transcribed from haotian-liu/LLaVA (llava/train/train.py
`preprocess_multimodal`, `preprocess_v1`, `preprocess_plain`; llava/mm_utils.py `tokenizer_image_token`;
llava/conversation.py `conv_vicuna_v1`, SeparatorStyle.TWO) with lists in place of tensors,
because llava's modules import torch, which this environment does not need for tokenising.
The tokenizer is the real one: `AutoTokenizer.from_pretrained(folder, use_fast=False)`.
"""

from __future__ import annotations

import json
import sys

import tokenizers
import transformers
from packaging import version
from transformers import AutoTokenizer

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
IS_TOKENIZER_GREATER_THAN_0_14 = version.parse(tokenizers.__version__) >= version.parse("0.14")

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"


def get_prompt(messages: list[tuple[str, str]]) -> str:
    """conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO)."""
    seps = [SEP, SEP2]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py, verbatim but for return_tensors."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if (
        len(prompt_chunks) > 0
        and len(prompt_chunks[0]) > 0
        and prompt_chunks[0][0] == tokenizer.bos_token_id
    ):
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_multimodal(source: list[dict]) -> list[dict]:
    """llava/train/train.py preprocess_multimodal with mm_use_im_start_end=False."""
    for sentence in source:
        if DEFAULT_IMAGE_TOKEN in sentence["value"]:
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def preprocess_v1(source: list[dict], tokenizer, has_image: bool) -> dict:
    """llava/train/train.py preprocess_v1 for one conversation."""
    roles = {"human": ROLES[0], "gpt": ROLES[1]}
    if roles[source[0]["from"]] != ROLES[0]:
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ROLES[j % 2]
        messages.append((role, sentence["value"]))
    conversation = get_prompt(messages)
    if has_image:
        input_ids = tokenizer_image_token(conversation, tokenizer)
    else:
        input_ids = tokenizer(
            [conversation],
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        ).input_ids[0]
    target = list(input_ids)
    sep = SEP + ROLES[1] + ": "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = conversation.split(SEP2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not tokenizer.legacy and IS_TOKENIZER_GREATER_THAN_0_14:
            round_len -= 1
            instruction_len -= 1
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * max(end - cur_len, 0)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(len(target) - cur_len, 0)
    zeroed = False
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        target = [IGNORE_INDEX] * len(target)
        zeroed = True
    return {"input_ids": input_ids, "labels": target, "zeroed": zeroed}


def preprocess_plain(source: list[dict], tokenizer) -> dict:
    """llava/train/train.py preprocess_plain for one sample (conv_llava_plain: sep "\\n")."""
    assert len(source) == 2
    assert DEFAULT_IMAGE_TOKEN in source[0]["value"]
    source[0]["value"] = DEFAULT_IMAGE_TOKEN
    conversation = source[0]["value"] + source[1]["value"] + "\n"
    input_ids = tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    tokenized_len = len(tokenizer_image_token(source[0]["value"], tokenizer))
    target[:tokenized_len] = [IGNORE_INDEX] * min(tokenized_len, len(target))
    return {"input_ids": input_ids, "labels": target, "zeroed": False}


def main() -> None:
    request = json.load(sys.stdin)
    assert transformers.__version__ == "4.37.2", transformers.__version__
    tokenizer = AutoTokenizer.from_pretrained(request["folder"], use_fast=False)
    assert type(tokenizer).__name__ == "LlamaTokenizer", type(tokenizer)
    tokenizer.model_max_length = 2048  # LLaVA's training_args.model_max_length
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA's train.py for v1
    if request.get("add_image_token"):
        tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_IMAGE_TOKEN]})
    out = []
    for job in request["jobs"]:
        if job["kind"] == "decode":
            out.append(tokenizer.decode(job["ids"], skip_special_tokens=job["skip_special_tokens"]))
        elif job["kind"] == "ids":
            enc = tokenizer(
                job["text"],
                add_special_tokens=job["add_special_tokens"],
                split_special_tokens=job["split_special_tokens"],
            )
            out.append(enc["input_ids"])
        else:
            source = [dict(m) for m in job["conversation"]]
            if job["has_image"]:  # LazySupervisedDataset: only samples with an image
                source = preprocess_multimodal(source)
            if job["kind"] == "plain":
                out.append(preprocess_plain(source, tokenizer))
            else:
                out.append(preprocess_v1(source, tokenizer, job["has_image"]))
    json.dump({"legacy": tokenizer.legacy, "results": out}, sys.stdout)


if __name__ == "__main__":
    main()
