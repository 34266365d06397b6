"""Greedy generation with a KV cache for any composed model (left-padded batches)."""

from __future__ import annotations

import torch

from vlmlab.models.vlm import VisionLanguageModel


@torch.no_grad()
def greedy_generate(
    model: VisionLanguageModel,
    prompts: list[torch.Tensor],
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Continue each prompt (1-D ids, image tokens expanded) greedily; returns new ids per prompt."""
    device = next(model.parameters()).device
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):  # left padding keeps the last position real for every row
        input_ids[i, length - len(prompt) :] = prompt.to(device)
        attention_mask[i, length - len(prompt) :] = 1
    embeds = model.embed(input_ids, pixel_values.to(device) if pixel_values is not None else None)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model.llm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
    )
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)  # (B,)
        for i, token in enumerate(next_ids.tolist()):
            if not done[i]:
                if token in stop_ids:
                    done[i] = True
                else:
                    generated[i].append(token)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = attention_mask.sum(-1, keepdim=True) - 1
        out = model.llm(
            input_ids=next_ids[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return generated
