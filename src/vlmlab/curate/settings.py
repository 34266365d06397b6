"""`vlmlab curate`'s typed config, composed from conf/curate/<preset>.yaml with Hydra's compose
API and checked whole before any file is read: every unknown key (filter settings included, read
from each filter's `__init__`) is listed at once with the closest valid key."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlmlab.config import conf_dir
from vlmlab.curate.filters.base import FILTERS, setting_names
from vlmlab.errors import ConfigError
from vlmlab.schema import EncoderConfig, typed


@dataclass
class ExactConfig:
    enabled: bool = True  # same image bytes (sha256) and same normalised conversation


@dataclass
class NearImageConfig:
    enabled: bool = True
    kind: str = "phash"  # phash | dhash (images.py)
    max_distance: int = 8  # Hamming bits of 64 at or below which two images are one
    bands: int = 4  # multi-index hashing bands (lsh.py): 64 / bands bits each
    crops: list[float] = field(default_factory=lambda: [0.9, 0.8])  # centred crops also hashed


@dataclass
class SemanticConfig:
    enabled: bool = True
    threshold: float = 0.95  # cosine of mean-pooled encoder features at or above which: one
    batch_size: int = 64  # images per encoder forward
    block: int = 4096  # rows x columns of one similarity block (memory: block^2 floats)
    faiss: bool = True  # use faiss's range search when it is importable


@dataclass
class DedupConfig:
    exact: ExactConfig = field(default_factory=ExactConfig)
    image: NearImageConfig = field(default_factory=NearImageConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)


@dataclass
class ReportConfig:
    examples: int = 3  # rejected examples shown per reason in report.md
    bins: int = 40  # similarity histogram bins


@dataclass
class CurateConfig:
    """The composed conf/curate/<preset>.yaml (less `hydra`)."""

    filters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {enabled, ...}
    dedup: DedupConfig = field(default_factory=DedupConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    workers: int = 0  # threads that read and hash images (0: in the main thread)
    report: ReportConfig = field(default_factory=ReportConfig)


def _unknown(where: str, key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"{where}{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _walk(node: dict[str, Any], schema: type, where: str, found: list[str]) -> None:
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        if key not in hints:
            found.append(_unknown(where, key, set(hints)))
            continue
        tp = hints[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            _walk(value, tp, f"{where}{key}.", found)  # type: ignore[arg-type]


def problems(data: dict[str, Any]) -> list[str]:
    """Every unknown key of a composed curate config, one line each (empty: valid)."""
    found: list[str] = []
    _walk({k: v for k, v in data.items() if k != "hydra"}, CurateConfig, "", found)
    registered = FILTERS.discover()
    for name, settings in (data.get("filters") or {}).items():
        cls = registered.get(name)
        if cls is None:
            found.append(
                f"filters.{name}: no such filter; {FILTERS.closest(name)}"
                f"registered: {', '.join(registered)}"
            )
            continue
        for key in settings or {}:
            allowed = setting_names(cls) | {"enabled"}
            if key not in allowed:
                found.append(_unknown(f"filters.{name}.", key, allowed))
    kind = (data.get("dedup") or {}).get("image", {}).get("kind", "phash")
    if kind not in ("phash", "dhash"):
        found.append(f"dedup.image.kind: {kind!r} is not phash or dhash")
    return found


def compose_curate(overrides: list[str] | None = None, preset: str = "default") -> CurateConfig:
    """conf/curate/<preset>.yaml + overrides -> CurateConfig; ConfigError listing every problem."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    options = sorted(p.stem for p in (conf_dir() / "curate").glob("*.yaml"))
    if preset not in options:
        raise ConfigError("--preset", f"no conf/curate/{preset}.yaml.", f"use one of {options}.")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name=f"curate/{preset}", overrides=list(overrides or []))
    except HydraException as err:
        raise ConfigError("overrides", str(err), "see conf/curate/default.yaml.") from None
    finally:
        GlobalHydra.instance().clear()
    return to_settings(cfg)


def to_settings(cfg: DictConfig | dict[str, Any]) -> CurateConfig:
    """Validate, then type a composed config (tests hand dicts in directly)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    assert isinstance(raw, dict)
    data = {str(k): v for k, v in raw.items()}
    found = problems(data)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(
            found[0].split(":", 1)[0],
            f"{len(found)} config problem(s):\n{lines}\n",
            "correct these keys in conf/curate/ or the command line.",
        )
    return typed(data, CurateConfig)


def encoder_dict(encoder: EncoderConfig) -> dict[str, Any]:
    """The encoder preset back as the mapping `build_encoder` is instantiated from."""
    return dataclasses.asdict(encoder)
