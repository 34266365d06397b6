"""Export tiny random-init vlmlab models and record transformers' greedy tokens for them.

Runs in the project venv (vlmlab + transformers 5.23). Writes, under OUT:
  llava/, llava_next/   the exported folders (Llava, and LlavaNext for AnyRes)
  images/*.png          the prompts' images
  reference.json        per model: prompts, chat messages, prompt ids and greedy tokens

The reference decodes greedily by plain argmax over the full sequence each step (no
`generate` heuristics such as EOS handling), so the other side only has to run greedy with EOS
ignored. The chat prompt ids come from the folder's processor `apply_chat_template` and must
equal the ids of the plain prompt (one BOS, then our training's text): that is the contract
vLLM's chat path is checked against.

    python tests/interop/export_tiny.py OUT [--new-tokens N] [--only llava|llava_next]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmlab.config import compose
from vlmlab.models import build_vlm
from vlmlab.models.hf_llava import export_hf_llava
from vlmlab.text.templates import Turn, get_template

MODELS = {"llava": ["encoder=tiny"], "llava_next": ["encoder=tiny", "encoder.image=anyres"]}
QUESTIONS = [
    "What colour is the shape?",
    "Describe the picture in one word.",
    "Is there a square?",
    "How many objects are there?",
    "Where is the circle?",
]
# non-square sizes: padding (Llava) and different AnyRes grids (1x3, 3x1, 2x2, 1x2) matter
SIZES = [(150, 60), (50, 130), (90, 90), (64, 64), (120, 45)]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _greedy(hf: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> list[int]:
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def export_one(kind: str, out: Path, images: list[Path], new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(MODELS[kind])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    template = get_template(cfg.llm.template, tokenizer.eos_token)
    folder = export_hf_llava(model, tokenizer, out / kind, template)
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    cases = []
    for question, path in zip(QUESTIONS, images, strict=True):
        image = Image.open(path).convert("RGB")
        prompt = template.prompt([Turn("human", f"<image>\n{question}")])
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        chat = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = inputs["input_ids"][0].tolist()
        if chat["input_ids"][0] != ids:
            raise SystemExit(f"{kind}: chat template ids differ from the prompt's for {question!r}")
        cases.append(
            {
                "question": question,
                "image": str(path),
                "prompt": prompt,
                "prompt_ids": ids,
                "tokens": _greedy(hf, dict(inputs), new_tokens),
            }
        )
    return {"folder": str(folder), "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--only", choices=list(MODELS), action="append", help="these models only")
    args = parser.parse_args()
    out: Path = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, size in enumerate(SIZES):
        path = out / "images" / f"{i}.png"
        _image(i, size).save(path)
        images.append(path)
    kinds = args.only or list(MODELS)
    reference = {kind: export_one(kind, out, images, args.new_tokens) for kind in kinds}
    (out / "reference.json").write_text(json.dumps(reference, indent=1))
    print(f"exported {sorted(reference)} to {out}")


if __name__ == "__main__":
    main()
