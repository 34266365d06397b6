"""`vlmlab shards`: LLaVA JSON -> validated, deterministic, resumable WebDataset shards."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlmlab.data import convert
from vlmlab.data.synthetic_llava import write_llava_dataset
from vlmlab.data.tokenize import TextEncoder
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import IMAGE_TOKEN
from vlmlab.text.templates import get_template

M = 16  # --image-tokens in these tests


def _shards(json_path: Path, images: Path, out: Path, *extra: str) -> int:
    args = [
        str(json_path),
        "--image-root",
        str(images),
        "--out",
        str(out),
        "--image-tokens",
        str(M),
    ]
    return convert.main([*args, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    """Everything the converter publishes (shards, manifest, rejected report), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_llava_dataset(tmp_path_factory.mktemp("llava"), 40)


def test_round_trip_through_the_datamodule(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    from vlmlab.data.datamodule import VLMDataModule
    from vlmlab.models.image_transform import ImageTransform

    json_path, images = dataset
    out = tmp_path / "shards"
    assert _shards(json_path, images, out, "--samples-per-shard", "8") == 0
    records = json.loads(json_path.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    # counts, per shard and in total
    assert manifest["num_input"] == manifest["num_samples"] == len(records) == 40
    assert manifest["num_rejected"] == 0 and manifest["rejected"] == {}
    assert manifest["num_with_image"] == sum(1 for r in records if "image" in r) == 32
    assert manifest["num_text_only"] == 8
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in manifest["shards"]] == [8] * 5
    for shard in manifest["shards"]:
        payload = (out / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(payload).hexdigest()
        assert shard["bytes"] == len(payload)
        assert sum(shard["modality"].values()) == shard["num_samples"]
    expected_modality = [
        (sum(1 for r in records[i : i + 8] if "image" in r)) for i in range(0, 40, 8)
    ]
    assert [s["modality"]["image"] for s in manifest["shards"]] == expected_modality
    assert manifest["converter"]["args"]["samples_per_shard"] == 8
    assert manifest["converter"]["version"] == convert.CONVERTER_VERSION
    # token lengths, measured here independently with the real tokenizer and template
    tokenizer = build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})
    encoder = TextEncoder(
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        M,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        max_length=100_000,
    )
    lengths = sorted(
        len(encoder.encode(r["conversations"], "image" in r)["input_ids"]) for r in records
    )
    hist = manifest["token_lengths"]
    assert (hist["count"], hist["min"], hist["max"]) == (40, lengths[0], lengths[-1])
    assert manifest["num_tokens"] == sum(lengths)
    assert sum(hist["counts"]) == 40 and lengths[-1] <= hist["edges"][-1]
    assert len(hist["counts"]) == len(hist["edges"])  # the last count: above the last edge
    for (lo, hi), count in zip(pairwise(hist["edges"]), hist["counts"]):
        assert count == sum(1 for n in lengths if lo < n <= hi)
    assert hist["counts"][-1] == 0
    assert lengths[0] > 16 and sum(1 for c in hist["counts"] if c) >= 2  # a real spread
    # the shards stream through our datamodule: every id once, with images where they belong
    module = VLMDataModule(
        out,
        encoder,
        ImageTransform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        batch_size=4,
    )
    seen, with_pixels, skipped = [], 0, {}
    for batch in module.train_dataloader():
        seen += batch["ids"]
        with_pixels += 0 if batch["pixel_values"] is None else len(batch["pixel_values"])
        skipped.update(batch["skipped"])
    assert sorted(seen) == sorted(r["id"] for r in records)
    assert with_pixels == 32 and not skipped


def _write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def _turns(*texts: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


# (id, entry) per defect; each must be rejected with its reason (the key of this dict)
DEFECTS: dict[str, Any] = {
    "missing_image": {
        "id": "d1",
        "image": "absent.png",
        "conversations": _turns("<image>\nQ?", "A"),
    },
    "corrupt_image": {
        "id": "d2",
        "image": "corrupt.png",
        "conversations": _turns("<image>\nQ?", "A"),
    },
    "unsupported_image_format": {
        "id": "d3",
        "image": "ok.gif",
        "conversations": _turns("<image>\nQ?", "A"),
    },
    "image_token_count": {"id": "d4", "image": "ok.png", "conversations": _turns("Q?", "A")},
    "image_token_position": {
        "id": "d5",
        "image": "ok.png",
        "conversations": _turns("Q?", "A", "<image>\nQ2?", "B"),
    },
    "empty_conversation": {"id": "d6", "conversations": []},
    "wrong_role_order": {"id": "d7", "conversations": [{"from": "gpt", "value": "A"}]},
    "empty_turn": {"id": "d8", "conversations": _turns("Q?", "  ")},
    "too_long": {"id": "d9", "conversations": _turns("Q? " * 200, "A")},
    "duplicate_id": {"id": "good-0", "conversations": _turns("Again?", "Yes")},
    "bad_entry": {"conversations": _turns("No id?", "None")},
}


def test_rejected_report_has_one_entry_per_defect(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    _write_png(images / "ok.png")
    _write_png(images / "good.png")
    Image.new("RGB", (8, 8)).save(images / "ok.gif")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = [
        {"id": "good-0", "image": "good.png", "conversations": _turns("<image>\nColour?", "Red")},
        {"id": "good-1", "conversations": _turns("Hello?", "Hi")},
    ]
    lines = [json.dumps(good[0]), json.dumps(good[1])]
    lines += [json.dumps(entry) for entry in DEFECTS.values()]
    lines.insert(3, '{"id": "broken", "conversations": [')  # bad_json, at index 3
    json_path = tmp_path / "data.jsonl"
    json_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert _shards(json_path, images, out, "--max-length", "200") == 0
    report = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = [r["reason"] for r in report]
    assert sorted(reasons) == sorted([*DEFECTS, "bad_json"])  # one entry per reason
    assert report == sorted(report, key=lambda r: r["index"])
    by_reason = {r["reason"]: r for r in report}
    assert by_reason["bad_json"]["index"] == 3 and by_reason["bad_json"]["id"] is None
    for reason, entry in DEFECTS.items():
        assert by_reason[reason]["id"] == entry.get("id"), reason
        assert lines[by_reason[reason]["index"]] == json.dumps(entry), reason
    assert "good-0" in by_reason["duplicate_id"]["detail"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == {reason: 1 for reason in sorted([*DEFECTS, "bad_json"])}
    assert (manifest["num_input"], manifest["num_samples"], manifest["num_rejected"]) == (
        len(lines),
        2,
        len(DEFECTS) + 1,
    )
    stdout = capsys.readouterr().out
    assert f"rejected {len(DEFECTS) + 1} of {len(lines)} entries" in stdout
    for reason in DEFECTS:
        assert f"  {reason}: 1" in stdout


def test_workers_give_byte_identical_output(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    json_path, images = dataset
    one, two = tmp_path / "one", tmp_path / "two"
    assert _shards(json_path, images, one, "--samples-per-shard", "6", "--workers", "1") == 0
    assert _shards(json_path, images, two, "--samples-per-shard", "6", "--workers", "2") == 0
    files = _files(one)
    assert len([n for n in files if n.endswith(".tar")]) == 7
    assert files == _files(two)


def test_max_shard_bytes_bounds_every_shard(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    json_path, images = dataset
    out = tmp_path / "out"
    assert _shards(json_path, images, out, "--max-shard-bytes", "20000") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 1 and all(size <= 20000 for size in sizes)
    assert sizes == [(out / s["name"]).stat().st_size for s in manifest["shards"]]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 40


def test_rerun_keeps_finished_shards_and_repairs_the_rest(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    json_path, images = dataset
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert _shards(json_path, images, reference, "--samples-per-shard", "8") == 0
    assert _shards(json_path, images, out, "--samples-per-shard", "8") == 0
    # an interruption: no manifest, the last shard never renamed, a half-written temp file,
    # and one finished shard damaged afterwards
    (out / "manifest.json").unlink()
    (out / "shard-000004.tar").unlink()
    (out / "shard-000003.tar.tmp-99999").write_bytes(b"partial")
    damaged = out / "shard-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    kept = {name: _stamp(out / name) for name in ("shard-000000.tar", "shard-000001.tar")}
    kept["shard-000003.tar"] = _stamp(out / "shard-000003.tar")
    assert _shards(json_path, images, out, "--samples-per-shard", "8") == 0
    assert {name: _stamp(out / name) for name in kept} == kept  # never rewritten
    assert (
        _stamp(damaged) != (0, 0)
        and damaged.read_bytes() == (reference / damaged.name).read_bytes()
    )
    assert _files(out) == _files(reference)  # temp file gone, everything identical
    # a rerun with another plan leaves no shard of the old one behind
    assert _shards(json_path, images, out, "--samples-per-shard", "20") == 0
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert sorted(p.name for p in (out / ".parts").iterdir()) == [
        "shard-000000.tar.json",
        "shard-000001.tar.json",
    ]


def test_bad_cli_input_exits_2_naming_the_flag(
    dataset: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    json_path, images = dataset
    assert _shards(tmp_path / "missing.json", images, tmp_path / "o") == 2
    assert "json" in capsys.readouterr().err
    assert _shards(json_path, tmp_path / "no-images", tmp_path / "o") == 2
    assert "--image-root" in capsys.readouterr().err
    assert _shards(json_path, images, tmp_path / "o", "--tokenizer", str(tmp_path / "nope")) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert _shards(json_path, images, tmp_path / "o", "--template", "nope") == 2
    assert "--template" in capsys.readouterr().err
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"id": 1}')
    assert _shards(not_a_list, images, tmp_path / "o") == 2
    assert "not a list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _shards(json_path, images, tmp_path / "o", "--samples-per-shard", "0")
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_killed_conversion_resumes_to_identical_output(tmp_path: Path) -> None:
    """Acceptance: 5,000 samples, SIGKILL once the first shards exist, rerun, compare."""
    json_path, images = write_llava_dataset(tmp_path / "data", 5000)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["--samples-per-shard", "50", "--image-tokens", str(M)]
    command = [
        sys.executable,
        "-m",
        "vlmlab",
        "shards",
        str(json_path),
        "--image-root",
        str(images),
    ]
    process = subprocess.Popen([*command, "--out", str(killed), *args])
    deadline = time.monotonic() + 300
    while not list(killed.glob("shard-*.tar")):
        assert process.poll() is None, "the converter ended before writing a shard"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists(), "not interrupted: raise the sample count"
    finished = {p.name: _stamp(p) for p in killed.glob("shard-*.tar")}
    assert 0 < len(finished) < 100
    rerun = subprocess.run([*command, "--out", str(killed), *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(finished)} kept from a previous run)" in rerun.stdout
    assert {name: _stamp(killed / name) for name in finished} == finished  # not rewritten
    assert _shards(json_path, images, reference, "--samples-per-shard", "50", "--workers", "2") == 0
    files = _files(killed)
    assert len([n for n in files if n.endswith(".tar")]) == 100
    assert files == _files(reference)


def _pixels_by_id(shard_dir: Path, transform: Any) -> dict[str, Any]:
    """pixel_values per sample id, decoded by the loader's own SampleProcessor."""
    import webdataset as wds

    from vlmlab.data.datamodule import SampleProcessor

    tokenizer = build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})
    encoder = TextEncoder(
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        M,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        max_length=4096,
    )
    process = SampleProcessor(encoder, transform)
    shards = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    return {s["id"]: s["pixel_values"] for s in map(process, samples)}


def test_presized_shards_give_identical_pixels(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    json_path, images = dataset
    plain, presized = tmp_path / "plain", tmp_path / "presized"
    assert _shards(json_path, images, plain, "--samples-per-shard", "16") == 0
    assert (
        _shards(json_path, images, presized, "--samples-per-shard", "16", "--presize", "tiny") == 0
    )
    transform = convert.encoder_transform("tiny")
    assert transform.size == 64  # the 32 px test images are padded and upscaled
    manifest = json.loads((presized / "manifest.json").read_text())
    assert manifest["converter"]["args"]["presize"]["encoder"] == "tiny"
    assert manifest["converter"]["args"]["presize"]["size"] == 64
    with tarfile.open(presized / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert any(n.endswith(".ppm") for n in names) and not any(n.endswith(".png") for n in names)
    expected, got = _pixels_by_id(plain, transform), _pixels_by_id(presized, transform)
    assert expected.keys() == got.keys() and len(expected) == 40
    assert sum(v is not None for v in got.values()) == 32
    for sample_id, pixels in expected.items():
        if pixels is None:
            assert got[sample_id] is None
        else:
            assert torch.equal(pixels, got[sample_id]), sample_id
    assert _shards(json_path, images, tmp_path / "x", "--presize", "nope") == 2


def test_sixteen_bit_and_float_images_are_read_as_the_loader_reads_them(tmp_path: Path) -> None:
    """A 16-bit PNG is stored presized as its top 8 bits, the pixels the loader gives the
    original (PIL alone clips it to white); a float image (mode F, here TIFF bytes under a .png
    name) is rejected as `unusable_image` at conversion, as the loader would skip it."""
    import io

    import numpy as np
    import torch

    images = tmp_path / "images"
    images.mkdir()
    values = np.random.default_rng(0).integers(0, 65536, (24, 40)).astype(np.uint16)
    Image.fromarray(values).save(images / "deep.png")
    floats = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32), "F").save(floats, format="TIFF")
    (images / "float.png").write_bytes(floats.getvalue())
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "grey"}]
    entries = [{"id": n, "image": f"{n}.png", "conversations": turns} for n in ("deep", "float")]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(entries))
    plain, presized = tmp_path / "plain", tmp_path / "presized"
    assert _shards(json_path, images, plain) == 0
    assert _shards(json_path, images, presized, "--presize", "tiny") == 0
    manifest = json.loads((presized / "manifest.json").read_text())
    assert manifest["num_samples"] == 1 and manifest["rejected"] == {"unusable_image": 1}
    transform = convert.encoder_transform("tiny")
    expected, got = _pixels_by_id(plain, transform), _pixels_by_id(presized, transform)
    assert torch.equal(expected["deep"], got["deep"])
    eight_bit = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    assert torch.equal(got["deep"], transform(eight_bit))
