"""Attention kernels (`llm.attn_implementation`, `encoder.attn_implementation`), the QLoRA
device map and `--device` / `--dtype` resolution, on real tiny models built from configs.

Measured here (CPU, fp32): the tiny Llama's logits under eager and sdpa differ by < 1e-6 on a
left-padded batch (asserted <= 1e-5); CLIP/SigLIP towers (transformers) and timm towers give
the same features under both kernels (asserted <= 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_encoders import ARCH, BACKENDS, HALF, TIMM_ARCH, TIMM_TINY_NAME
from vlmlab.config import compose
from vlmlab.errors import ConfigError
from vlmlab.eval.loading import resolve_device, resolve_dtype, runtime_config
from vlmlab.models import build_tokenizer, build_vlm
from vlmlab.models.encoder import build_encoder
from vlmlab.models.llm import ATTN_IMPLEMENTATIONS, build_llm, quantized_device_map

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")


@pytest.fixture(scope="module")
def tiny_llm_args() -> dict:
    llm = compose([]).llm
    from vlmlab.models import as_dict

    args = as_dict(llm)
    return {"tokenizer": build_tokenizer(args["tokenizer"]), "config": args["config"]}


def _llm(args: dict, attn: str | None) -> torch.nn.Module:
    return build_llm(args["tokenizer"], config=args["config"], attn_implementation=attn).eval()


def _padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the masked path of each kernel runs too
    mask[2, :9] = 0
    return ids, mask


def test_llm_eager_and_sdpa_same_logits_and_the_choice_is_in_the_config(tiny_llm_args) -> None:
    logits = {}
    for attn in ("eager", "sdpa"):
        model = _llm(tiny_llm_args, attn)
        assert model.config._attn_implementation == attn
        ids, mask = _padded_batch(model.config.vocab_size)
        with torch.no_grad():
            logits[attn] = model(input_ids=ids, attention_mask=mask).logits
    real = _padded_batch(1 << 20)[1].bool()  # padded positions' logits are meaningless
    diff = (logits["eager"] - logits["sdpa"])[real].abs().max().item()
    assert diff <= 1e-5, diff
    # null keeps transformers' default, which is sdpa for Llama in transformers 5
    assert _llm(tiny_llm_args, None).config._attn_implementation == "sdpa"


def test_the_key_reaches_the_model_through_build_vlm() -> None:
    cfg = compose(["llm.attn_implementation=eager", "encoder.attn_implementation=eager"])
    model, _ = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert model.llm.config._attn_implementation == "eager"
    assert model.encoder.vision.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_eager_and_sdpa_same_features(family: str, backend: str) -> None:
    args: dict = {"family": family, "transform": HALF, "config": ARCH, "backend": backend}
    if backend == "timm":
        timm_kwargs = dict(TIMM_ARCH, **({"act_layer": "gelu_tanh"} if family == "siglip" else {}))
        args |= {"timm_name": TIMM_TINY_NAME[family], "timm_kwargs": timm_kwargs}
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = {}
    for attn in ("eager", "sdpa"):
        encoder = build_encoder(attn_implementation=attn, **args).eval()
        if backend == "timm":
            flags = {m.fused_attn for m in encoder.modules() if hasattr(m, "fused_attn")}
            assert flags == {attn == "sdpa"}
        else:
            assert encoder.vision.config._attn_implementation == attn
        with torch.no_grad():
            features[attn] = encoder(pixels)
    assert (features["eager"] - features["sdpa"]).abs().max().item() <= 1e-5


def test_bad_value_names_the_key(compose_cfg) -> None:
    for key, backend in (("llm", "transformers"), ("encoder", "transformers"), ("encoder", "timm")):
        cfg = compose_cfg(f"{key}.attn_implementation=flash", f"encoder.backend={backend}")
        with pytest.raises(ConfigError) as info:
            build_vlm(cfg.encoder, cfg.connector, cfg.llm)
        assert info.value.key == f"{key}.attn_implementation"
        assert "sdpa" in str(info.value) and "'flash'" in str(info.value)


@NO_CUDA
@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_is_refused_here_before_any_weights_load(
    compose_cfg, tmp_path: Path, kernel: str
) -> None:
    # pretrained weights that do not exist: the refusal must come first, not an OSError
    cfg = compose_cfg(
        f"llm.attn_implementation={kernel}",
        "llm.pretrained=true",
        f"llm.name_or_path={tmp_path / 'no-such-model'}",
    )
    with pytest.raises(ConfigError) as info:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert info.value.key == "llm.attn_implementation"
    assert "CUDA GPU" in str(info.value) and "use sdpa" in str(info.value)
    cfg = compose_cfg(
        f"encoder.attn_implementation={kernel}",
        "encoder.pretrained=true",
        f"encoder.name_or_path={tmp_path / 'no-such-tower'}",
    )
    with pytest.raises(ConfigError) as info:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert info.value.key == "encoder.attn_implementation" and "CUDA GPU" in str(info.value)
    # timm has no flash-attn path on any machine: it says so, and what to use
    cfg = compose_cfg(f"encoder.attn_implementation={kernel}", "encoder.backend=timm")
    with pytest.raises(ConfigError) as info:
        build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    assert info.value.key == "encoder.attn_implementation" and "timm" in str(info.value)


def test_plan_builds_a_flash_preset_on_meta_without_a_gpu() -> None:
    """A shape-only build runs no kernel, so `vlmlab plan` works on a laptop."""
    from vlmlab.plan import build_meta_model

    cfg = compose(
        ["encoder=clip336", "llm=vicuna7b", "encoder.attn_implementation=flash_attention_2"]
    )
    model, _ = build_meta_model(cfg)
    assert model.encoder.hidden_size == 1024


def test_every_preset_names_the_key() -> None:
    for group in ("llm", "encoder"):
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            preset = yaml.safe_load(path.read_text())
            assert "attn_implementation" in preset, path
            value = preset["attn_implementation"]
            assert value is None or value in ATTN_IMPLEMENTATIONS, path
    # the LLaVA-size LLM presets say how to pick flash attention
    assert "flash_attention_2" in (REPO / "conf/llm/vicuna7b.yaml").read_text()


# ----------------------------------------------------------------------------- QLoRA placement


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 0),  # the launching process (Lightning's rank 0)
        ({"LOCAL_RANK": "3"}, 3),  # torchrun, Lightning's launcher for ranks > 0
        ({"SLURM_LOCALID": "5"}, 5),  # srun, read by Lightning's SLURMEnvironment
        ({"LOCAL_RANK": "2", "SLURM_LOCALID": "0"}, 2),  # torchrun inside one srun task per node
        ({"LOCAL_RANK": "", "SLURM_LOCALID": "1"}, 1),
    ],
)
def test_quantized_device_map_follows_the_local_rank(env: dict, expected: int) -> None:
    assert quantized_device_map(env) == {"": expected}


def test_quantized_device_map_rejects_a_bad_local_rank() -> None:
    with pytest.raises(ConfigError) as info:
        quantized_device_map({"LOCAL_RANK": "zero"})
    assert info.value.key == "LOCAL_RANK"


# ----------------------------------------------------------------------------- --device / --dtype


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    for bad, words in (("gpu", "not a device"), ("cuda:x", "not a device")):
        with pytest.raises(ConfigError, match=words) as info:
            resolve_device(bad)
        assert info.value.key == "--device"
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("cuda:64")  # no machine has 65 GPUs visible
    assert resolve_dtype("auto") is None and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("fp8")


@NO_CUDA
def test_cuda_is_refused_without_a_gpu() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU") as info:
        resolve_device("cuda")
    assert info.value.key == "--device"


def test_a_flash_run_is_evaluated_with_sdpa_off_cuda() -> None:
    """A checkpoint trained with flash attention on GPUs still loads for eval on a CPU."""
    recorded = {
        "encoder": {"dtype": "float32", "attn_implementation": "flash_attention_2"},
        "connector": {},
        "llm": {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"},
    }
    adapted = runtime_config(recorded, torch.device("cpu"), "bfloat16")
    assert adapted["llm"] == {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert adapted["encoder"] == {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert recorded["llm"]["attn_implementation"] == "flash_attention_2"  # record untouched
    kept = runtime_config({**recorded, "llm": {"dtype": "bfloat16"}}, torch.device("cpu"))
    assert kept["llm"] == {"dtype": "bfloat16"} and kept["encoder"]["dtype"] == "float32"
