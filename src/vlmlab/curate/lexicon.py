"""Word and phrase lists kept as data files beside the config (conf/curate/lexicon/).

Why files: the lists are what users tune per data set (another language, another domain); a
path in the config swaps them without code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from vlmlab.config import conf_dir
from vlmlab.errors import ConfigError


def resolve(path: str, key: str) -> Path:
    """A list's path: absolute, or relative to conf/curate/. Missing: ConfigError naming `key`."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = conf_dir() / "curate" / candidate
    if not candidate.is_file():
        raise ConfigError(
            key, f"{candidate} does not exist.", "name a file, absolute or under conf/curate/."
        )
    return candidate


@lru_cache(maxsize=32)
def _lines(path: Path) -> tuple[str, ...]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        text = raw.split("#", 1)[0].strip()
        if text:
            out.append(text)
    return tuple(out)


def read_lines(path: str, key: str) -> list[str]:
    """Non-empty lines of a list, '#' comments dropped."""
    return list(_lines(resolve(path, key)))
