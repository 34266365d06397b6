"""Generation for any composed model: KV cache or not, greedy or sampled, left-padded batches.

`generate_ids` is the token loop; `Generator` turns conversations (+ images) into prompts with the
model's own chat template and stops on the template's end-of-reply text or the user's stop strings
(checked on the decoded text: a stop string may span several tokens or be part of one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.models.anyres import prepare_image
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IMAGE_PLACEHOLDER
from vlmlab.text.templates import Template, Turn
from vlmlab.visual import ImageSize


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt. temperature 0 = greedy; seed makes sampling reproducible."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    use_cache: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"got {self.max_new_tokens}.", "use 1 or more.")
        if self.temperature < 0:
            raise ConfigError("temperature", f"got {self.temperature}.", "use 0 (greedy) or more.")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"got {self.top_p}.", "use a value in (0, 1].")
        if self.top_k < 0:
            raise ConfigError("top_k", f"got {self.top_k}.", "use 0 (off) or more.")


def _left_pad(
    prompts: Sequence[torch.Tensor], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every row's last position real, so one step serves the whole batch."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, length - len(prompt) :] = prompt.to(device)
        attention_mask[i, length - len(prompt) :] = 1
    return input_ids, attention_mask


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row: argmax, or a sample from the top-k / nucleus-filtered distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p (the best one always stays)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: VisionLanguageModel,
    prompts: Sequence[torch.Tensor],
    pixel_values: torch.Tensor | None,
    config: GenerationConfig,
    pad_id: int,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    should_stop: Callable[[int, list[int]], bool] | None = None,
    image_sizes: Sequence[ImageSize] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (1-D ids, image tokens expanded); a stop token is not included.

    `pixel_values` holds the images of the rows that have `<image>` tokens, in row order
    (AnyRes: their tiles, concatenated), `image_sizes` their (width, height) (AnyRes needs it).
    `should_stop(row, ids)` ends a row after a token (e.g. when its text holds a stop string).
    """
    config.check()
    device = next(model.parameters()).device  # every tensor below is made on it
    input_ids, attention_mask = _left_pad(prompts, pad_id, device)
    if pixel_values is not None:  # the encoder computes in its own dtype (bf16 on a GPU)
        pixel_values = pixel_values.to(device=device, dtype=next(model.encoder.parameters()).dtype)
    embeds = model.embed(input_ids, pixel_values, image_sizes=image_sizes)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generator = None
    if config.temperature > 0 and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(config.seed))
    embed_tokens = model.llm.get_input_embeddings()
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past: Any = None
    step_input: dict[str, torch.Tensor] = {"inputs_embeds": embeds, "position_ids": position_ids}
    for _ in range(config.max_new_tokens):
        out = model.llm(
            **step_input,
            attention_mask=attention_mask,
            past_key_values=past,
            use_cache=config.use_cache,
        )
        past = out.past_key_values if config.use_cache else None
        next_ids = _pick(
            out.logits[:, -1].float(), config.temperature, config.top_k, config.top_p, generator
        )
        for i, token in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if token in stop_ids:
                done[i] = True
                continue
            generated[i].append(token)
            if should_stop is not None and should_stop(i, generated[i]):
                done[i] = True
        if all(done):
            break
        next_ids = next_ids.masked_fill(torch.tensor(done, device=device), pad_id)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        next_position = attention_mask.sum(-1, keepdim=True) - 1
        if config.use_cache:  # one new token per row; the cache holds the rest
            step_input = {"input_ids": next_ids[:, None], "position_ids": next_position}
        else:  # the whole sequence again: the reference the cached path must equal
            embeds = torch.cat([embeds, embed_tokens(next_ids)[:, None]], dim=1)
            position_ids = torch.cat([position_ids, next_position], dim=1)
            step_input = {"inputs_embeds": embeds, "position_ids": position_ids}
    return generated


def greedy_generate(
    model: VisionLanguageModel,
    prompts: list[torch.Tensor],
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Greedy with a KV cache (kept for callers of the original signature)."""
    return generate_ids(
        model,
        prompts,
        pixel_values,
        GenerationConfig(max_new_tokens=max_new_tokens),
        pad_id,
        stop_ids,
    )


@dataclass
class Request:
    """One conversation to continue; `image` goes with the `<image>` of its first human turn."""

    turns: list[Turn]
    image: Image.Image | None = None


@dataclass
class Generator:
    """Text in, text out for a model, its tokenizer, its chat template and image processor
    (`model.image_processor`: the encoder's transform, or AnyRes tiles)."""

    model: VisionLanguageModel
    tokenizer: Any
    template: Template
    image_transform: Callable[[Image.Image], torch.Tensor]
    text: TextEncoder = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextEncoder(
            self.tokenizer,
            self.template,
            self.model.image_token_counter(),
            self.model.image_token_id,
            max_length=1 << 30,  # prompts are not truncated; the LLM's limit applies
        )

    def stop_strings(self, extra: Sequence[str] = ()) -> tuple[str, ...]:
        """The template's end of reply plus the user's; empty strings dropped."""
        return tuple(s for s in (self.template.stop, *extra) if s)

    def _stop_ids(self, stops: Sequence[str]) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        vocab = self.tokenizer.get_vocab()
        ids |= {vocab[s] for s in stops if s in vocab}  # a stop that is one token stops on the id
        return ids

    def prompt_ids(self, request: Request) -> torch.Tensor:
        placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in request.turns)
        if placeholders != int(request.image is not None):
            raise ValueError(
                f"a request with {'an' if request.image else 'no'} image needs "
                f"{int(request.image is not None)} {IMAGE_PLACEHOLDER} in its turns, got {placeholders}"
            )
        image = self._prepared(request.image) if request.image is not None else None
        return self.text.encode_prompt(request.turns, image_size=image.size if image else None)

    def _prepared(self, image: Image.Image) -> Image.Image:
        """The image as training's data side hands it to the model's processor (`prepare_image`:
        16-bit modes keep their top 8 bits; AnyRes also applies the EXIF orientation, and the
        prepared size sets its token count; pad keeps LLaVA-1.5's pixels, unrotated)."""
        return prepare_image(image, orient=self.model.anyres is not None)

    def pixels(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor | None, list[ImageSize]]:
        """The batch's pixel_values (pad: stacked; AnyRes: tiles concatenated) and image sizes."""
        prepared = [self._prepared(image) for image in images]
        tensors = [self.image_transform(image) for image in prepared]
        if not tensors:
            return None, []
        batch = torch.cat([t if t.dim() == 4 else t[None] for t in tensors])
        return batch, [image.size for image in prepared]

    def _clean(self, ids: list[int], stops: Sequence[str]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            text = text[: min(cuts)]
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text.strip()

    def __call__(
        self, requests: Sequence[Request], config: GenerationConfig = GenerationConfig()
    ) -> list[str]:
        """Answers for a batch of requests (one forward per new token for the whole batch)."""
        if not requests:
            return []
        stops = self.stop_strings(config.stop)
        prompts = [self.prompt_ids(r) for r in requests]
        pixel_values, sizes = self.pixels([r.image for r in requests if r.image])

        def should_stop(_: int, ids: list[int]) -> bool:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            return any(s in text for s in stops)

        was_training = self.model.training
        self.model.eval()
        try:
            outputs = generate_ids(
                self.model,
                prompts,
                pixel_values,
                config,
                self.tokenizer.pad_token_id,
                self._stop_ids(stops),
                should_stop if stops else None,
                image_sizes=sizes or None,
            )
        finally:
            self.model.train(was_training)
        return [self._clean(ids, stops) for ids in outputs]
