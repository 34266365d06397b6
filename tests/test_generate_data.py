"""`vlmlab generate` (issue 18, Build 2; Acceptance 3 and 4): prompts, parsing, filters, retries,
the cache, resume after SIGKILL, bad inputs. The OpenAI-compatible server is real (http.server
on loopback, in a subprocess, serving the random-init tiny Llama); run as a script this file
is that server.

Why the server shapes the text: a random-init model emits random tokens and cannot learn the
`Question: ... === Answer: ...` layout an instruction-tuned model returns, so the server puts
the model's words into that layout; everything else (HTTP, failures, the model's forward) is
real.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-vlmlab-test-SECRET-0123456789"


# ---------------------------------------------------------------- the server (a subprocess)


def serve(port_file: Path, count_file: Path, fail_rate: float, seed: int) -> None:
    """Serve llm:tiny on /v1/chat/completions; fail `fail_rate` of requests with 429 or 500."""
    import random

    from vlmlab.curate.generate.backends import LocalBackend

    backend = LocalBackend("llm:tiny")
    rng = random.Random(seed)
    lock = threading.Lock()
    state = {"requests": 0, "failed": 0, "auth": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(
            self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError):  # a client SIGKILLed mid-request
                self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                state["auth"] += self.headers.get("Authorization") == f"Bearer {SECRET}"
                roll = rng.random()
                fail = roll < fail_rate
                state["failed"] += fail
                count_file.write_text(json.dumps(state))
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": "not found"})
                return
            if fail:
                if roll < fail_rate / 2:
                    self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                else:
                    self._send(500, {"error": "boom"})
                return
            params = {
                k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed") if k in body
            }
            text = backend.complete(body["messages"], params)
            words = [*re.findall(r"[A-Za-z]+", text), "image", "scene", "photo", "picture"]
            half = max(1, len(words) // 2)
            reply = (
                f"Question:\n{' '.join(words[:half])}?\n===\n"
                f"Answer:\n{' '.join(words[half:])} here.\n==="
            )
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(port_file)
    server.serve_forever()


# ---------------------------------------------------------------- helpers


def _images_and_jsonl(root: Path, n: int, bad: bool = True) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (40, 30), (i % 256, (7 * i) % 256, 90)).save(root / f"img{i}.png")
        entry = {
            "id": f"e{i:03d}",
            "image": f"img{i}.png",
            "captions": [f"A dog lies on a sofa number {i}.", "A brown dog rests indoors."],
            "boxes": [["dog", 4, 5, 20, 10], {"category": "couch", "bbox": [0, 10, 40, 20]}],
        }
        lines.append(json.dumps(entry))
        if bad and i == n // 3:  # Acceptance 4: three bad inputs among the good ones
            lines.append("{this is not json")
            lines.append(json.dumps({"id": "gone", "image": "missing.png", "captions": ["x"]}))
            lines.append(
                json.dumps({"id": "mute", "image": "img0.png", "boxes": [["dog", 1, 1, 2, 2]]})
            )
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def _tiny_cfg(*overrides: str) -> Any:
    from vlmlab.curate.generate.settings import compose_generate

    return compose_generate(list(overrides), "tiny")


# ---------------------------------------------------------------- fast tests


def test_prompts_hold_few_shot_context_and_normalised_boxes() -> None:
    from vlmlab.curate.generate.inputs import Box, Source
    from vlmlab.curate.generate.prompts import load_prompts, messages

    prompts = load_prompts("prompts", ["conversation", "detail", "complex"], 2)
    source = Source(0, 1, "x", "a.png", ["A cat on a mat."], [Box("cat", 10, 20, 30, 40)], 100, 200)
    conv = messages(prompts["conversation"], source)
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert conv[-1]["content"] == "A cat on a mat."  # LLaVA: conversations see captions only
    detail = messages(prompts["detail"], source)
    assert detail[-1]["content"].endswith(
        "cat: [0.100, 0.100, 0.400, 0.300]"
    )  # xywh px -> xyxy 0-1


def test_replies_parse_into_llava_turns_with_one_image_token() -> None:
    from vlmlab.curate.generate.inputs import Source
    from vlmlab.curate.generate.prompts import Unparseable, conversations, load_prompts

    prompts = load_prompts("prompts", ["conversation", "detail", "complex"], 1)
    source = Source(0, 1, "x", "a.png", ["c"])
    reply = "Question:\nWhat is it?\n===\nAnswer:\nA cat.\n===\nQuestion:\nWhere?\n===\nAnswer:\nOn a mat.\n==="
    turns = conversations(prompts["conversation"], source, reply)
    assert turns == [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "On a mat."},
    ]
    assert len(conversations(prompts["complex"], source, reply)) == 2  # one question
    detail = conversations(prompts["detail"], source, "A cat sits on a mat.")
    assert (
        detail[0]["value"].startswith("<image>\n") and detail[1]["value"] == "A cat sits on a mat."
    )
    assert detail == conversations(prompts["detail"], source, "A cat sits on a mat.")  # same pick
    with pytest.raises(Unparseable):
        conversations(prompts["conversation"], source, "random words, no structure")


def test_curate_filters_judge_generated_entries() -> None:
    from vlmlab.curate.generate.inputs import Box, Source
    from vlmlab.curate.generate.prompts import load_prompts
    from vlmlab.curate.generate.run import _row
    from vlmlab.curate.generate.settings import compose_generate
    from vlmlab.curate.pipeline import build_filters
    from vlmlab.curate.settings import CurateConfig

    cfg = compose_generate([], "default")  # every filter on
    filters = build_filters(CurateConfig(filters=cfg.filters))
    prompt = load_prompts("prompts", ["conversation"], 1)["conversation"]
    source = Source(
        0, 7, "s", "a.png", ["A dog sleeps on a couch in a living room."], [Box("dog", 0, 0, 1, 1)]
    )

    def qa(answer: str) -> str:
        return f"Question:\nWhat is the dog doing in this picture?\n===\nAnswer:\n{answer}\n==="

    good = _row(
        prompt,
        filters,
        source,
        "conversation",
        qa("The dog is sleeping on the couch, curled up and resting in the living room."),
    )
    meta = _row(
        prompt,
        filters,
        source,
        "conversation",
        qa(
            "As an AI language model, I cannot see the image, so I cannot tell you what the dog is doing."
        ),
    )
    extra = _row(
        prompt,
        filters,
        source,
        "conversation",
        qa(
            "The dog is sleeping on the couch next to a giraffe that stands by the window of the room."
        ),
    )
    assert good["status"] == "kept", good
    assert meta["status"] == "rejected" and "meta" in meta["reasons"], meta
    assert extra["status"] == "rejected" and extra["reason"] == "hallucination", extra
    assert extra["evidence"]["hallucination"]["objects"] == ["giraffe"]


def test_coco_captions_and_instances_become_sources(tmp_path: Path) -> None:
    from PIL import Image

    from vlmlab.curate.generate.inputs import BadInput, Source, read_sources

    Image.new("RGB", (50, 40)).save(tmp_path / "a.jpg")
    Image.new("RGB", (50, 40)).save(tmp_path / "b.jpg")
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 50, "height": 40},
        {"id": 2, "file_name": "b.jpg", "width": 50, "height": 40},
    ]
    caps = {"images": images, "annotations": [{"image_id": 1, "caption": " A cat. "}]}
    inst = {
        "categories": [{"id": 17, "name": "cat"}],
        "annotations": [{"image_id": 1, "bbox": [5, 4, 10, 8], "category_id": 17}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    got = list(read_sources(tmp_path / "captions.json", tmp_path / "instances.json", tmp_path))
    assert isinstance(got[0], Source) and got[0].captions == ["A cat."]
    assert [(b.category, b.x, b.w) for b in got[0].boxes] == [("cat", 5.0, 10.0)]
    assert isinstance(got[1], BadInput) and (got[1].line, got[1].reason) == (2, "no_captions")


def test_unknown_keys_are_config_errors() -> None:
    from vlmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="modle"):
        _tiny_cfg("+backend.modle=x")
    with pytest.raises(ConfigError, match="similarty"):
        _tiny_cfg("+filters.generic.similarty=0.5")
    with pytest.raises(ConfigError, match="types"):
        _tiny_cfg("types=[dialogue]")


def test_torn_journal_tail_is_cut_and_redone(tmp_path: Path) -> None:
    from vlmlab.curate.generate.run import JOURNAL, read_journal

    path = tmp_path / JOURNAL
    path.write_text(
        json.dumps({"key": "a"}) + "\n" + json.dumps({"key": "b"}) + "\n" + '{"key": "c", "ent'
    )
    assert list(read_journal(path)) == ["a", "b"]
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 2


def test_retries_honour_retry_after_and_stop_on_4xx() -> None:
    from vlmlab.curate.generate.backends import OpenAIBackend, RequestFailed
    from vlmlab.curate.generate.settings import BackendConfig, RetryConfig

    codes = [429, 503, 200, 400]
    seen: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            code = codes.pop(0)
            body = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        backend = OpenAIBackend(
            BackendConfig(url=url, model="m"), RetryConfig(attempts=4, base_s=0.01, max_s=1.0)
        )
        assert backend.complete([{"role": "user", "content": "hi"}], {}) == "ok"
        assert backend.requests == 3 and seen[1] - seen[0] >= 0.4  # Retry-After waited out
        with pytest.raises(RequestFailed, match="HTTP 400"):
            backend.complete([{"role": "user", "content": "hi"}], {})
        assert backend.requests == 4  # a 400 is not retried
    finally:
        server.shutdown()


def test_local_backend_bad_inputs_reported_and_rerun_is_free(tmp_path: Path) -> None:
    """Acceptance 4 in-process: a non-JSON line, a missing image and an entry without captions
    are reported with line and reason; every other entry is generated; a rerun into a new folder
    with the same cache asks the model nothing."""
    from vlmlab.curate.generate.backends import LocalBackend
    from vlmlab.curate.generate.run import generate

    data = _images_and_jsonl(tmp_path / "in", 4)
    cfg = _tiny_cfg(
        "backend.kind=local", "backend.model=llm:tiny", f"cache.dir={tmp_path / 'cache'}"
    )
    backend = LocalBackend("llm:tiny")
    first = generate(cfg, data, None, tmp_path / "out", backend=backend)
    bad = [
        json.loads(line) for line in (tmp_path / "out" / "bad_input.jsonl").read_text().splitlines()
    ]
    assert [(b["line"], b["reason"]) for b in bad] == [
        (3, "bad_json"),
        (4, "missing_image"),
        (5, "no_captions"),
    ]
    assert first.summary["kept"] + first.summary["rejected"] == 4 and backend.requests == 4
    second = generate(cfg, data, None, tmp_path / "out2", backend=backend)
    assert backend.requests == 4 and second.summary["cache_hits"] == 4
    assert (tmp_path / "out" / "llava.json").read_text() == (
        tmp_path / "out2" / "llava.json"
    ).read_text()


# ---------------------------------------------------------------- Acceptance 3 (real processes)


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), OPENAI_KEY: SECRET}
    return env


OPENAI_KEY = "OPENAI_API_KEY"


@pytest.mark.slow
def test_generate_against_flaky_server_survives_sigkill(tmp_path: Path) -> None:
    n = 100
    data = _images_and_jsonl(tmp_path / "in", n)
    port_file, count_file = tmp_path / "port", tmp_path / "count.json"
    server = subprocess.Popen(
        [sys.executable, __file__, "--port-file", str(port_file), "--count-file", str(count_file)],
        env=_env(),
    )
    try:
        deadline = time.time() + 120
        while not port_file.exists():
            assert server.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        out = tmp_path / "out"
        cmd = [
            sys.executable, "-m", "vlmlab", "generate", str(data), "--out", str(out), "--preset", "tiny",
            f"backend.url={url}", "backend.model=tiny", "concurrency=4",
        ]  # fmt: skip
        first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        journal = out / "journal.jsonl"
        while not (journal.exists() and journal.read_text().count("\n") >= n // 3):
            assert first.poll() is None, first.stdout.read().decode()  # type: ignore[union-attr]
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done_at_kill = journal.read_text().count("\n")
        assert done_at_kill < n, "the run finished before the kill: nothing was resumed"

        second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        log = second.stdout + second.stderr
        assert second.returncode == 0, log
        kept = json.loads((out / "llava.json").read_text())
        rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
        ids = [e["id"] for e in kept] + [r["key"] for r in rejected]
        assert sorted(ids) == sorted(
            f"e{i:03d}-conversation" for i in range(n)
        )  # each exactly once
        assert len(kept) > n // 2, rejected[:3]
        assert all(e["conversations"][0]["value"].startswith("<image>\n") for e in kept)
        journal_keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()]
        assert len(journal_keys) == len(set(journal_keys)) == n
        bad = [json.loads(x) for x in (out / "bad_input.jsonl").read_text().splitlines()]
        assert [(b["line"], b["reason"]) for b in bad] == [
            (n // 3 + 2, "bad_json"), (n // 3 + 3, "missing_image"), (n // 3 + 4, "no_captions"),
        ]  # fmt: skip
        state = json.loads(count_file.read_text())
        assert state["failed"] > 0 and state["auth"] == state["requests"]  # the key was sent
        print(f"\nkilled at {done_at_kill}/{n}; server saw {state}")

        # reruns: the same folder (journal) and a fresh folder sharing the cache ask nothing
        before = state["requests"]
        again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        fresh_cmd = [*cmd[:6], str(tmp_path / "out2"), *cmd[7:], f"cache.dir={out / 'cache'}"]
        fresh = subprocess.run(fresh_cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and fresh.returncode == 0, again.stderr + fresh.stderr
        assert json.loads(count_file.read_text())["requests"] == before
        assert (tmp_path / "out2" / "llava.json").read_text() == (out / "llava.json").read_text()
        for path in [*out.rglob("*"), *(tmp_path / "out2").rglob("*")]:
            assert not path.is_file() or SECRET not in path.read_text(errors="ignore"), path
        assert SECRET not in log + again.stdout + again.stderr + fresh.stderr
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    serve(args.port_file, args.count_file, args.fail_rate, args.seed)
