"""The VisionLanguageModel: embed -> encode -> project -> scatter -> decode.

The tokenizer has already expanded each `<image>` into as many copies of the image token as the
vision side reports for that image (`image_token_counter`, the transformers Llava convention), so
scattering is an assignment of each image's embeddings, in order, to the image-token slots.

Training (labels given) never builds the (B, T, V) logits: the decoder's hidden states of the
target positions go through the output head and the fp32 cross-entropy in checkpointed chunks,
so only one chunk's logits exist at a time, in forward and in backward (`chunked_token_loss`).
At a 128k vocabulary the full logits of a 16 x 2048 micro-batch and their fp32 copies would
take 60-70 GB. Without labels (eval, generation, logit-equality tests) the full logits come back
as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmlab.models.anyres import AnyResImages, AnyResTokens, pack_tile_features
from vlmlab.models.contracts import Connector, LanguageModel, VisionEncoder
from vlmlab.text.labels import target_positions
from vlmlab.visual import FixedImageTokens, ImageSize, ImageTokenCounter, ImageTokens

log = logging.getLogger(__name__)

# Causal LMs whose `forward` is exactly `lm_head(decoder(...).last_hidden_state)` (plus Gemma's
# final logit soft-capping, applied here), checked against transformers 5.23. Any other LLM
# takes the full-logits path: its head may scale the logits (Cohere, Granite) or do more.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "starcoder2",
        "stablelm",
    }
)
DEFAULT_LOSS_CHUNK_SIZE = 1024  # target tokens per chunk: 0.5 GB of fp32 logits at V = 128k


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the loss was computed from target positions only
    num_target_tokens: int


ImageEmbeds = torch.Tensor | Sequence[torch.Tensor]  # (K, M, D), or K tensors (M_k, D)


def image_counts(image_embeds: ImageEmbeds) -> list[int]:
    """Embeddings per image, read from shapes (no device sync)."""
    if isinstance(image_embeds, torch.Tensor):
        return [int(image_embeds.shape[1])] * int(image_embeds.shape[0])
    return [int(e.shape[0]) for e in image_embeds]


def _sample_name(row: int, sample_ids: Sequence[Any] | None) -> str:
    if sample_ids is not None and row < len(sample_ids):
        return f"sample {sample_ids[row]!r} (batch row {row})"
    return f"batch row {row}"


def _tokens_text(counts: Sequence[int]) -> str:
    """`K images x M tokens`, or the per-image list when the counts differ."""
    shown = str(counts[0]) if len(set(counts)) == 1 else str(list(counts))
    return f"{len(counts)} images x {shown} tokens"


def _row_of_image(slots: list[int], counts: Sequence[int], k: int) -> int:
    """Batch row holding image k, given each image's count of slots."""
    start = sum(counts[:k])
    for row, end in enumerate(accumulate(slots)):
        if start < end:
            return row
    return len(slots) - 1


def _slot_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(row, length) of every contiguous run of image-token slots in a (B, T) host mask, in
    batch order: one run per image, as the text side expands each `<image>` in place (two
    adjacent images would merge into one run)."""
    edges = F.pad(mask.to(torch.int8), (1, 1)).diff(dim=1)  # +1 where a run starts, -1 after
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()  # row-major order
    return list(zip(starts[:, 0].tolist(), (ends[:, 1] - starts[:, 1]).tolist()))


def _mismatch(
    is_image: torch.Tensor,
    counts: list[int],
    declared: Sequence[int] | None,
    sample_ids: Sequence[Any] | None,
) -> str | None:
    """Why the image-token slots and the image embeddings disagree, naming the first sample;
    None when they agree. Reads the slot mask on the host (one device sync). Images belong to
    rows in order (collate stacks the images of the samples that have them, in row order)."""
    hint = (
        "The text was tokenised for another vision side (encoder, connector or image size) than "
        "the model's: build the TextEncoder with the model's image_token_counter()."
    )
    mask = is_image.cpu()
    slots = [int(n) for n in mask.sum(1).tolist()]
    if declared is not None and list(declared) != counts:
        if len(declared) != len(counts):
            return f"the text side expanded {len(declared)} images but {len(counts)} were encoded."
        k = next(i for i, (a, b) in enumerate(zip(declared, counts)) if a != b)
        row = _row_of_image(slots, declared, k)
        return (
            f"{_sample_name(row, sample_ids)}: its image (image {k} of the batch) has "
            f"{declared[k]} image tokens in the text but {counts[k]} embeddings were encoded. "
            f"{hint}"
        )
    runs = _slot_runs(mask)
    if len(runs) != len(counts):  # adjacent images share a run: check each row's total
        k = 0
        for row, n in enumerate(slots):
            got = 0
            while got < n and k < len(counts):
                got, k = got + counts[k], k + 1
            if got != n:
                return (
                    f"{_sample_name(row, sample_ids)} holds {n} image tokens but its images "
                    f"gave {got} embeddings. {hint}"
                )
        return (
            f"input_ids hold {sum(slots)} image tokens but {_tokens_text(counts)} were encoded: "
            f"{len(counts) - k} images have no <image> tokens in the text."
            if k != len(counts)
            else None
        )
    for k, ((row, length), count) in enumerate(zip(runs, counts)):
        if length != count:
            return (
                f"{_sample_name(row, sample_ids)} holds {length} image tokens but "
                f"{_tokens_text([count])} were encoded for it (image {k} of the batch). {hint}"
            )
    return None


def scatter_image_embeds(
    embeds: torch.Tensor,
    is_image: torch.Tensor,
    image_embeds: ImageEmbeds,
    image_index: torch.Tensor | None = None,
    image_tokens: Sequence[int] | None = None,
    sample_ids: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Put each image's embeddings into its own `<image>` slots, for any count per image.

    embeds (B, T, D); is_image (B, T) marks the slots; image_embeds holds the batch's images in
    row order: (K, M, D) when every image gives M, or K tensors (M_k, D) when counts differ.
    Without `image_index` the slot mask is read on the host (one sync) and every image is
    checked against its own run of slots. With `image_index` (flat b*T + p of the slots) and `image_tokens` (per-image
    counts the text side expanded), both from `collate`, the check reads only shapes and host
    lists: no device sync. A mismatch raises a ValueError naming the sample.
    """
    counts = image_counts(image_embeds)
    if image_index is None:
        problem = _mismatch(is_image, counts, image_tokens, sample_ids)
    elif image_index.numel() != sum(counts) or (
        image_tokens is not None and list(image_tokens) != counts
    ):
        problem = _mismatch(is_image, counts, image_tokens, sample_ids) or (  # error path only
            f"image_index holds {image_index.numel()} slots but the images gave {sum(counts)} "
            "embeddings."
        )
    else:
        problem = None
    if problem is not None:
        raise ValueError(problem)
    width = embeds.shape[-1]
    if isinstance(image_embeds, torch.Tensor):
        flat_images = image_embeds.reshape(-1, width)
    else:
        flat_images = torch.cat([e.reshape(-1, width) for e in image_embeds])
    flat_images = flat_images.to(embeds.dtype)
    if image_index is None:
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat_images)
    flat = embeds.reshape(-1, width).index_copy(0, image_index, flat_images)
    return flat.view_as(embeds)


def _token_loss_sum(
    head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_token_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum over rows of CE(head(hidden).float(), targets), `chunk_size` rows at a time.

    Under autograd each chunk is checkpointed (non-reentrant): its logits are freed after the
    forward and recomputed in the backward, so one chunk's logits live at a time.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_token_loss_sum, head, softcap, h, t, use_reentrant=False)
        else:
            part = _token_loss_sum(head, softcap, h, t)
        total = total + part
    return total


def target_token_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    target_index: torch.Tensor,
    num_target_tokens: int,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean next-token CE over the target tokens, from the (B, T, D) hidden states.

    Equals `F.cross_entropy(head(hidden)[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
    ignore_index=-100)` without building the (B, T, V) logits: only the target positions go
    through the head, `chunk_size` at a time.
    """
    targets = labels.reshape(-1).index_select(0, target_index + 1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)  # (N, D)
    return chunked_token_loss(head, rows, targets, chunk_size, softcap) / num_target_tokens


def tile_side(num_tokens: int) -> int | None:
    """The side of the square grid `num_tokens` tokens form, or None when they form none."""
    side = math.isqrt(num_tokens)
    return side if side > 0 and side * side == num_tokens else None


class VisionLanguageModel(nn.Module):
    """Composition of a vision encoder, a connector and a causal LM.

    `anyres` (an `AnyResTokens` counter, from `encoder.image: anyres`) switches images from one
    square tile each to LLaVA-NeXT tiling: every image arrives as its overview + grid tiles,
    all tiles of a batch go through encoder and connector at once, and each image's tile
    features are packed into one token run (unpad, `image_newline` after every row). The
    learned `image_newline` (Dl,) exists when the counter appends newlines; None otherwise.
    """

    encoder: VisionEncoder  # an nn.Module implementing the contract
    connector: Connector  # an nn.Module implementing the contract
    llm: LanguageModel  # transformers PreTrainedModel (or a peft model wrapping one)
    image_newline: nn.Parameter | None

    def __init__(
        self,
        encoder: VisionEncoder,
        connector: Connector,
        llm: LanguageModel,
        image_token_id: int,
        loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
        anyres: AnyResTokens | None = None,
        image_newline: torch.Tensor | None = None,
    ) -> None:
        """`image_newline`: its initial value (LLaVA-NeXT: randn(Dl) / sqrt(Dl)); needed exactly
        when `anyres` appends newlines."""
        super().__init__()
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.loss_chunk_size = loss_chunk_size
        # Set by the trainer when parameters are sharded (FSDP, ZeRO-3): every training forward
        # then runs the whole vision branch, frozen or not, because sharded units all-gather
        # collectively and a rank that skips them hangs the others.
        self.sharded = False
        self.anyres = anyres
        if anyres is not None:
            per_tile = connector.num_tokens(encoder.num_tokens)
            if tile_side(per_tile) != anyres.side or anyres.tile_size != encoder.image_size:
                raise ValueError(
                    f"the AnyRes counter (tile {anyres.tile_size} px, {anyres.side}x"
                    f"{anyres.side} tokens) does not fit this encoder + connector "
                    f"({encoder.image_size} px, {per_tile} tokens per tile)"
                )
        if (anyres is not None and anyres.newline) != (image_newline is not None):
            raise ValueError("image_newline is given exactly when the AnyRes counter appends it")
        if image_newline is not None:
            self.image_newline = nn.Parameter(image_newline)
        else:
            self.register_parameter("image_newline", None)

    @property
    def image_strategy(self) -> str:
        """`encoder.image`: pad (one square tile per image) or anyres (LLaVA-NeXT tiles)."""
        return "pad" if self.anyres is None else "anyres"

    def image_token_counter(self) -> ImageTokenCounter:
        """How many embeddings each image gives: the vision side's answer, as a picklable value
        the data side (tokenizer, shards, grouping), the planner and HF export all ask.

        A fixed-size encoder gives N features per image and the connector maps them to M; with
        AnyRes the count depends on the image's size (`AnyResTokens`).
        """
        if self.anyres is not None:
            return self.anyres
        return FixedImageTokens(self.connector.num_tokens(self.encoder.num_tokens))

    @property
    def image_processor(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> the pixels this model takes for it, the callable the data side uses:
        pad: the encoder's transform, (3, S, S); anyres: `AnyResImages`, (1 + rows * cols, 3,
        S, S), overview first. A batch concatenates images' tensors along dim 0 (pad: stacks).
        Picklable (runs in DataLoader workers)."""
        if self.anyres is None:
            return self.encoder.image_transform
        transform: Any = self.encoder.image_transform
        return AnyResImages(
            self.anyres.pinpoints,
            self.anyres.tile_size,
            tuple(transform.mean),
            tuple(transform.std),
            self.anyres.mode,
        )

    @property
    def max_image_tiles(self) -> int:
        """Encoder passes of the largest image: 1 (pad), 1 + the largest grid (anyres)."""
        if self.anyres is None:
            return 1
        t = self.anyres.tile_size
        return 1 + max((a // t) * (b // t) for a, b in self.anyres.pinpoints)

    def image_tokens(self, image_size: ImageSize | None = None) -> ImageTokens:
        """Tokens (and layout) of one image of this (width, height)."""
        return self.image_token_counter()(image_size)

    @property
    def num_image_tokens(self) -> int:
        """M, the tokens of every image, for a vision side whose count never varies (HF Llava's
        `image_seq_length`); a ValueError for one whose count depends on the image."""
        fixed = self.image_token_counter().fixed_count
        if fixed is None:
            raise ValueError(
                "this model's image token count depends on the image: ask "
                "image_tokens(image_size) per image."
            )
        return fixed

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """A frozen encoder stays in eval mode (no dropout, fixed norms) whatever Lightning asks."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(K, 3, H, W) -> (K, M, Dl) image embeddings for the LLM. A model built on a feature
        cache (`CachedFeatures` in the encoder slot) takes the cached (K, N, Dv) features here:
        the stand-in passes them through, so the connector sees what the tower would give."""
        if self.encoder_frozen:
            with torch.no_grad():
                features = self.encoder(pixel_values)  # (K, N, Dv)
        else:
            features = self.encoder(pixel_values)
        return self.connector(features.to(self._connector_dtype()))  # (K, M, Dl)

    def _connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def encode_anyres(
        self, pixel_values: torch.Tensor, image_sizes: Sequence[ImageSize] | None
    ) -> list[torch.Tensor]:
        """(sum of tiles, 3, S, S) -> one (count_k, Dl) embedding run per image.

        All tiles of the batch go through encoder and connector in one call; `image_sizes`
        ((width, height) per image, batch order) says how many tiles each image has and how
        its grid is unpadded. The layout comes from the counter alone (no device sync).
        """
        counter = self.anyres
        assert counter is not None
        if image_sizes is None:
            raise ValueError(
                "encoder.image=anyres: the model needs image_sizes, the (width, height) of "
                "every image of the batch in order (collate sends them; generation passes them)"
            )
        sizes = [(int(w), int(h)) for w, h in image_sizes]
        tiles = [1 + r * c for (r, c), _ in (counter.layout(size) for size in sizes)]
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(
                f"image_sizes {sizes} give {sum(tiles)} AnyRes tiles ({tiles} per image) but "
                f"pixel_values holds {pixel_values.shape[0]}: pixels were made by another image "
                "processor than the model's (use model.image_processor)"
            )
        features = self.encode_images(pixel_values)  # (sum tiles, side**2, Dl)
        return [
            pack_tile_features(part, size, counter, self.image_newline)
            for part, size in zip(features.split(tiles), sizes)
        ]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        image_tokens: Sequence[int] | None = None,
        ids: Sequence[Any] | None = None,
        image_sizes: Sequence[ImageSize] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's slots replaced by that image's embeddings.

        `image_index` (flat b*T + p of the image tokens) and `image_tokens` (per-image counts
        the text side expanded), both from `collate`, keep the check and the copy free of host
        syncs; `ids` (the batch's sample ids) name the sample in a mismatch error.
        `image_sizes` ((width, height) per image) is required by AnyRes, ignored by pad.
        """
        is_image = input_ids == self.image_token_id  # (B, T)
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.llm.get_input_embeddings()(text_ids)  # (B, T, Dl)
        if pixel_values is None or pixel_values.shape[0] == 0:
            num_slots = int(is_image.sum()) if image_index is None else image_index.numel()
            if num_slots:
                raise ValueError(
                    f"input_ids hold {num_slots} image tokens but no pixel_values were given."
                )
            return embeds + self._vision_anchor(embeds)
        image_embeds: ImageEmbeds
        if self.anyres is not None:
            image_embeds = self.encode_anyres(pixel_values, image_sizes)  # K x (M_k, Dl)
        else:
            image_embeds = self.encode_images(pixel_values)  # (K, M, Dl)
        return scatter_image_embeds(
            embeds, is_image, image_embeds, image_index, image_tokens, sample_ids=ids
        )

    def _vision_anchor(self, embeds: torch.Tensor) -> torch.Tensor | float:
        """0 x (one blank image through encoder and connector) on a text-only training batch.

        Why: a trainable connector that a batch never uses gets no gradient on this rank while
        other ranks have image batches; DDP (find_unused_parameters=False) then fails and FSDP's
        reduce-scatter never matches. Running the vision branch inside the forward gives every
        trainable vision parameter an exact zero gradient on every strategy. With sharded
        parameters (`sharded`) it runs even when nothing in vision trains (a frozen encoder then
        runs under no_grad): the all-gathers of its sharded units are collective.
        """
        if not self.training:
            return 0.0
        newline = [] if self.image_newline is None else [self.image_newline]
        if not self.sharded:
            vision = [*self.connector.parameters(), *self.encoder.parameters(), *newline]
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in vision)):
                return 0.0
        if getattr(self.encoder, "cached", False):  # no tower: a blank image's features
            blank = self.encoder.blank(embeds)  # type: ignore[attr-defined]
        else:
            size = int(self.encoder.image_size)
            dtype = next(self.encoder.parameters()).dtype
            blank = embeds.new_zeros((1, 3, size, size), dtype=dtype)
        anchor = self.encode_images(blank).sum()
        for param in newline:  # AnyRes: image_newline is a vision parameter too
            anchor = anchor + param.sum().to(anchor.dtype)
        return anchor.to(embeds.dtype) * 0.0

    def _loss_head(self) -> tuple[nn.Module, nn.Module, float | None] | None:
        """(decoder, output head, soft-cap) of the LLM when its logits are just head(hidden).

        Looks through a peft LoRA wrapper (its adapters live inside the decoder and head
        modules). None means: compute the full logits through `self.llm` instead.
        """
        llm: Any = self.llm  # a peft wrapper or the transformers model
        peft_config = getattr(llm, "active_peft_config", None)
        if peft_config is not None:
            if getattr(peft_config, "is_prompt_learning", False):
                return None  # virtual tokens are added by PeftModel.forward
            llm = llm.get_base_model()
        config = getattr(llm, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in PLAIN_HEAD_MODEL_TYPES:
            if not getattr(self, "_logged_full_logits", False):
                self._logged_full_logits = True
                log.info(
                    "LLM model_type %r is not known to have a plain output head: the training "
                    "loss uses its full logits (more memory).",
                    model_type,
                )
            return None
        head = llm.get_output_embeddings()
        decoder = llm.get_decoder()
        if head is None or decoder is llm:
            return None
        softcap = getattr(config, "final_logit_softcapping", None)
        return decoder, head, float(softcap) if softcap is not None else None

    def _attention_kwargs(
        self,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seq_lens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> dict[str, Any]:
        """What keeps the samples of a packed row apart in the LLM's attention.

        Padded batch: the 2D mask. Packed rows: `position_ids` restarting at 0 per sample and no
        2D mask, from which transformers (5.x `masking_utils.find_packed_sequence_indices`) builds
        the block-diagonal causal mask for sdpa and eager; flash attention gets the segment
        offsets as `cu_seq_lens_q/k` and `max_length_q/k` (its varlen path, no host sync).
        """
        if position_ids is None:
            return {"attention_mask": attention_mask}
        kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": position_ids}
        config = getattr(self.llm, "config", None)
        if "flash" in str(getattr(config, "_attn_implementation", "")) and cu_seq_lens is not None:
            offsets = cu_seq_lens.to(position_ids.device, torch.int32)
            kwargs.update(
                cu_seq_lens_q=offsets,
                cu_seq_lens_k=offsets,
                max_length_q=max_seqlen,
                max_length_k=max_seqlen,
            )
        return kwargs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        num_target_tokens: int | None = None,
        image_index: torch.Tensor | None = None,
        image_tokens: Sequence[int] | None = None,
        ids: Sequence[Any] | None = None,
        image_sizes: Sequence[ImageSize] | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        **_: Any,
    ) -> VLMOutput:
        """Logits without labels; with labels, the mean next-token CE over the target tokens.

        `target_index`, `num_target_tokens`, `image_index` and `image_tokens` come with batches
        from `collate` (computed on the CPU): given, the training forward needs no host sync of
        its own. `ids` name the sample when its image tokens and embeddings disagree.
        `image_sizes`: (width, height) of every image, in batch order (AnyRes needs them).
        `position_ids`, `cu_seq_lens`, `max_seqlen`: a packed batch (`data.packing`), see
        `_attention_kwargs`.
        """
        embeds = self.embed(input_ids, pixel_values, image_index, image_tokens, ids, image_sizes)
        attn = self._attention_kwargs(attention_mask, position_ids, cu_seq_lens, max_seqlen)
        if labels is None:
            out = self.llm(inputs_embeds=embeds, use_cache=False, **attn)
            return VLMOutput(loss=None, logits=out.logits, num_target_tokens=0)
        if target_index is None:
            target_index = target_positions(labels)
            num_target_tokens = target_index.numel()
        elif num_target_tokens is None:
            num_target_tokens = target_index.numel()
        if num_target_tokens == 0:
            raise ValueError(
                "batch has no target tokens: every label is -100 (check masking/template)."
            )
        parts = self._loss_head()
        if parts is None:  # an LLM whose logits are more than head(hidden): full logits
            out = self.llm(inputs_embeds=embeds, use_cache=False, **attn)
            loss = target_token_loss(
                nn.Identity(),
                out.logits,
                labels,
                target_index,
                num_target_tokens,
                self.loss_chunk_size,
            )
            return VLMOutput(loss=loss, logits=out.logits, num_target_tokens=num_target_tokens)
        decoder, head, softcap = parts
        out = decoder(inputs_embeds=embeds, use_cache=False, **attn)
        loss = target_token_loss(
            head,
            out.last_hidden_state,
            labels,
            target_index,
            num_target_tokens,
            self.loss_chunk_size,
            softcap,
        )
        return VLMOutput(loss=loss, logits=None, num_target_tokens=num_target_tokens)
