"""`vlmlab eval`, `vlmlab chat`, model loading and the end-of-stage benchmark callback, on real
tiny models, real shapes data, a real Lightning fit and a real MLflow SQLite store."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import TINY_DATA
from vlmlab import cli
from vlmlab.config import compose
from vlmlab.data.shapes import HELDOUT_QUESTION, POSITIONS
from vlmlab.eval import scorers
from vlmlab.eval.benchmarks import SYNTHETIC, write_synthetic
from vlmlab.eval.chat import Conversation
from vlmlab.eval.generate import GenerationConfig, Generator, Request
from vlmlab.eval.loading import load_model
from vlmlab.eval.runner import MC_PROMPT, SHORT_ANSWER_PROMPT, read_benchmark
from vlmlab.models import build_vlm
from vlmlab.text.templates import Turn, get_template


def _verb(args: list[str]) -> int:
    with pytest.raises(SystemExit) as code:
        cli.main(args)
    return int(code.value.code)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real (short) stage-1 fit that runs every synthetic benchmark at its end, logged to MLflow."""
    from vlmlab.train import train

    root = tmp_path_factory.mktemp("run")
    cfg = compose(
        [
            f"paths.root={root}",
            f"data.root={root / 'data'}",
            *TINY_DATA,
            "stage=1",
            "stage.evaluate=true",
            "eval=all",
            "trainer.max_steps=2",
            # wider random init: greedy answers vary with the image instead of repeating one token
            "+llm.config.initializer_range=0.1",
        ]
    )
    result = train(cfg)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    (shapes,) = [p for p in (root / "data").glob("shapes-*") if "tmp" not in p.name]
    return {"root": root, "result": result, "run": run, "client": client, "shapes": shapes}


# ----------------------------------------------------------------------------- benchmark files


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_rejected_with_their_line_numbers(tmp_path: Path, caplog) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    rows = [
        json.dumps({"id": "a", "image": "ok.png", "question": "Colour?", "answer": "red"}),
        "{not json",
        json.dumps({"id": "c", "image": "ok.png", "question": "Colour?"}),
        json.dumps({"id": "d", "image": "missing.png", "question": "Colour?", "answer": "red"}),
        "",
        json.dumps(
            {"id": "f", "question": "Two plus two?", "answers": ["4", "four"], "type": "vqa"}
        ),
        json.dumps({"id": "g", "question": "Count?", "answer": "4", "type": "vqa"}),
        json.dumps({"id": "h", "question": "Dog?", "answer": "maybe", "type": "pope"}),
        json.dumps(
            {"id": "i", "question": "Pick", "options": ["x", "y"], "answer": "C", "type": "mc"}
        ),
        json.dumps(
            {"id": "j", "question": "Pick", "options": ["x", "y"], "answer": "y", "type": "mc"}
        ),
        json.dumps({"id": "a", "question": "Again?", "answer": "yes"}),
        json.dumps({"id": "l", "question": "Q", "answer": "x", "type": "essay"}),
        json.dumps(["a", "list"]),
    ]
    bench = _write(tmp_path / "bench.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        items, rejected = read_benchmark(bench)
    assert [i.id for i in items] == ["a", "f", "j"]
    assert items[0].image == tmp_path / "ok.png" and items[1].image is None
    assert items[2].answer_index == 1
    reasons = {r["line"]: r["reason"] for r in rejected}
    assert sorted(reasons) == [2, 3, 4, 7, 8, 9, 11, 12, 13]
    assert reasons[2].startswith("invalid JSON")
    assert "no answer" in reasons[3]
    assert "image not found" in reasons[4] and "missing.png" in reasons[4]
    assert "vqa needs" in reasons[7]
    assert "yes or no" in reasons[8]
    assert "'C'" in reasons[9]
    assert "duplicate id" in reasons[11]
    assert "essay" in reasons[12]
    assert "not a JSON object" in reasons[13]
    assert "bench.jsonl line 2 rejected" in caplog.text


def test_synthetic_benchmarks_follow_the_heldout_split(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    heldout = json.loads((trained["shapes"] / "heldout.json").read_text())
    paths = write_synthetic(trained["shapes"], tmp_path / "bench")
    assert set(paths) == set(SYNTHETIC)
    colour = _jsonl(paths["shapes_colour"])
    # exactly the question the training-time evaluation asks, on the same images
    assert [(r["question"], r["answer"]) for r in colour] == [
        (HELDOUT_QUESTION, h["colour"]) for h in heldout
    ]
    for row, record in zip(colour, heldout):
        assert (paths["shapes_colour"].parent / row["image"]).read_bytes() == (
            trained["shapes"] / "images" / record["image"]
        ).read_bytes()
    count = _jsonl(paths["shapes_count"])
    assert all(len(r["answers"]) == 10 and r["type"] == "vqa" for r in count)
    assert all(scorers.vqa_accuracy("1", r["answers"]) == 1.0 for r in count)  # one shape each
    mc = _jsonl(paths["shapes_position_mc"])
    for row, record in zip(mc, heldout):
        assert sorted(row["options"]) == sorted(POSITIONS)
        assert row["options"]["ABCD".index(row["answer"])] == record["position"]
    pope = _jsonl(paths["shapes_pope"])
    assert [r["answer"] for r in pope].count("yes") == len(heldout) == len(pope) // 2
    for row, record in zip(pope[::2], heldout):
        assert f"{record['colour']} {record['shape']}" in row["question"]
    for row, record in zip(pope[1::2], heldout):
        assert f"{record['colour']} {record['shape']}" not in row["question"]
    # all rows are valid for the reader
    for path in paths.values():
        assert read_benchmark(path)[1] == []


# ----------------------------------------------------------------------------- callback + CLI


def test_stage_end_eval_logs_every_benchmark_and_the_alias(trained: dict[str, Any]) -> None:
    metrics = trained["run"].data.metrics
    for name in SYNTHETIC:
        assert f"eval/{name}/accuracy" in metrics, sorted(metrics)  # values: the CLI test below
    for key in ("precision", "recall", "f1", "yes_ratio"):
        assert f"eval/shapes_pope/{key}" in metrics
    assert metrics["eval/accuracy"] == metrics["eval/shapes_colour/accuracy"]
    assert trained["result"]["metrics"]["eval/accuracy"] == metrics["eval/accuracy"]
    # the scoring rules are part of the run: a VQAv2 number says which reference it follows
    assert trained["run"].data.params["eval.scoring.vqa.mode"] == "official"
    artifacts = {
        a.path
        for a in trained["client"].list_artifacts(trained["run"].info.run_id, "eval/shapes_colour")
    }
    assert artifacts == {"eval/shapes_colour/predictions.jsonl", "eval/shapes_colour/summary.json"}


def test_cli_eval_on_the_run_id_reproduces_the_logged_numbers(
    trained: dict[str, Any], tmp_path: Path, capsys, monkeypatch
) -> None:
    """The run's own benchmark files, the model loaded from its MLflow run id: same predictions."""
    monkeypatch.setenv("VLMLAB_ROOT", str(trained["root"]))
    benches = [trained["shapes"] / "benchmarks" / f"{name}.jsonl" for name in SYNTHETIC]
    args = ["eval", trained["run"].info.run_id, "--out", str(tmp_path / "out"), "--batch-size", "5"]
    args += ["--max-new-tokens", "6", "--max-samples", "12"]  # the run's eval settings (tiny data)
    assert _verb([*args, *(f"--bench={b}" for b in benches)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["benchmark", "n", "accuracy"]
    logged = trained["run"].data.metrics
    eval_dir = next((trained["root"] / "eval").iterdir())
    for name in SYNTHETIC:
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        for metric, value in summary["metrics"].items():
            assert value == pytest.approx(logged[f"eval/{name}/{metric}"]), (name, metric)
        ours = _jsonl(tmp_path / "out" / name / "predictions.jsonl")
        theirs = _jsonl(eval_dir / name / "predictions.jsonl")
        assert [r["prediction"] for r in ours] == [r["prediction"] for r in theirs]
        # each row's score is the scorer's value for its prediction
        for row in ours:
            if row["type"] == "exact":
                assert row["score"] == scorers.exact_match(row["prediction"], row["answers"])
            elif row["type"] == "vqa":
                assert row["score"] == scorers.vqa_accuracy(row["prediction"], row["answers"])
        assert name in table
    colour = _jsonl(tmp_path / "out" / "shapes_colour" / "predictions.jsonl")
    assert len({r["prediction"] for r in colour}) > 1  # answers depend on the image


def test_cli_eval_prompts_circular_and_rejections(
    trained: dict[str, Any], tmp_path: Path, capsys
) -> None:
    ckpt = trained["result"]["checkpoint"]
    paths = write_synthetic(trained["shapes"], tmp_path / "bench")
    mc = paths["shapes_position_mc"]
    good = mc.read_text().splitlines()[:3]
    broken = _write(
        tmp_path / "bench" / "mixed.jsonl",
        [
            good[0],
            json.dumps(
                {
                    "id": "x",
                    "image": "images/nope.png",
                    "question": "Q",
                    "answer": "A",
                    "type": "mc",
                }
            ),
            "{oops",
            good[1],
            json.dumps({"id": "y", "question": "Q"}),
            good[2],
        ],
    )
    exact = _write(
        tmp_path / "bench" / "exact.jsonl", paths["shapes_position"].read_text().splitlines()[:2]
    )
    out = tmp_path / "out"
    args = ["eval", ckpt, "--bench", str(broken), "--bench", str(exact), "--out", str(out)]
    assert _verb([*args, "--circular", "--short-answer-prompt", "--max-new-tokens", "4"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "mixed" / "summary.json").read_text())
    assert summary["num_samples"] == 3
    assert [r["line"] for r in summary["rejected"]] == [2, 3, 5]
    assert "mixed: line 3 rejected: invalid JSON" in stdout
    rows = _jsonl(out / "mixed" / "predictions.jsonl")
    assert len(rows) == 3 * 4  # every rotation of the 4 options
    for row in rows:
        assert row["question"].endswith(MC_PROMPT)
        options = row["question"].splitlines()[1:5]
        assert options == [f"{'ABCD'[i]}. {o}" for i, o in enumerate(row["options"])]
    by_id: dict[str, list[bool]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row["score"] == 1.0)
    assert {tuple(sorted(r["rotation"] for r in rows if r["id"] == i)) for i in by_id} == {
        (0, 1, 2, 3)
    }
    assert summary["metrics"]["accuracy"] == scorers.circular_accuracy(by_id)
    exact_rows = _jsonl(out / "exact" / "predictions.jsonl")
    assert all(r["question"].endswith("\n" + SHORT_ANSWER_PROMPT) for r in exact_rows)


def test_cli_eval_bad_arguments_exit_2(trained: dict[str, Any], tmp_path: Path, capsys) -> None:
    ckpt = trained["result"]["checkpoint"]
    assert (
        _verb(["eval", ckpt, "--bench", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    )
    assert "none.jsonl" in capsys.readouterr().err
    bench = _write(tmp_path / "b.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    assert (
        _verb(["eval", str(tmp_path / "nockpt"), "--bench", str(bench), "--out", str(tmp_path)])
        == 2
    )
    assert "checkpoint" in capsys.readouterr().err


def test_make_synthetic_writes_self_contained_benchmarks(
    trained: dict[str, Any], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "synthetic"
    args = [f"paths.root={trained['root']}", f"data.root={trained['root'] / 'data'}", *TINY_DATA]
    assert _verb(["eval", "--make-synthetic", str(out), *args]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(f"{n}.jsonl" for n in SYNTHETIC)
    assert len(list((out / "images").iterdir())) == 12
    assert "shapes_colour" in capsys.readouterr().out


# ----------------------------------------------------------------------------- chat


def test_chat_prompt_prints_only_the_answer(
    trained: dict[str, Any], tmp_path: Path, capsys
) -> None:
    ckpt = trained["result"]["checkpoint"]
    heldout = json.loads((trained["shapes"] / "heldout.json").read_text())[0]
    image = trained["shapes"] / "images" / heldout["image"]
    code = _verb(
        ["chat", ckpt, str(image), "--prompt", "What colour is the shape?", "--max-new-tokens", "6"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    loaded = load_model(ckpt)
    assert loaded.template.name == "plain"  # a stage-1 checkpoint keeps its template
    with Image.open(image) as opened:
        request = Request(
            [Turn("human", "<image>\nWhat colour is the shape?")], opened.convert("RGB")
        )
    (expected,) = loaded.generator()([request], GenerationConfig(max_new_tokens=6))
    assert printed == expected + "\n"


def test_chat_keeps_history_and_the_image_in_the_first_turn(compose_cfg) -> None:
    cfg = compose_cfg()
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    generator = Generator(
        model.eval(),
        tokenizer,
        get_template("vicuna_v1", tokenizer.eos_token),
        model.encoder.image_transform,
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    chat = Conversation(generator, image, GenerationConfig(max_new_tokens=4))
    first = chat.ask("What colour is it?")
    second = chat.ask("And the shape?")
    assert [t.role for t in chat.turns] == ["human", "gpt", "human", "gpt"]
    assert (
        chat.turns[0].text == "<image>\nWhat colour is it?"
        and chat.turns[2].text == "And the shape?"
    )
    assert chat.turns[1].text == first and chat.turns[3].text == second
    # the second answer is the continuation of the whole conversation, image included
    history = [*chat.turns[:3]]
    (expected,) = generator([Request(history, image)], GenerationConfig(max_new_tokens=4))
    assert second == expected
    prompt = generator.template.prompt(history)
    assert prompt.count("<image>") == 1 and f"ASSISTANT: {first}</s>USER: And the shape?" in prompt


def test_chat_unknown_image_exits_2(trained: dict[str, Any], tmp_path: Path, capsys) -> None:
    assert (
        _verb(["chat", trained["result"]["checkpoint"], str(tmp_path / "no.png"), "--prompt", "hi"])
        == 2
    )
    assert "no.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --device / --dtype


def _colour_question(trained: dict[str, Any]) -> tuple[Path, list[str]]:
    heldout = json.loads((trained["shapes"] / "heldout.json").read_text())[0]
    image = trained["shapes"] / "images" / heldout["image"]
    return image, ["--prompt", "What colour is the shape?", "--max-new-tokens", "6"]


def test_eval_and_chat_run_on_the_device_given(
    trained: dict[str, Any], tmp_path: Path, capsys
) -> None:
    ckpt = trained["result"]["checkpoint"]
    image, prompt = _colour_question(trained)
    assert _verb(["chat", ckpt, str(image), *prompt]) == 0
    default = capsys.readouterr().out
    assert _verb(["chat", ckpt, str(image), *prompt, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == default  # the default here (no GPU) is cpu
    bench = write_synthetic(trained["shapes"], tmp_path / "bench")["shapes_colour"]
    args = ["eval", ckpt, "--bench", str(bench), "--out", str(tmp_path / "out")]
    assert _verb([*args, "--max-samples", "4", "--device", "cpu", "--dtype", "float32"]) == 0
    settings = json.loads((tmp_path / "out" / "shapes_colour" / "summary.json").read_text())
    assert settings["settings"]["device"] == "cpu" and settings["settings"]["dtype"] == "float32"
    loaded = load_model(ckpt, device="cpu")
    assert loaded.device == torch.device("cpu") and not loaded.model.training


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_a_device_this_machine_lacks_is_refused_naming_device(
    trained: dict[str, Any], tmp_path: Path, capsys
) -> None:
    ckpt = trained["result"]["checkpoint"]
    image, prompt = _colour_question(trained)
    for device, words in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("tpu9", "not a")):
        assert _verb(["chat", ckpt, str(image), *prompt, "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlmlab chat: --device:") and words in err, err
    bench = write_synthetic(trained["shapes"], tmp_path / "bench")["shapes_colour"]
    args = ["eval", ckpt, "--bench", str(bench), "--out", str(tmp_path / "out")]
    assert _verb([*args, "--device", "cuda"]) == 2
    assert "vlmlab eval: --device: cuda: no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_bf16_model_generates_on_cpu(trained: dict[str, Any], capsys) -> None:
    """--dtype bfloat16: every part computes in bf16 (pixels cast to the encoder's dtype)."""
    ckpt = trained["result"]["checkpoint"]
    image, prompt = _colour_question(trained)
    assert _verb(["chat", ckpt, str(image), *prompt, "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    bf16 = load_model(ckpt, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    with Image.open(image) as opened:
        request = Request(
            [Turn("human", "<image>\nWhat colour is the shape?")], opened.convert("RGB")
        )
    (answer,) = bf16.generator()([request], GenerationConfig(max_new_tokens=6))
    assert printed == answer + "\n"
    # the same prompt's next-token logits in bf16 and fp32 agree to bf16 precision
    fp32 = load_model(ckpt, device="cpu")
    logits = []
    for loaded in (fp32, bf16):
        gen = loaded.generator()
        ids = gen.prompt_ids(request)[None]
        pixels = gen.image_transform(request.image)[None].to(
            next(loaded.model.encoder.parameters()).dtype
        )
        with torch.no_grad():
            out = loaded.model(ids, torch.ones_like(ids), pixels)
        logits.append(out.logits[0, -1].float())
    assert torch.allclose(logits[0], logits[1], atol=0.1, rtol=0.05), (
        (logits[0] - logits[1]).abs().max()
    )


# ----------------------------------------------------------------------------- loading


def test_hf_export_and_merge_load_and_answer_like_the_checkpoint(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """The same weights through three doors answer the same; plain transformers agrees."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmlab.merge import merge_checkpoint
    from vlmlab.models.hf_llava import export_hf_llava

    loaded = load_model(trained["result"]["checkpoint"], template="vicuna_v1")
    hf_dir = export_hf_llava(
        loaded.model,
        loaded.tokenizer,
        tmp_path / "hf",
        get_template("vicuna_v1", loaded.tokenizer.eos_token),
    )
    merged = merge_checkpoint(Path(trained["result"]["checkpoint"]), tmp_path / "merged")
    from_hf, from_merged = load_model(hf_dir), load_model(merged, template="vicuna_v1")
    assert (from_hf.kind, from_hf.template.name, from_merged.kind) == ("hf", "vicuna_v1", "merged")

    heldout = json.loads((trained["shapes"] / "heldout.json").read_text())[:3]
    images = []
    for record in heldout:
        with Image.open(trained["shapes"] / "images" / record["image"]) as image:
            images.append(image.convert("RGB"))
    requests = [Request([Turn("human", f"<image>\n{HELDOUT_QUESTION}")], im) for im in images]
    config = GenerationConfig(max_new_tokens=8)
    answers = loaded.generator()(requests, config)
    assert from_hf.generator()(requests, config) == answers
    assert from_merged.generator()(requests, config) == answers

    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None
    processor = AutoProcessor.from_pretrained(hf_dir, backend="pil")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": HELDOUT_QUESTION}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    gen = from_hf.generator()
    for image, answer in zip(images, answers):
        batch = processor(text=prompt, images=image, return_tensors="pt")
        assert torch.equal(batch["input_ids"][0], gen.prompt_ids(requests[0]))
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=8, do_sample=False)
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        ids = _ours(gen, Request(requests[0].turns, image))
        assert new == ids and len(set(ids)) > 1
        assert answer == gen._clean(ids, gen.stop_strings())


def _ours(gen: Generator, request: Request) -> list[int]:
    from vlmlab.eval.generate import generate_ids

    (ids,) = generate_ids(
        gen.model,
        [gen.prompt_ids(request)],
        gen.image_transform(request.image)[None],
        GenerationConfig(max_new_tokens=8),
        gen.tokenizer.pad_token_id,
    )
    return ids


def test_eval_config_fails_fast_on_a_missing_benchmark_file(compose_cfg, tmp_path: Path) -> None:
    from vlmlab.errors import ConfigError
    from vlmlab.eval.callback import build_eval_callback
    from vlmlab.schema import EvalConfig, typed

    generated = {"synthetic_root": tmp_path / "shapes"}

    def build(*overrides: str, dataset: dict = generated):  # type: ignore[type-arg]
        cfg = compose_cfg(*overrides)
        settings = typed(cfg.eval, EvalConfig)
        return build_eval_callback(settings, bool(cfg.stage.evaluate), dataset, None, tmp_path)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=r"eval\.benchmarks.*nope\.jsonl"):
        build("stage=2", f"eval.benchmarks=[shapes_colour,{tmp_path / 'nope.jsonl'}]")
    assert build("stage=1") is None
    callback = build("stage=2", "eval=tiny")
    assert callback is not None and callback.shapes_root == tmp_path / "shapes"
    assert callback.settings["max_samples"] == 12 and callback.alias == "shapes_colour"
    # a data source that generates nothing: synthetic benchmarks are skipped, not an error
    plain = build("stage=2", "eval=tiny", dataset={"synthetic_root": None})
    assert plain is not None and plain.shapes_root is None and plain._files() == {}
