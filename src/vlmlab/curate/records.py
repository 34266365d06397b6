"""Entries streamed from a LLaVA JSON array or a JSONL file, each with its index and line.

Why not `json.load`: the 665K mix is ~1 GB of JSON; loading it builds every entry at once. The
array reader decodes one element at a time with `json.JSONDecoder.raw_decode` over 1 MiB
chunks, so memory holds one chunk plus one entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.errors import ConfigError

CHUNK = 1 << 20
_WS = " \t\r\n"


@dataclass(frozen=True)
class Record:
    """One element of the input: `entry` is the parsed object, or None with `error` set."""

    index: int  # position in the input (0-based)
    line: int  # 1-based line where the element starts
    entry: dict[str, Any] | None
    error: str = ""  # why the element is unusable (bad JSON, not an object)


def read_records(path: Path, chunk: int = CHUNK) -> Iterator[Record]:
    """Every element of `path`: a JSON array (first non-space byte `[`), else JSONL."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip(_WS + "\ufeff")
    if head.startswith("["):
        yield from _read_array(path, chunk)
    else:
        yield from _read_jsonl(path)


def _as_record(index: int, line: int, value: Any) -> Record:
    if isinstance(value, dict):
        return Record(index, line, value)
    return Record(index, line, None, f"not_an_object: a JSON {type(value).__name__}")


def _read_jsonl(path: Path) -> Iterator[Record]:
    index = 0
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                yield Record(index, number, None, f"bad_json: {err.msg} at column {err.colno}")
            else:
                yield _as_record(index, number, value)
            index += 1


class _Buffer:
    """A sliding window over the file that knows the line number of its start."""

    def __init__(self, handle: Any, chunk: int) -> None:
        self.handle, self.chunk = handle, chunk
        self.text, self.pos, self.line, self.eof = "", 0, 1, False

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.handle.read(self.chunk)
        if not data:
            self.eof = True
            return False
        if self.pos > len(self.text) // 2:  # drop what was consumed, counting its lines
            self.line += self.text.count("\n", 0, self.pos)
            self.text, self.pos = self.text[self.pos :], 0
        self.text += data
        return True

    def skip_ws(self) -> str:
        """The next non-space character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def line_at(self, pos: int) -> int:
        return self.line + self.text.count("\n", 0, pos)


def _read_array(path: Path, chunk: int) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as handle:
        buf = _Buffer(handle, chunk)
        if buf.skip_ws() != "[":
            raise _syntax(path, buf.line_at(buf.pos), "the array does not start with '['")
        buf.pos += 1
        index = 0
        if buf.skip_ws() == "]":
            return
        while True:
            if buf.skip_ws() == "":
                raise _syntax(path, buf.line_at(buf.pos), "the file ends inside the array")
            while True:
                try:
                    value, end = decoder.raw_decode(buf.text, buf.pos)
                except json.JSONDecodeError as err:
                    if buf.more():
                        continue
                    raise _syntax(path, buf.line_at(buf.pos), err.msg) from None
                # a value cut at the chunk's end (a number) may decode short: need what follows
                if end >= len(buf.text) and buf.more():
                    continue
                break
            line = buf.line_at(buf.pos)
            buf.pos = end
            yield _as_record(index, line, value)
            index += 1
            sep = buf.skip_ws()
            if sep == "]":
                return
            if sep != ",":
                raise _syntax(path, buf.line_at(buf.pos), f"expected ',' or ']', found {sep!r}")
            buf.pos += 1


def _syntax(path: Path, line: int, why: str) -> ConfigError:
    return ConfigError(
        "DATA",
        f"{path} line {line}: not a JSON array ({why}); the entries before it were read.",
        "repair the file or convert it to JSONL, where a bad line is skipped and reported.",
    )
