"""Online multimodal packing (`data.packing`): packed rows give each sample exactly the loss and
gradient it gets alone, and the stream keeps its epoch guarantees with packing on.

The differential reference is the same samples run one at a time, unpadded: per-sample losses
within 1e-5 and the gradient of the summed token loss within 1e-6 relative, in fp32 on CPU, for
Llama, Qwen2, Mistral (with a sliding window shorter than the samples) and Phi-3, with the mlp
and resampler connectors. A packed row whose samples could see each other (a plain all-ones
mask instead of the restarting positions) fails the same check: the negative control.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from tests.test_scale import final_weights, run_train, run_until_killed
from vlmlab.data.datamodule import VLMDataModule, collate
from vlmlab.data.packing import collate_packed, deal_rows, first_fit_decreasing, pack_batches
from vlmlab.data.tokenize import TextEncoder
from vlmlab.models import build_vlm
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.text import IGNORE_INDEX

ARCHS = {
    "llama": [],
    "qwen2": ["llm.config.model_type=qwen2"],
    "mistral": ["llm.config.model_type=mistral", "+llm.config.sliding_window=24"],
    "phi3": ["llm.config.model_type=phi3"],
}
SMALL = ["encoder=tiny", "llm.config.num_hidden_layers=2", "llm.config.hidden_size=64"]
MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "labels",
    "target_index",
    "num_target_tokens",
    "image_index",
    "image_tokens",
    "position_ids",
    "cu_seq_lens",
    "max_seqlen",
    "image_sizes",  # AnyRes (pad ignores it)
)
LOSS_TOL = 1e-5
GRAD_TOL = 1e-6


def _samples(model: VisionLanguageModel, tokenizer: Any) -> list[dict[str, Any]]:
    """Image, text-only and multi-turn samples through the vicuna_v1 template."""
    encoder = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 512)
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    samples = []
    for i, (image, turns) in enumerate([(1, 1), (0, 1), (1, 3), (1, 2), (0, 2)]):
        conv = []
        for t in range(turns):
            question = f"Question {t}: what colour is shape {i}?"
            answer = f"{['Red', 'Blue', 'Green', 'Yellow'][(i + t) % 4]} number {t}"
            if image and t == 0:
                question = f"<image>\n{question}"
            conv += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        pixels = None
        if image:
            pixels = model.encoder.image_transform(Image.new("RGB", (80, 48), colours[i % 4]))
        samples.append({"id": str(i), "pixel_values": pixels, **encoder.encode(conv, bool(image))})
    return samples


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def _grads(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none"
    )  # (B, T-1); 0 where the label is ignored


def _reference(
    model: VisionLanguageModel, samples: list[dict[str, Any]], pad: int
) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Per-sample mean losses and the gradient of the summed token loss, one sample at a time."""
    losses: list[float] = []
    total: dict[str, torch.Tensor] = {}
    tokens = 0
    for sample in samples:
        batch = collate([sample], pad, model.image_token_id)
        model.zero_grad()
        out = model(**_inputs(batch))
        (out.loss * out.num_target_tokens).backward()
        losses.append(float(out.loss.detach()))
        tokens += out.num_target_tokens
        for name, grad in _grads(model).items():
            total[name] = total[name] + grad if name in total else grad
    return losses, total, tokens


def _packed_losses(
    model: VisionLanguageModel, batch: dict[str, Any], rows: list[int]
) -> list[float]:
    """Each packed sample's mean loss, read from the full logits of the packed forward."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in _inputs(batch).items() if k != "labels"}).logits
    per_token = _token_losses(logits, batch["labels"])  # [r, p]: predicting slot p + 1
    losses, k = [], 0
    for r, count in enumerate(rows):
        offset = 0
        for _ in range(count):
            n = int(batch["lengths"][k])
            targets = (batch["labels"][r, offset + 1 : offset + n] != IGNORE_INDEX).sum()
            losses.append(float(per_token[r, offset : offset + n - 1].sum() / targets))
            offset, k = offset + n, k + 1
    return losses


def _target_counts(samples: list[dict[str, Any]]) -> list[int]:
    return [int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples]


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    """Relative error of the whole gradient, and the parameters whose own gradient differs by
    more than GRAD_TOL relative (those with a gradient at rounding level, below 1e-4 of the
    largest, e.g. the key bias softmax ignores, are compared against that largest norm)."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[n] - b[n]).reshape(-1) for n in a]).norm()
    whole = float(diff / torch.cat([b[n].reshape(-1) for n in b]).norm())
    largest = max(float(g.norm()) for g in b.values())
    bad = [
        n
        for n in a
        if float((a[n] - b[n]).norm()) > GRAD_TOL * max(float(b[n].norm()), 1e-4 * largest)
    ]
    return whole, bad


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Any, Any]]:
    from vlmlab.config import compose

    root = tmp_path_factory.mktemp("packing")
    cache: dict[tuple[str, str], tuple[Any, Any]] = {}

    def build(arch: str, connector: str) -> tuple[Any, Any]:
        if (arch, connector) not in cache:
            cfg = compose([f"paths.root={root}", *SMALL, f"connector={connector}", *ARCHS[arch]])
            model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
            cache[(arch, connector)] = (model.eval(), tokenizer)
        return cache[(arch, connector)]

    return build


@pytest.mark.parametrize("connector", ["mlp", "resampler"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_equals_unpadded(
    built: Callable[[str, str], tuple[Any, Any]], arch: str, connector: str
) -> None:
    model, tokenizer = built(arch, connector)
    assert model.llm.config.model_type == arch
    samples = _samples(model, tokenizer)
    pad = tokenizer.pad_token_id
    ref_losses, ref_grads, tokens = _reference(model, samples, pad)
    rows = [2, 1, 2]  # image+text, a 3-turn image sample alone, image+text: images in 2 rows
    marker = {"empty": True, "skipped": {}, "rows": rows}
    batch = collate([*samples, marker], pad, model.image_token_id)
    batch["lengths"] = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape[0] == 3 and batch["num_target_tokens"] == tokens
    assert batch["pixel_values"].shape[0] == 3  # the row's images go through the tower together

    losses = _packed_losses(model, batch, rows)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_TOL, (losses, ref_losses)
    model.zero_grad()
    out = model(**_inputs(batch))
    (out.loss * out.num_target_tokens).backward()  # the training path (target positions)
    weighted = sum(loss * n for loss, n in zip(ref_losses, _target_counts(samples))) / tokens
    assert abs(float(out.loss.detach()) - weighted) <= LOSS_TOL
    whole, bad = _relative(_grads(model), ref_grads)
    assert whole <= GRAD_TOL and not bad, (whole, bad)


def test_contamination_fails_the_check(built: Callable[[str, str], tuple[Any, Any]]) -> None:
    """Negative control: the same packed rows with a plain mask (samples see their row
    neighbours, positions run on) give other losses: the differential check can fail."""
    model, tokenizer = built("llama", "mlp")
    samples = _samples(model, tokenizer)
    ref_losses, _, _ = _reference(model, samples, tokenizer.pad_token_id)
    rows = [2, 1, 2]
    batch = collate(
        [*samples, {"empty": True, "skipped": {}, "rows": rows}],
        tokenizer.pad_token_id,
        model.image_token_id,
    )
    batch["lengths"] = [len(s["input_ids"]) for s in samples]
    batch.pop("position_ids")  # the 2D mask path: no segments
    losses = _packed_losses(model, batch, rows)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) > 1e-3


def test_collate_packed_layout() -> None:
    """Positions restart per sample and for the padding tail; cu_seq_lens cover every segment;
    a sample's last token predicts nothing (its next slot is another sample's first)."""
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([8, 9])},
        {"input_ids": torch.tensor([4, 3, 2, 1]), "labels": torch.tensor([-100, -100, 2, 1])},
    ]
    out = collate_packed(samples, [2, 1], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert out["cu_seq_lens"].tolist() == [0, 3, 5, 9, 10] and out["max_seqlen"] == 4
    # targets: row 0 positions 0, 1 (-> 6, 7) and 3 (-> 9); not 2 (-> 8, the next sample)
    assert out["target_index"].tolist() == [0, 1, 3, 5 + 1, 5 + 2]
    assert (out["num_pad_tokens"], out["num_tokens"], out["num_rows"]) == (1, 10, 2)


def test_pack_batches_is_a_partition() -> None:
    """Every sample lands in exactly one row of one of exactly k batches; rows fit."""
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(200)]
    rows = first_fit_decreasing(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert first_fit_decreasing(lengths, 128) == rows  # deterministic
    batches = deal_rows(rows, lengths, 16, random.Random(1))
    assert len(batches) == 16 and sum(len(b) for b in batches) == len(rows)
    samples = [{"input_ids": [0] * n, "id": i} for i, n in enumerate(lengths)]
    packed = pack_batches(samples, 16, 128, random.Random(1))
    assert sorted(s["id"] for batch, _ in packed for s in batch) == list(range(200))


def _stream(
    compose_cfg: Callable[..., DictConfig], rank: int, world: int, skip: int = 0
) -> list[dict[str, Any]]:
    cfg = compose_cfg("data.max_length=160")
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm, weights="none", device="meta")
    from vlmlab.data.prepare import ensure_shapes, resolve_dataset
    from vlmlab.schema import DataConfig, typed

    data = typed(cfg.data, DataConfig)
    ensure_shapes(data)
    dataset = resolve_dataset(data, "instruct")
    text = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 160)
    dm = VLMDataModule(
        dataset["shard_dir"],
        text,
        model.image_processor,
        batch_size=4,
        shuffle_buffer=16,
        sources=dataset["sources"],
        group_megabatch=4,
        packing=True,
    )
    dm._world = lambda: (rank, world)  # type: ignore[method-assign]
    dm._resume_epoch, dm._resume_batches = 0, skip
    return list(dm.train_dataloader())


def test_stream_packed_exactly_once_and_resume(compose_cfg: Callable[..., DictConfig]) -> None:
    """Two ranks: every sample once, equal batch counts, rows up to max_length, several
    samples per row; resuming after k batches yields the uninterrupted batches k, k+1, ..."""
    ranks = [_stream(compose_cfg, rank, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    ids = [i for batches in ranks for b in batches for i in b["ids"]]
    assert len(ids) == len(set(ids)) == 48 + 0  # tiny instruct set: 48 samples
    rows = sum(b["num_rows"] for batches in ranks for b in batches)
    assert len(ids) / rows > 1.5
    assert all(b["input_ids"].shape[1] <= 160 for batches in ranks for b in batches)
    resumed = _stream(compose_cfg, 1, 2, skip=3)
    assert [b["ids"] for b in resumed] == [b["ids"] for b in ranks[1][3:]]
    for a, b in zip(resumed, ranks[1][3:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["position_ids"], b["position_ids"])


@pytest.mark.slow
def test_ddp_packing_two_epochs_sigkill_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Acceptance 3: 2 DDP ranks x 2 workers, packing on, 2 epochs of 48 samples (batch 4 per
    rank: 6 steps per epoch, checkpoints every 2). Each epoch's union of sample ids over ranks is
    the dataset, no duplicate; a run SIGKILLed mid-epoch (inside a worker's packed look-ahead)
    and resumed with resume=auto ends with weights torch.equal to the uninterrupted run's."""
    from vlmlab.training.audit import read_records

    # Its own data: the session's shared root holds 16-sample shards (3 shards, too few here).
    data_root = tmp_path / "data"
    common = (
        "stage=2",
        "stage.init_from=null",
        "stage.evaluate=false",
        "stage.epochs=2",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.samples_per_shard=8",  # 6 shards: 2 ranks x 2 workers need 4
        "data.packing=true",
        "data.max_length=160",
        "stage.global_batch_size=8",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "checkpoint.every_n_steps=2",
        "logger=none",
        "seed=3",
    )
    whole = tmp_path / "whole"
    run_train(whole, data_root, *common, f"debug.record_samples={whole / 'seen.jsonl'}")
    records = read_records(whole / "seen.jsonl")
    for epoch in (0, 1):
        ids = [i for r in records if r["epoch"] == epoch for i in r["ids"]]
        assert len(ids) == 48 == len(set(ids)), epoch
    assert {r["rank"] for r in records} == {0, 1}

    root = tmp_path / "killed"
    killed_log = root / "killed.jsonl"

    def mid_epoch() -> bool:
        steps = [r["step"] for r in read_records(killed_log, rank=0)]
        return bool(list(root.glob("resume/*/last.ckpt")) and steps and max(steps) >= 3)

    run_until_killed(
        root, data_root, *common, f"debug.record_samples={killed_log}", ready=mid_epoch
    )
    (last,) = root.glob("resume/*/last.ckpt")
    resumed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= resumed_at < 6  # inside epoch 0

    resumed_log = root / "resumed.jsonl"
    run_train(root, data_root, *common, "resume=auto", f"debug.record_samples={resumed_log}")
    killed = read_records(killed_log)
    resumed = read_records(resumed_log)
    assert min(r["step"] for r in resumed) == resumed_at
    for epoch in (0, 1):
        ids = [
            i for r in killed if r["step"] < resumed_at and r["epoch"] == epoch for i in r["ids"]
        ]
        ids += [i for r in resumed if r["epoch"] == epoch for i in r["ids"]]
        assert sorted(ids) == sorted(i for r in records if r["epoch"] == epoch for i in r["ids"])
    a, b = final_weights(whole), final_weights(root)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_flash_attention_gets_the_segments(built: Callable[[str, str], tuple[Any, Any]]) -> None:
    """flash_attention_2 takes the packed segments as varlen offsets (no host sync); sdpa and
    eager take restarting position_ids without a 2D mask; a padded batch keeps its mask."""
    model, tokenizer = built("llama", "mlp")
    batch = collate(
        [*_samples(model, tokenizer), {"empty": True, "skipped": {}, "rows": [2, 1, 2]}],
        tokenizer.pad_token_id,
        model.image_token_id,
    )
    args = (
        batch["attention_mask"],
        batch["position_ids"],
        batch["cu_seq_lens"],
        batch["max_seqlen"],
    )
    sdpa = model._attention_kwargs(*args)
    assert sdpa.keys() == {"attention_mask", "position_ids"} and sdpa["attention_mask"] is None
    padded = model._attention_kwargs(batch["attention_mask"], None, None, None)
    assert padded == {"attention_mask": batch["attention_mask"]}
    config = model.llm.config
    before = config._attn_implementation
    try:
        config._attn_implementation = "flash_attention_2"
        flash = model._attention_kwargs(*args)
    finally:
        config._attn_implementation = before
    assert torch.equal(flash["cu_seq_lens_q"], batch["cu_seq_lens"])
    assert flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["max_length_q"] == flash["max_length_k"] == batch["max_seqlen"]
    assert int(batch["cu_seq_lens"][-1]) == batch["input_ids"].numel()


def test_packed_anyres_equals_unpadded(tmp_path: Path) -> None:
    """AnyRes (`encoder.image=anyres`, as the llava_next experiments pack): images of other shapes
    give other token counts (tiles, unpadded grid, newlines); packed into rows, each sample still
    gets the loss and gradient it gets alone."""
    from vlmlab.config import compose

    cfg = compose([f"paths.root={tmp_path}", *SMALL, "connector=mlp", "encoder.image=anyres"])
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    model.eval()
    encoder = TextEncoder.for_model(model, tokenizer, "vicuna_v1", 1024)
    samples = []
    for i, size in enumerate([(80, 48), None, (30, 90), (64, 64), (120, 40)]):
        question = f"what colour is shape {i}?"
        conv = [
            {"from": "human", "value": f"<image>\n{question}" if size else question},
            {"from": "gpt", "value": f"{['Red', 'Blue', 'Green'][i % 3]} number {i}"},
        ]
        pixels = model.image_processor(Image.new("RGB", size, (40 * i, 90, 200))) if size else None
        encoded = encoder.encode(conv, size is not None, image_size=size)
        samples.append({"id": str(i), "pixel_values": pixels, "image_size": size, **encoded})
    counts = [s["image_tokens"][0] for s in samples if s["image_tokens"]]
    assert len(set(counts)) >= 3, counts  # the shapes give different token counts
    pad = tokenizer.pad_token_id
    ref_losses, ref_grads, tokens = _reference(model, samples, pad)
    rows = [2, 1, 2]
    marker = {"empty": True, "skipped": {}, "rows": rows}
    batch = collate([*samples, marker], pad, model.image_token_id)
    batch["lengths"] = [len(s["input_ids"]) for s in samples]
    assert batch["image_sizes"] == [s["image_size"] for s in samples if s["image_size"]]
    losses = _packed_losses(model, batch, rows)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_TOL, (losses, ref_losses)
    model.zero_grad()
    out = model(**_inputs(batch))
    (out.loss * out.num_target_tokens).backward()
    assert out.num_target_tokens == tokens
    whole, bad = _relative(_grads(model), ref_grads)
    assert whole <= GRAD_TOL and not bad, (whole, bad)
