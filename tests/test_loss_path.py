"""The training loss path: head + CE on target positions only, in chunks, without host syncs.

The reference is the formula the model used before (full (B, T, V) logits, slice, reshape,
fp32 cross-entropy with ignore_index): the loss and every trainable gradient must match it in
fp32, plain, LoRA-wrapped and with HF gradient checkpointing, while no (B, T, V) tensor is ever
built and the forward on a collated batch never reads a device value back to the host.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from vlmlab.data.datamodule import collate
from vlmlab.data.tokenize import TextEncoder
from vlmlab.models.lora import lora_config, wrap_lora
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels")
COLLATE_KEYS = ("target_index", "num_target_tokens", "image_index")
# ops that make the host wait for the device: .item()/int()/bool() of a tensor, and ops whose
# output size depends on the data
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "masked_scatter_backward")


def _conversation(i: int, image: bool, turns: int) -> list[dict[str, str]]:
    colour = ["Red", "Blue", "Green", "Yellow"][i % 4]
    conv = []
    for t in range(turns):
        question = f"Question {t}: what colour is the shape?"
        if image and t == 0:
            question = f"<image>\n{question}"
        conv += [{"from": "human", "value": question}, {"from": "gpt", "value": f"{colour} {t}"}]
    return conv


def _samples(model: VisionLanguageModel, tokenizer: Any, kinds: list[str]) -> list[dict]:
    """Real samples through the vicuna_v1 template: 'image', 'text' or 'multi' (3 turns + image)."""
    encoder = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 512)
    samples = []
    for i, kind in enumerate(kinds):
        image = kind in ("image", "multi")
        pixel_values = None
        if image:
            colour = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)][i % 4]
            pixel_values = model.encoder.image_transform(Image.new("RGB", (80, 48), colour))
        conv = _conversation(i, image, 3 if kind == "multi" else 1)
        samples.append({"id": str(i), "pixel_values": pixel_values, **encoder.encode(conv, image)})
    return samples


def _batch(model: VisionLanguageModel, tokenizer: Any, kinds: list[str]) -> dict[str, Any]:
    return collate(_samples(model, tokenizer, kinds), tokenizer.pad_token_id, model.image_token_id)


def _model_inputs(batch: dict[str, Any], with_collate_keys: bool = True) -> dict[str, Any]:
    keys = BATCH_KEYS + (COLLATE_KEYS if with_collate_keys else ())
    return {k: batch[k] for k in keys if k in batch}


def _reference_loss(model: VisionLanguageModel, batch: dict[str, Any]) -> torch.Tensor:
    """The loss as the model computed it before: full logits, sliced, reshaped, fp32 CE."""
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    logits = model.llm(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def _loss_and_grads(
    model: VisionLanguageModel, loss_fn: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _randomise_lora_b(model: VisionLanguageModel) -> None:
    """peft starts lora_B at zero (no gradient reaches lora_A); make every adapter matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)


def _prepare(model: VisionLanguageModel, variant: str) -> None:
    if variant.startswith("lora"):
        spec: dict[str, Any] = {"r": 4, "alpha": 8}
        if variant == "lora_head":  # an adapter on the output head itself
            spec["target_modules"] = ["q_proj", "v_proj", "lm_head"]
            spec["exclude_modules"] = ["no_such_module"]
        wrap_lora(model, lora_config(spec, model.llm))
        _randomise_lora_b(model)
        assert any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" in n)
    if variant.endswith("ckpt"):
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        assert model.llm.is_gradient_checkpointing


@pytest.mark.parametrize("variant", ["plain", "lora", "lora_head", "ckpt", "lora_ckpt"])
def test_chunked_loss_and_grads_equal_the_full_logits_formula(tiny_model, variant: str) -> None:
    model, tokenizer = tiny_model
    _prepare(model, variant)
    model.loss_chunk_size = 7  # several chunks and a partial last one
    model.train()
    batch = _batch(model, tokenizer, ["image", "text", "multi"])
    assert batch["num_target_tokens"] > 3 * model.loss_chunk_size

    ref_loss, ref_grads = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    for with_keys in (True, False):  # collated keys, or computed by the model
        inputs = _model_inputs(batch, with_keys)
        out = model(**inputs)
        assert out.logits is None
        assert out.num_target_tokens == batch["num_target_tokens"]
        loss, grads = _loss_and_grads(model, lambda inputs=inputs: model(**inputs).loss)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        assert {n.split(".")[0] for n in grads} == {"encoder", "connector", "llm"}
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if variant.startswith("lora"):
        assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())
    if variant == "lora_head":
        assert any("lm_head" in n and "lora_" in n for n in grads)


class _OpRecorder(TorchDispatchMode):
    """Records every aten op run, and the largest output per op, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((name, tuple(t.shape)))
        return out


def _training_step_ops(model: VisionLanguageModel, inputs: dict[str, Any]) -> _OpRecorder:
    with _OpRecorder() as rec:
        model(**inputs).loss.backward()
    return rec


def test_no_full_logits_and_no_host_sync_on_a_collated_batch(tiny_model) -> None:
    model, tokenizer = tiny_model
    model.train()
    model.loss_chunk_size = 16
    batch = _batch(model, tokenizer, ["image", "text", "multi"])
    vocab = model.llm.get_output_embeddings().out_features
    rows = batch["input_ids"].numel()
    rec = _training_step_ops(model, _model_inputs(batch))
    hidden = model.llm.config.hidden_size
    logits = [s for _, s in rec.shapes if s and s[-1] == vocab and s != (hidden, vocab)]
    widest = max(math.prod(s[:-1]) for s in logits)  # (hidden, vocab): the head's weight.T
    assert widest <= model.loss_chunk_size < rows, "a logits tensor larger than one chunk"
    # the syncs left are the LLM's own (transformers' attention-mask checks): compare with the
    # bare decoder on the same embeddings
    embeds = model.embed(batch["input_ids"], batch["pixel_values"]).detach().requires_grad_()
    with _OpRecorder() as bare:
        hidden = model.llm.get_decoder()(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        hidden.sum().backward()
    ours = {op: rec.ops[op] for op in SYNC_OPS}
    theirs = {op: bare.ops[op] for op in SYNC_OPS}
    assert ours == theirs, (
        f"host syncs of the VLM forward/backward {ours} vs the decoder's {theirs}"
    )


def test_collate_keys_match_the_labels(tiny_model) -> None:
    model, tokenizer = tiny_model
    samples = _samples(model, tokenizer, ["image", "text", "multi", "text"])
    batch = collate(samples, tokenizer.pad_token_id, model.image_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    bsz, width = labels.shape
    expected = [
        b * width + p
        for b in range(bsz)
        for p in range(width - 1)
        if labels[b, p + 1] != IGNORE_INDEX
    ]
    assert batch["target_index"].dtype == torch.long
    assert batch["target_index"].tolist() == expected
    assert isinstance(batch["num_target_tokens"], int)
    assert batch["num_target_tokens"] == len(expected) == int((labels[:, 1:] != -100).sum())
    flat = labels.view(-1)
    assert (flat[batch["target_index"] + 1] != IGNORE_INDEX).all()
    # every target of every sample, in order (multi-turn: several answer spans per row)
    for b, sample in enumerate(samples):
        own = batch["target_index"][(batch["target_index"] // width) == b] % width
        assert flat[b * width + own + 1].tolist() == [
            t for t in sample["labels"][1:].tolist() if t != IGNORE_INDEX
        ]
    image_rows = [
        b * width + p for b in range(bsz) for p in range(width) if ids[b, p] == model.image_token_id
    ]
    assert batch["image_index"].tolist() == image_rows
    assert len(image_rows) == 2 * model.num_image_tokens

    text = collate(_samples(model, tokenizer, ["text", "text"]), tokenizer.pad_token_id, 7)
    assert text["pixel_values"] is None and text["image_index"].numel() == 0
    assert text["num_target_tokens"] == int((text["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0

    empty = collate([{"skipped": {"bad_json": 2}, "empty": True}], 0, model.image_token_id)
    assert empty["input_ids"].shape == (0, 0) and empty["num_target_tokens"] == 0
    assert empty["target_index"].numel() == 0 and empty["image_index"].numel() == 0
    assert empty["skipped"] == {"bad_json": 2}


def _freeze_vision(model: VisionLanguageModel) -> None:
    for part in (model.encoder, model.connector):
        for param in part.parameters():
            param.requires_grad_(False)


def test_sharded_model_runs_the_frozen_vision_branch_on_text_only_batches(tiny_model) -> None:
    model, tokenizer = tiny_model
    _freeze_vision(model)
    model.train()
    calls: Counter[str] = Counter()
    model.encoder.register_forward_hook(lambda *_: calls.update(["encoder"]))
    model.connector.register_forward_hook(lambda *_: calls.update(["connector"]))
    batch = _model_inputs(_batch(model, tokenizer, ["text", "text"]))
    assert batch["pixel_values"] is None

    assert model.sharded is False
    plain = model(**batch).loss
    assert not calls  # unsharded: a frozen vision branch need not run
    model.sharded = True
    sharded = model(**batch).loss
    assert calls == {"encoder": 1, "connector": 1}
    assert torch.equal(sharded, plain)  # the anchor adds exactly zero
    sharded.backward()  # frozen vision under no_grad: backward through the LLM only
    assert all(p.grad is None for p in model.encoder.parameters())
    with torch.no_grad():
        model(**batch)  # a no-grad training forward still takes part
    assert calls["encoder"] == 2
    model.eval()
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])  # eval/generation: unchanged
    assert calls["encoder"] == 2


def test_image_token_count_mismatch_still_raises_with_collated_keys(tiny_model) -> None:
    model, tokenizer = tiny_model
    model.train()
    batch = _model_inputs(_batch(model, tokenizer, ["image", "text"]))
    m = model.num_image_tokens
    with pytest.raises(ValueError, match=rf"{m} image tokens but 2 images"):
        model(**dict(batch, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1)))
    with pytest.raises(ValueError, match=rf"{m} image tokens but no pixel_values"):
        model(**dict(batch, pixel_values=None))
    no_targets = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    del no_targets["target_index"], no_targets["num_target_tokens"]
    with pytest.raises(ValueError, match="no target tokens"):
        model(**no_targets)


def test_bf16_llm_loss_is_fp32(compose_cfg) -> None:
    from vlmlab.models import build_vlm

    cfg = compose_cfg("llm.dtype=bfloat16")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert model.llm.get_output_embeddings().weight.dtype == torch.bfloat16
    model.train()
    model.loss_chunk_size = 8
    batch = _batch(model, tokenizer, ["image", "text", "multi"])
    out = model(**_model_inputs(batch))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    with torch.no_grad():
        reference = _reference_loss(model, batch)
    torch.testing.assert_close(out.loss.detach(), reference, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.connector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def _other_llm(model: VisionLanguageModel, model_type: str, **extra: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    llm = model.llm
    config = AutoConfig.for_model(
        model_type,
        hidden_size=llm.config.hidden_size,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=llm.config.hidden_size // 4,
        vocab_size=llm.get_output_embeddings().out_features,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("model_type", "extra", "chunked"),
    [
        ("gemma2", {"final_logit_softcapping": 3.0}, True),  # soft-capping applied per chunk
        ("granite", {"logits_scaling": 4.0}, False),  # an unknown head: full-logits fallback
    ],
)
def test_other_heads_match_their_own_logits(
    tiny_model, model_type: str, extra: dict[str, Any], chunked: bool
) -> None:
    base, tokenizer = tiny_model
    model = VisionLanguageModel(
        base.encoder, base.connector, _other_llm(base, model_type, **extra), base.image_token_id
    )
    model.loss_chunk_size = 5
    model.train()
    batch = _batch(model, tokenizer, ["image", "text"])
    ref_loss, ref_grads = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    out = model(**_model_inputs(batch))
    assert (out.logits is None) == chunked
    loss, grads = _loss_and_grads(model, lambda: model(**_model_inputs(batch)).loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
