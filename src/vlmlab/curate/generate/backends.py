"""Where prompts go: an OpenAI-compatible endpoint (urllib, retries) or a local transformers model,
both behind a disk cache keyed by (backend, model, messages, params).

Retries: 429, 5xx, connection errors and timeouts are retried up to `retry.attempts` times,
sleeping uniform(0, min(max_s, base_s * 2^n)) ("full jitter"), or the server's Retry-After when
that is longer. Other 4xx are final. The API key is read from the environment at the request and
appears in no log line, cache key, file or exception.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlmlab.curate.generate.settings import BackendConfig, RetryConfig
from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class RequestFailed(RuntimeError):
    """A request that failed for good (a 4xx, or retries exhausted): the entry is not done."""


class Cache:
    """One file per request under `root/ab/<sha256>.json`, written atomically: a rerun or a
    resumed run pays nothing for what was already answered."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(
        backend: str, model: str, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> str:
        blob = json.dumps([backend, model, messages, params], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.root is None:
            return None
        path = self._path(key)
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError):
            return None
        with self._lock:
            self.hits += 1
        return str(reply)

    def put(self, key: str, reply: str) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"reply": reply}, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


class Backend:
    """`complete(messages, params) -> text`; `requests` counts calls that reached the model."""

    kind = ""

    def __init__(self, model: str) -> None:
        self.model = model
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def complete(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        raise NotImplementedError


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else 0.0


class OpenAIBackend(Backend):
    """POST {url}/chat/completions, as vLLM, SGLang, llama.cpp and hosted APIs serve it."""

    kind = "openai"

    def __init__(self, cfg: BackendConfig, retry: RetryConfig) -> None:
        if not cfg.model:
            raise ConfigError("backend.model", "is empty.", "name the served model.")
        super().__init__(cfg.model)
        self.url = os.environ.get("VLMLAB_GENERATE_URL") or cfg.url
        self.endpoint = self.url.rstrip("/") + "/chat/completions"
        self.key_env, self.timeout, self.retry = cfg.api_key_env, cfg.timeout_s, retry

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        self._count()
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
        return str(payload["choices"][0]["message"]["content"] or "")

    def complete(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        last = ""
        for attempt in range(self.retry.attempts):
            wait = random.uniform(0, min(self.retry.max_s, self.retry.base_s * 2**attempt))
            try:
                return self._post(body)
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} from {self.endpoint}"
                if err.code not in RETRY_STATUS:
                    raise RequestFailed(last) from None
                wait = max(
                    wait, min(self.retry.max_s, _retry_after(err.headers.get("Retry-After")))
                )
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                last = f"{type(err).__name__} at {self.endpoint}: {getattr(err, 'reason', err)}"
            log.debug("retry %d after %.2fs: %s", attempt + 1, wait, last)
            time.sleep(wait)
        raise RequestFailed(f"{last} (after {self.retry.attempts} attempts)")


class LocalBackend(Backend):
    """A transformers causal LM in this process: a folder (`from_pretrained`) or `llm:<preset>`,
    a conf/llm preset built from its config (random-init presets need no download)."""

    kind = "local"

    def __init__(self, model: str, device: str = "cpu") -> None:
        super().__init__(model)
        self.tokenizer, self.lm = _load_local(model)
        self.lm.to(device).eval()
        self.device = device

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return text
        lines = [f"{m['role'].upper()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nASSISTANT:"

    def complete(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        import torch

        ids = self.tokenizer(self._prompt(messages), return_tensors="pt").input_ids
        limit = int(getattr(self.lm.config, "max_position_embeddings", 2048))
        new = int(params.get("max_tokens", 256))
        ids = ids[:, -max(1, limit - new) :].to(self.device)  # keep the query, drop the oldest
        temperature = float(params.get("temperature", 0.0))
        self._count()
        with self._lock, torch.no_grad():  # one forward at a time: the model is not re-entrant
            torch.manual_seed(int(params.get("seed", 0)))
            out = self.lm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=float(params.get("top_p", 1.0)) if temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        text: str = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return text


def _load_local(model: str) -> tuple[Any, Any]:
    from vlmlab.models.llm import build_llm, build_tokenizer

    if model.startswith("llm:"):
        from omegaconf import OmegaConf

        from vlmlab.config import conf_dir

        name = model.removeprefix("llm:")
        path = conf_dir() / "llm" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(
                "backend.model", f"no conf/llm/{name}.yaml.", "name a preset or a folder."
            )
        llm = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        assert isinstance(llm, dict)
        tokenizer = build_tokenizer(dict(llm["tokenizer"]))
        lm = build_llm(
            tokenizer,
            name_or_path=llm.get("name_or_path"),
            pretrained=bool(llm.get("pretrained")),
            config=llm.get("config"),
            dtype=str(llm.get("dtype", "float32")),
            init_seed=int(llm.get("init_seed", 0)),
        )
        return tokenizer, lm
    if not Path(model).is_dir():
        raise ConfigError(
            "backend.model", f"{model} is not a folder.", "save a model there or use llm:<preset>."
        )
    tokenizer = build_tokenizer({"name_or_path": model})
    lm = build_llm(tokenizer, name_or_path=model, pretrained=True)
    return tokenizer, lm


def build_backend(cfg: BackendConfig, retry: RetryConfig) -> Backend:
    if cfg.kind == "local":
        if not cfg.model:
            raise ConfigError("backend.model", "is empty.", "a model folder or llm:<preset>.")
        return LocalBackend(cfg.model, cfg.device)
    return OpenAIBackend(cfg, retry)
