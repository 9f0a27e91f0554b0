"""Where the prediction log goes: rotating JSON Lines files, or a Redis stream.

Both are written by the prediction log's worker thread only, a batch of encoded records at a
time, and raise on failure so that the worker counts the batch as lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

import redis

logger = logging.getLogger("adscore.prediction_log")

OPEN_SUFFIX = ".jsonl.open"
CLOSED_SUFFIX = ".jsonl"
STREAM_FIELD = "record"


class Sink(Protocol):
    def write(self, lines: Sequence[bytes], rows: int) -> None:
        """Write encoded records holding `rows` candidate rows in all."""

    def tick(self) -> None:
        """Called when the worker is idle: time-based rotation."""

    def close(self) -> None: ...


@dataclass
class _OpenFile:
    path: Path
    handle: IO[bytes]
    opened: float
    bytes: int = 0
    rows: int = 0


class JsonLinesSink:
    """Appends records to `<dir>/predictions-<UTC time>-<host>-<pid>-<n>.jsonl.open`.

    A file is closed, renamed to `.jsonl`, once it holds `max_file_bytes` (or `max_file_rows`,
    when set) or is `rotate_seconds` old: readers take `.jsonl` files only, so they never see a
    half-written line. Each batch goes to the OS at once (no buffer), so a crash loses at most
    what was queued, and a failed write is cut back off the file.
    With `max_files` > 0 the oldest closed files this process wrote are deleted beyond that
    many, and `on_expired(rows)` counts the candidate rows they held.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_file_bytes: int,
        rotate_seconds: float,
        max_file_rows: int = 0,
        max_files: int = 0,
        on_expired: Callable[[int], None] = lambda rows: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._max_file_bytes = max_file_bytes
        self._max_file_rows = max_file_rows
        self._rotate_seconds = rotate_seconds
        self._max_files = max_files
        self._on_expired = on_expired
        self._clock = clock
        self._prefix = f"predictions-{{}}-{socket.gethostname()}-{os.getpid()}"
        self._sequence = 0
        self._file: _OpenFile | None = None
        self._closed: list[tuple[Path, int]] = []
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, lines: Sequence[bytes], rows: int) -> None:
        current = self._file or self._open()
        payload = b"".join(line + b"\n" for line in lines)
        try:
            written = 0
            while written < len(payload):  # unbuffered: a write may take part of it
                written += current.handle.write(memoryview(payload)[written:]) or 0
        except OSError:
            # A full disk can leave half a line behind; cut it off, so that the file stays
            # readable to its end (the batch is counted as failed by the caller).
            with contextlib.suppress(OSError):
                current.handle.truncate(current.bytes)
            raise
        current.bytes += len(payload)
        current.rows += rows
        if current.bytes >= self._max_file_bytes or 0 < self._max_file_rows <= current.rows:
            self._rotate()

    def tick(self) -> None:
        current = self._file
        if current is not None and self._clock() - current.opened >= self._rotate_seconds:
            self._rotate()

    def close(self) -> None:
        if self._file is not None:
            self._rotate()

    @property
    def closed_files(self) -> list[Path]:
        """The files closed so far and still kept, oldest first."""
        return [path for path, _ in self._closed]

    def _open(self) -> _OpenFile:
        now = self._clock()
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        self._sequence += 1
        path = self.directory / (self._prefix.format(stamp) + f"-{self._sequence}{OPEN_SUFFIX}")
        # Unbuffered: each batch reaches the OS in full or not at all (see write).
        self._file = _OpenFile(path, path.open("ab", buffering=0), now)
        return self._file

    def _rotate(self) -> None:
        current = self._file
        assert current is not None
        self._file = None
        current.handle.close()
        final = current.path.with_name(current.path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
        current.path.rename(final)
        self._closed.append((final, current.rows))
        while self._max_files and len(self._closed) > self._max_files:
            oldest, rows = self._closed.pop(0)
            oldest.unlink(missing_ok=True)
            self._on_expired(rows)
            logger.info("prediction log: deleted %s (%d rows) past max_files", oldest, rows)


class RedisStreamSink:
    """XADDs each record to a Redis stream, trimmed to about `max_length` entries.

    Trimming is approximate (`MAXLEN ~`), which Redis does in whole macro-nodes: cheap, and the
    stream never grows far past the bound. Consumers read it with XREAD or a consumer group.
    """

    def __init__(self, url: str, key: str, max_length: int, timeout_seconds: float = 2.0) -> None:
        self.key = key
        self._max_length = max_length
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds
        )

    def write(self, lines: Sequence[bytes], rows: int) -> None:
        pipeline = self._client.pipeline(transaction=False)
        for line in lines:
            pipeline.xadd(self.key, {STREAM_FIELD: line}, maxlen=self._max_length, approximate=True)
        pipeline.execute()

    def tick(self) -> None:
        return None

    def close(self) -> None:
        self._client.close()
