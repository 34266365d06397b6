"""`vlmlab generate`'s typed config, composed from conf/generate/<preset>.yaml with Hydra's compose
API. Unknown keys fail at composition (a structured-config merge); the `filters:` block is
checked by curate's own validator, so the two commands accept the same filter settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmlab.config import conf_dir
from vlmlab.curate.settings import problems
from vlmlab.errors import ConfigError
from vlmlab.schema import typed

PROMPT_TYPES = ("conversation", "detail", "complex")
BACKENDS = ("openai", "local")


@dataclass
class BackendConfig:
    kind: str = "openai"  # openai | local
    url: str = "http://127.0.0.1:8000/v1"  # base URL; /chat/completions is appended
    model: str | None = None  # served model name; local: a folder or llm:<preset>
    api_key_env: str = "OPENAI_API_KEY"  # the variable the key is read from (never the config)
    timeout_s: float = 120.0
    device: str = "cpu"  # local backend


@dataclass
class PromptsConfig:
    dir: str = "prompts"  # relative to conf/generate/ or absolute
    few_shot: int = 2


@dataclass
class RetryConfig:
    attempts: int = 8
    base_s: float = 1.0
    max_s: float = 60.0


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str | None = None  # None: OUT/cache


@dataclass
class GenerateConfig:
    """The composed conf/generate/<preset>.yaml (less `hydra`)."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed
    types: list[str] = field(default_factory=lambda: list(PROMPT_TYPES))
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    concurrency: int = 8
    retry: RetryConfig = field(default_factory=RetryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)


def compose_generate(overrides: list[str] | None = None, preset: str = "default") -> GenerateConfig:
    """conf/generate/<preset>.yaml + overrides -> GenerateConfig; ConfigError on any problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    options = sorted(p.stem for p in (conf_dir() / "generate").glob("*.yaml"))
    if preset not in options:
        raise ConfigError("--preset", f"no conf/generate/{preset}.yaml.", f"use one of {options}.")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=f"generate/{preset}", overrides=list(overrides or []))
    except HydraException as err:
        raise ConfigError("overrides", str(err), "see conf/generate/default.yaml.") from None
    finally:
        GlobalHydra.instance().clear()
    return to_settings(cfg)


def to_settings(cfg: DictConfig | dict[str, Any]) -> GenerateConfig:
    """Validate, then type a composed config (tests hand dicts in directly)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    assert isinstance(raw, dict)
    data = {str(k): v for k, v in raw.items() if k != "hydra"}
    try:
        OmegaConf.merge(OmegaConf.structured(GenerateConfig), data)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(
            str(key), str(err).splitlines()[0], "see conf/generate/default.yaml."
        ) from None
    found = problems({"filters": data.get("filters") or {}})
    backend = data.get("backend") or {}
    if backend.get("kind", "openai") not in BACKENDS:
        found.append(f"backend.kind: {backend.get('kind')!r} is not one of {list(BACKENDS)}")
    for kind in data.get("types") or []:
        if kind not in PROMPT_TYPES:
            found.append(f"types: {kind!r} is not one of {list(PROMPT_TYPES)}")
    if int(data.get("concurrency", 1)) < 1:
        found.append("concurrency: must be at least 1")
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(
            found[0].split(":", 1)[0],
            f"{len(found)} config problem(s):\n{lines}\n",
            "correct these keys in conf/generate/ or the command line.",
        )
    return typed(data, GenerateConfig)
