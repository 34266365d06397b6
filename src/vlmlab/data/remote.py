"""Shards where clusters keep them: HTTP(S), object stores through fsspec, `pipe:` commands.

A shard location is a local folder, a URL (`https://host/set`, `s3://bucket/set`: any fsspec
protocol whose package is installed) or a `pipe:` command, optionally naming its shards with a
brace range (`.../shard-{000000..000999}.tar`); the manifest lives beside the shards.

Why byte ranges: the epoch plan knows which samples a DataLoader worker reads, and the manifest
knows where each sample starts in its tar (`offsets`), so a worker fetches exactly its samples'
bytes (no rank downloads the dataset). Why a reader that resumes: a connection that drops
mid-shard is reopened at the byte it stopped at (HTTP `Range`, a ranged fsspec read; a `pipe:`
command is rerun and the bytes already read are discarded), so the tar stream above it never
sees the gap: no sample is lost or read twice.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_MISSING_STATUS = (401, 403, 404, 410)  # not there (or not ours): retrying will not help
_FSSPEC_CHUNK = 8 << 20  # bytes per ranged read of an fsspec file
MISSING_SHARDS = ("error", "skip")


class ShardUnavailable(OSError):
    """A shard (or manifest) that could not be read, after the retries the policy allows.

    One-argument constructor: DataLoader workers re-raise it in the main process by type."""


class ShardMissing(ShardUnavailable):
    """The location answered that the file is not there (404, 403, no such file)."""


@dataclass(frozen=True)
class FetchPolicy:
    """How remote reads retry and what a missing shard does (`data.fetch`, `data.missing_shards`)."""

    retries: int = 8  # failed tries in a row before a read gives up
    timeout: float = 60.0  # seconds a connection may stall
    backoff: float = 0.5  # first pause between tries (doubles, at most 30 s)
    missing: str = "error"  # error | skip (counted as data/skipped/missing_shard)

    def __post_init__(self) -> None:
        if self.missing not in MISSING_SHARDS:
            raise ConfigError(
                "data.missing_shards", f"got {self.missing!r}.", f"use one of {MISSING_SHARDS}."
            )
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ConfigError(
                "data.fetch",
                f"got retries={self.retries}, timeout={self.timeout}, backoff={self.backoff}.",
                "use retries >= 0, timeout > 0, backoff >= 0.",
            )

    def pause(self, failures: int) -> float:
        return float(min(30.0, self.backoff * 2 ** (failures - 1)))


@dataclass
class FetchStats:
    """What one reader (or one worker's readers) pulled from storage."""

    bytes: int = 0  # payload bytes received, discarded ones included
    requests: int = 0  # connections / ranged reads / commands started
    resumed: int = 0  # of those, restarts after a failure mid-read

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "requests": self.requests, "resumed": self.resumed}


def is_remote(location: str | Path) -> bool:
    """A URL (`scheme://`) or a `pipe:` command, i.e. not a local path."""
    if isinstance(location, Path):
        return False
    return location.startswith("pipe:") or bool(_SCHEME.match(location))


def as_location(value: str | Path) -> str | Path:
    """A config value as a shard location: remote ones and brace patterns stay strings (Path
    would fold `https://` into `https:/`), local folders become Paths."""
    if isinstance(value, Path):
        return value
    return value if is_remote(value) or _RANGE.search(value) else Path(value)


def expand_braces(text: str) -> list[str]:
    """`shard-{000000..000002}.tar` -> three names, zero padding kept (as bash does); several
    ranges multiply out, in order."""
    match = _RANGE.search(text)
    if match is None:
        return [text]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") or last.startswith("0") else 0
    lo, hi = int(first), int(last)
    step = 1 if hi >= lo else -1
    head, tail = text[: match.start()], text[match.end() :]
    return [
        head + str(i).zfill(width) + rest
        for i in range(lo, hi + step, step)
        for rest in expand_braces(tail)
    ]


@dataclass(frozen=True)
class ShardSet:
    """Where a source's files are: `prefix + name + suffix` (`suffix`: the rest of a `pipe:`
    command); `names`: the shards a brace range picks, None for the manifest's list."""

    prefix: str
    suffix: str = ""
    names: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, location: str | Path) -> ShardSet:
        text = str(location)
        match = _RANGE.search(text)
        if match is None:
            if text.startswith("pipe:"):
                raise ConfigError(
                    "data.sets",
                    f"{text!r} is a pipe: command without a brace range.",
                    "name the shards, e.g. 'pipe:curl -s https://host/set/shard-{000000..000099}"
                    ".tar' (the manifest is read with the same command).",
                )
            return cls(text.rstrip("/") + "/")
        start = max(text.rfind("/", 0, match.start()), text.rfind(" ", 0, match.start())) + 1
        stop = len(text)
        for end_char in ("/", " "):
            found = text.find(end_char, match.end())
            if found != -1:
                stop = min(stop, found)
        names = tuple(expand_braces(text[start:stop]))
        return cls(text[:start], text[stop:], names)

    def file(self, name: str) -> str:
        return f"{self.prefix}{name}{self.suffix}"


# --------------------------------------------------------------------------- reading


class _Source:
    """One open read of a file from `offset`: `readinto` returns 0 at its end."""

    total: int | None = None  # the file's size where the storage says it
    skip = 0  # bytes to discard first: a source that cannot start at the offset

    def readinto(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def failed(self) -> str | None:
        """Why a read that ended early ended (a pipe's exit status), None when it just ended."""
        return None


class _LocalSource(_Source):
    def __init__(self, url: str, offset: int) -> None:
        try:
            self.handle: io.BufferedReader = open(url, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError as err:
            raise ShardMissing(f"{url}: no such file") from err
        self.total = Path(url).stat().st_size
        self.handle.seek(offset)

    def readinto(self, buffer: memoryview) -> int:
        return self.handle.readinto(buffer)

    def close(self) -> None:
        self.handle.close()


class _HttpSource(_Source):
    def __init__(self, url: str, offset: int, end: int | None, timeout: float) -> None:
        wanted = f"bytes={offset}-{'' if end is None else end - 1}"
        request = urllib.request.Request(url, headers={"Range": wanted})
        try:
            self.response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416:  # the range starts at or past the end: an empty read
                self.response, self.total = None, offset
                return
            if err.code in _MISSING_STATUS:
                raise ShardMissing(f"{url}: HTTP {err.code} {err.reason}") from err
            raise OSError(f"HTTP {err.code} {err.reason}") from err
        content_range = self.response.headers.get("Content-Range", "")
        if self.response.status == 206 and "/" in content_range:
            size = content_range.rsplit("/", 1)[1]
            self.total = int(size) if size.isdigit() else None
        else:  # 200: the server ignored Range; skip to the offset (those bytes still count)
            length = self.response.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
            self.skip = offset
            if offset:
                log.warning("%s ignores HTTP Range: reading %d bytes to resume", url, offset)

    def readinto(self, buffer: memoryview) -> int:
        if self.response is None:
            return 0
        return int(self.response.readinto(buffer))

    def close(self) -> None:
        if self.response is not None:
            self.response.close()


class _FsspecSource(_Source):
    """Ranged reads of `_FSSPEC_CHUNK` bytes (each one request), so the bytes counted are the
    bytes fetched: no read-ahead cache beyond the range."""

    def __init__(self, url: str, offset: int, end: int | None) -> None:
        self.fs, self.path = _filesystem(url)
        try:
            self.total = int(self.fs.size(self.path)) if end is None else None
        except FileNotFoundError as err:
            raise ShardMissing(f"{url}: no such file") from err
        self.offset, self.end, self.chunk = offset, end, b""

    def readinto(self, buffer: memoryview) -> int:
        if not self.chunk:
            stop = self.end if self.end is not None else self.total
            stop = self.offset + _FSSPEC_CHUNK if stop is None else stop
            stop = min(stop, self.offset + _FSSPEC_CHUNK)
            if stop <= self.offset:
                return 0
            try:
                self.chunk = bytes(self.fs.cat_file(self.path, start=self.offset, end=stop))
            except FileNotFoundError as err:
                raise ShardMissing(f"{self.path}: no such file") from err
            if not self.chunk:
                return 0
        n = min(len(buffer), len(self.chunk))
        buffer[:n] = self.chunk[:n]
        self.chunk, self.offset = self.chunk[n:], self.offset + n
        return n


class _PipeSource(_Source):
    """A shell command that writes the file to stdout; it cannot seek, so a resume reruns it and
    discards the bytes before `offset`."""

    def __init__(self, url: str, offset: int) -> None:
        self.command = url[len("pipe:") :]
        self.process = subprocess.Popen(  # the user's own command, as WebDataset's pipe:
            self.command, shell=True, stdout=subprocess.PIPE, bufsize=0
        )
        self.skip = offset

    def readinto(self, buffer: memoryview) -> int:
        stdout = self.process.stdout
        assert isinstance(stdout, io.FileIO)  # bufsize=0: a raw pipe
        return int(stdout.readinto(buffer) or 0)

    def failed(self) -> str | None:
        code = self.process.wait()
        return f"`{self.command}` exited with status {code}" if code else None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for a URL, or a ConfigError naming the package it needs."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ConfigError(
            "data.sets",
            f"cannot open {url}: {err}",
            "install the fsspec package for this protocol (s3fs for s3://, gcsfs for gs://).",
        ) from err


def _open(url: str, offset: int, end: int | None, policy: FetchPolicy) -> _Source:
    if url.startswith("pipe:"):
        return _PipeSource(url, offset)
    if url.startswith(("http://", "https://")):
        return _HttpSource(url, offset, end, policy.timeout)
    if is_remote(url):
        return _FsspecSource(url, offset, end)
    return _LocalSource(url, offset)


class RangeReader(io.RawIOBase):
    """Bytes [start, end) of a file (end None: to its end) that survive dropped connections.

    A read that fails, or ends before the end the storage announced, reopens the file at the
    current byte, up to `policy.retries` failures in a row (a read that makes progress resets the
    count). A missing file is not retried: `ShardMissing`. `stats` counts every byte received.
    """

    def __init__(
        self,
        url: str,
        start: int = 0,
        end: int | None = None,
        policy: FetchPolicy | None = None,
        stats: FetchStats | None = None,
    ) -> None:
        super().__init__()
        self.url, self.offset, self.end = url, start, end
        self.policy = policy or FetchPolicy()
        self.stats = stats if stats is not None else FetchStats()
        self._source: _Source | None = None
        self._started = False
        # why the read gave up (readers above may rewrap the exception's message)
        self.failure: ShardUnavailable | None = None

    def readable(self) -> bool:
        return True

    def _connect(self) -> _Source:
        self.stats.requests += 1
        self.stats.resumed += int(self._started)
        self._started = True
        source = _open(self.url, self.offset, self.end, self.policy)
        if source.total is not None:
            self.end = source.total if self.end is None else min(self.end, source.total)
        scratch = bytearray(1 << 16)
        while source.skip:
            n = source.readinto(memoryview(scratch)[: min(len(scratch), source.skip)])
            if not n:
                raise OSError(f"ended while skipping to byte {self.offset}")
            self.stats.bytes += n
            source.skip -= n
        return source

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        failures = 0
        while True:
            want = len(view) if self.end is None else min(len(view), self.end - self.offset)
            if want <= 0:
                return 0
            try:
                if self._source is None:
                    self._source = self._connect()
                    continue  # the storage may have announced a shorter end
                n = self._source.readinto(view[:want])
                if n:
                    self.offset += n
                    self.stats.bytes += n
                    return n
                why = self._source.failed()
                if why is None and self.end is None:
                    return 0  # the end, as far as anyone can tell
                if why is None:
                    why = f"connection closed at byte {self.offset} of {self.end}"
                raise OSError(why)
            except ShardMissing as err:
                self.failure = ShardMissing(str(err))
                raise
            except (OSError, http.client.HTTPException) as err:
                self._drop()
                failures += 1
                if failures > self.policy.retries:
                    self.failure = ShardUnavailable(
                        f"{self.url}: unreachable after {failures} tries ({err})"
                    )
                    raise ShardUnavailable(str(self.failure)) from err
                log.info("%s: %s; resuming at byte %d", self.url, err, self.offset)
                time.sleep(self.policy.pause(failures))

    def _drop(self) -> None:
        if self._source is not None:
            with contextlib.suppress(OSError):
                self._source.close()
            self._source = None

    def close(self) -> None:
        self._drop()
        super().close()


def read_bytes(url: str, policy: FetchPolicy | None = None) -> bytes:
    """A whole (small) file: a manifest."""
    with RangeReader(url, policy=policy) as reader:
        return reader.read()


# --------------------------------------------------------------------------- writing


def upload(local: Path, url: str, timeout: float = 600.0) -> None:
    """Copy a local file to `url`: fsspec-writable storage (s3://, gs://, memory://, file://)
    or HTTP(S) with a PUT of the whole file (WebDAV, a presigned object-store URL, any server
    that takes PUT). `pipe:` locations are read-only."""
    if url.startswith("pipe:"):
        raise ConfigError("--out", f"{url!r} is a pipe: command.", "write to a folder or a URL.")
    if url.startswith(("http://", "https://")):
        with local.open("rb") as body:
            size = local.stat().st_size
            request = urllib.request.Request(
                url,
                data=body,
                method="PUT",
                headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            )
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status not in (200, 201, 204):
                    raise OSError(f"PUT {url}: HTTP {response.status}")
        return
    if not is_remote(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, url)
        return
    fs, path = _filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(local), path)
