"""Frozen-encoder feature cache (data/features.py): exact training from the cache, invalidation
by every input of the key, checksummed shards, one computation for parallel jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.data import features
from vlmlab.errors import ConfigError
from vlmlab.models import as_dict
from vlmlab.train import train

REPO = Path(__file__).resolve().parents[1]
STAGE1 = ("stage=1", "connector=mlp", "logger=none", "trainer.max_steps=3")


def _weights(result: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result["checkpoint"]) / "trainable.safetensors"))


def _caches(data_root: Path) -> list[Path]:
    return sorted(p for p in data_root.rglob(f"{features.CACHE_DIR}/*") if p.is_dir())


def _key(cfg) -> features.FeatureKey:
    key = features.feature_key(as_dict(cfg.encoder), cfg.data.get("feature_dtype"))
    assert not isinstance(key, str), key
    return key


def test_fp32_cache_trains_bit_exactly_without_the_tower(compose_cfg, monkeypatch) -> None:
    pixels = _weights(train(compose_cfg(*STAGE1)))
    cold = train(compose_cfg(*STAGE1, "data.features=require"))  # computes (or reuses) the cache
    built: list[str] = []
    import vlmlab.models.encoder as encoder_module

    original = encoder_module.HFVisionEncoder.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append("tower")
        original(self, *args, **kwargs)

    monkeypatch.setattr(encoder_module.HFVisionEncoder, "__init__", spy)
    warm = train(compose_cfg(*STAGE1, "data.features=require"))  # every sample cached
    assert built == []  # the vision tower was never built or loaded
    for result in (cold, warm):
        got = _weights(result)
        assert got.keys() == pixels.keys()
        for name, tensor in pixels.items():
            assert torch.equal(got[name], tensor), name

    bf16 = _weights(
        train(compose_cfg(*STAGE1, "data.features=require", "data.feature_dtype=bfloat16"))
    )
    diff = max((bf16[n] - t).abs().max().item() for n, t in pixels.items())
    # README "Feature cache" records the measured number. AdamW moves a weight by about lr per
    # step whatever the gradient's size, so a bf16 rounding of the features can change a weight
    # by up to ~2 x lr x steps; it does change them.
    print(f"bf16 cache after 3 steps: max |weight difference| {diff:.3g}")
    assert 0 < diff <= 2 * 1e-3 * 3


@pytest.mark.parametrize(
    "change",
    [
        "encoder.init_seed=1",  # other encoder weights
        "encoder.select_layer=-1",
        "encoder.config.image_size=32",  # image size
        "encoder.transform.mean=[0.5,0.5,0.5]",  # image transform
        "encoder.select_feature=cls_patch",
        "data.feature_dtype=float16",
    ],
)
def test_a_changed_key_recomputes_never_reads_stale(compose_cfg, data_root, change) -> None:
    base = compose_cfg("stage=1")
    changed = compose_cfg("stage=1", change)
    assert _key(base).digest() != _key(changed).digest()
    source = _align_source(base)
    image_dir = source[0].shard_dir
    first = features.ensure_features(source, as_dict(base.encoder), _key(base))
    again = features.ensure_features(source, as_dict(base.encoder), _key(base))
    other = features.ensure_features(source, as_dict(changed.encoder), _key(changed))
    assert again.computed == 0 and other.computed == len(list(image_dir.glob("*.tar")))
    assert first.sources[0].shard_dir != other.sources[0].shard_dir
    # what the recomputed cache holds is the changed encoder's output
    from vlmlab.models import instantiate

    encoder = instantiate(as_dict(changed.encoder), _convert_="all").eval()
    shard = sorted(image_dir.glob("*.tar"))[0]
    items = [
        features._prepare(k, m, encoder.image_transform) for k, m in features._raw_samples(shard)
    ]
    item = next(it for it in items if it.pixels is not None)
    with torch.no_grad():
        expected = encoder(item.pixels[None])[0].to(features.DTYPES[_key(changed).dtype])
    cached = dict(features._raw_samples(other.sources[0].shard_dir / shard.name))[item.key]
    got = features.read_cached(cached)
    old = features.read_cached(
        dict(features._raw_samples(first.sources[0].shard_dir / shard.name))[item.key]
    )
    # equal up to the batch size's float rounding (the cache encodes a shard's images together)
    assert got is not None and torch.allclose(got.features, expected, atol=1e-5)
    assert old is not None and old.features is not None and got.features is not None
    assert (old.features.dtype, old.features.shape) != (got.features.dtype, got.features.shape) or (
        not torch.allclose(old.features, got.features, atol=1e-3)
    )


def test_changed_weight_files_of_a_pretrained_encoder_change_the_key(compose_cfg, tmp_path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = compose_cfg("stage=1")
    folder = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**as_dict(cfg.encoder.config))).save_pretrained(folder)
    encoder = {**as_dict(cfg.encoder), "pretrained": True, "name_or_path": str(folder)}
    before = features.feature_key(encoder, None)
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**as_dict(cfg.encoder.config))).save_pretrained(folder)
    after = features.feature_key(encoder, None)
    assert isinstance(before, features.FeatureKey) and isinstance(after, features.FeatureKey)
    assert before.digest() != after.digest()
    missing = {**encoder, "name_or_path": "nobody/no-such-model"}
    assert "no local weight files" in str(features.feature_key(missing, None))


def test_corrupt_or_truncated_shard_is_recomputed_never_trained_on(compose_cfg) -> None:
    cfg = compose_cfg("stage=1")
    source = _align_source(cfg)
    cache = features.ensure_features(source, as_dict(cfg.encoder), _key(cfg)).sources[0].shard_dir
    shards = sorted(cache.glob("*.tar"))
    good = [s.read_bytes() for s in shards]
    shards[0].write_bytes(good[0][: len(good[0]) // 2])  # truncated
    corrupt = bytearray(good[1])
    corrupt[len(corrupt) // 2] ^= 0xFF  # one flipped byte, inside a feature tensor
    shards[1].write_bytes(bytes(corrupt))
    assert features.stale_shards(cache, source[0].shard_dir) == [shards[0].name, shards[1].name]
    # what a run calls before it reads anything: both recomputed, byte for byte
    again = features.ensure_features(source, as_dict(cfg.encoder), _key(cfg))
    assert again.computed == 2 and [s.read_bytes() for s in shards] == good


def test_an_unchanged_cache_is_not_read_again_a_touched_shard_is(compose_cfg, monkeypatch) -> None:
    """Starting a run does not hash the whole cache: a shard whose size and mtime are those it
    had when hashed is trusted; one whose stat changed is hashed (and kept: same bytes)."""
    cfg = compose_cfg("stage=1")
    source = _align_source(cfg)
    cache = features.ensure_features(source, as_dict(cfg.encoder), _key(cfg)).sources[0].shard_dir
    shards = sorted(cache.glob("*.tar"))
    hashed: list[str] = []
    original = features.sha256_file

    def spy(path: Path) -> str:
        hashed.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(features, "sha256_file", spy)
    assert features.stale_shards(cache, source[0].shard_dir) == []
    assert hashed == []  # no shard was read
    later = shards[0].stat().st_mtime_ns + 10**9
    os.utime(shards[0], ns=(later, later))  # touched: same bytes, another mtime
    assert features.stale_shards(cache, source[0].shard_dir) == []
    assert hashed == [shards[0].name]
    assert features.ensure_features(source, as_dict(cfg.encoder), _key(cfg)).computed == 0


def _align_source(cfg) -> list:
    from vlmlab.data.mixture import Source
    from vlmlab.data.prepare import resolve_dataset
    from vlmlab.schema import DataConfig, typed

    dataset = resolve_dataset(typed(cfg.data, DataConfig), "align")
    dataset["prepare"]()
    return [Source("data", Path(str(dataset["shard_dir"])))]


def test_require_names_why_a_stage_cannot_use_the_cache(compose_cfg) -> None:
    with pytest.raises(ConfigError) as err:
        train(compose_cfg("stage=full", "logger=none", "data.features=require"))
    assert "data.features" in str(err.value) and "trains the encoder" in str(err.value)
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(*STAGE1, "encoder.image=anyres", "data.features=require"))
    assert "encoder.anyres.grid_pinpoints" in str(err.value)


@pytest.mark.slow
def test_two_sweep_jobs_on_a_cold_cache_compute_it_once(tmp_path: Path) -> None:
    """Two real `python train.py` processes started together: one computes, both train."""
    data_root = tmp_path / "data"
    common = [
        f"data.root={data_root}",
        "data=tiny",
        "stage=1",
        "logger=none",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "stage.global_batch_size=8",
        "data.features=require",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # generate the image shards first (here): the race under test is the feature cache's
    from vlmlab.config import compose

    _align_source(compose([f"data.root={data_root}", "data=tiny", "stage=1"]))
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *common,
                f"paths.root={tmp_path / f'run{i}'}",
                f"connector={name}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, name in enumerate(("linear", "mlp"))
    ]
    outputs = [job.communicate(timeout=240)[0] for job in jobs]
    for job, out in zip(jobs, outputs):
        assert job.returncode == 0, out[-3000:]
    computing = [out.count("computing features of") for out in outputs]
    assert sorted(computing) == [0, 1], computing
    (cache,) = [c for c in _caches(data_root) if "align" in str(c)]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert features.stale_shards(cache, cache.parents[1]) == []  # complete and intact
    assert sum(s["num_samples"] for s in manifest["shards"]) == 48
    assert not list(cache.glob("*.tmp*"))
    for i in range(2):
        assert list((tmp_path / f"run{i}" / "checkpoints").glob("*/trainable.safetensors"))


def test_plan_prints_the_cache_size_and_the_memory_saved(compose_cfg) -> None:
    from vlmlab.plan import format_plan, plan

    cfg = compose_cfg(
        "encoder=clip336",
        "llm=vicuna7b",
        "stage=1",
        "data=llava15",
        "data.feature_dtype=bfloat16",
        tiny_data=False,
    )
    cache = plan(cfg)["feature_cache"]
    # LCS-558K at CLIP-L/14-336: 576 patches x 1024 x 2 bytes per image
    assert cache["bytes_per_image"] == 576 * 1024 * 2 and cache["images"] == 558_128
    assert round(cache["size_gb"]) == 658 and cache["usable"]
    assert 1.2 < cache["encoder_weights_gb_saved"] < 1.25  # 303 M fp32 parameters
    assert "658.4 GB on disk (bfloat16)" in format_plan(plan(cfg))
    assert not plan(compose_cfg("encoder=clip336", "llm=vicuna7b", "stage=full"))["feature_cache"][
        "usable"
    ]


def test_every_sample_reads_as_from_pixels_skips_included(tiny_model, tmp_path) -> None:
    """Text-only, missing, corrupt and valid images: the feature shard gives the SampleProcessor
    the same tokens and the same skip reasons as the image shard."""
    from PIL import Image

    from vlmlab.data.datamodule import SampleProcessor
    from vlmlab.data.shards import write_shards
    from vlmlab.data.tokenize import BadSample, TextEncoder

    model, tokenizer = tiny_model
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 64), (200, 30, 30)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"\x89PNG not an image")
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red shape"}]
    records = [
        {"id": "ok", "image": "ok.png", "conversations": turns},
        {"id": "broken", "image": "broken.png", "conversations": turns},
        {"id": "gone", "image": "gone.png", "conversations": turns},
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, *turns[1:]]},
    ]
    write_shards(records, images, tmp_path / "shards", samples_per_shard=4)
    model.eval()
    shard = tmp_path / "shards" / "shard-000000.tar"
    features.write_feature_shard(shard, tmp_path / "feat.tar", model.encoder, torch.float32)
    text = TextEncoder.for_model(model, tokenizer, "plain", 128)
    process = SampleProcessor(text, model.image_processor)

    def outcome(raw):  # type: ignore[no-untyped-def]
        try:
            return process({"__key__": "k", **raw})
        except BadSample as bad:
            return bad.reason

    pixels = dict(features._raw_samples(shard))
    cached = dict(features._raw_samples(tmp_path / "feat.tar"))
    assert pixels.keys() == cached.keys()
    for key in pixels:
        a, b = outcome(pixels[key]), outcome(cached[key])
        if isinstance(a, str):
            assert a == b, key
            continue
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["image_size"] == b["image_size"]
        if a["pixel_values"] is not None:
            with torch.no_grad():
                assert torch.equal(model.encoder(a["pixel_values"][None])[0], b["pixel_values"])
    assert [outcome(pixels[k]) for k in ("broken", "gone")] == ["corrupt_image", "missing_image"]
