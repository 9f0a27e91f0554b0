"""The prediction log's Redis stream, copied into JSON Lines files that the log reader takes.

XRANGE pages through the stream from its oldest entry (or after a given entry id) and each
record is written as it is stored, one per line. A file is written as `.jsonl.open` and renamed
`.jsonl` once complete, like the service's own files, so an interrupted export leaves no file the
reader would take for whole. The last entry id copied is returned: pass it as `after` next time
to copy only newer entries. The stream itself is left as it is (its length is bounded by the
service's approximate MAXLEN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import redis
from redis.exceptions import RedisError
from tqdm import tqdm

from batch_scoring.errors import BatchError
from batch_scoring.features import _redacted
from service.prediction_sinks import CLOSED_SUFFIX, OPEN_SUFFIX, STREAM_FIELD

PAGE_ENTRIES = 1_000
FILE_RECORDS = 100_000


@dataclass(frozen=True)
class ExportSummary:
    records: int
    files: list[Path]
    last_id: str | None
    """The id of the last entry copied; None when the stream had nothing new."""
    skipped: int
    """Entries without a `record` field (not written by the prediction log)."""


def _next_id(entry_id: str) -> str:
    """The smallest id after `entry_id` (XRANGE bounds are inclusive)."""
    milliseconds, _, sequence = entry_id.partition("-")
    return f"{milliseconds}-{int(sequence or 0) + 1}"


class _Files:
    """Records into files of at most `limit` records, each renamed to .jsonl once full."""

    def __init__(self, output: Path, limit: int) -> None:
        self.output, self.limit = output, limit
        self.closed: list[Path] = []
        self._handle: IO[bytes] | None = None
        self._path: Path | None = None
        self._count = 0

    def write(self, entry_id: str, line: bytes) -> None:
        if self._handle is None:
            self._path = self.output / f"predictions-stream-{entry_id}{OPEN_SUFFIX}"
            self._handle = self._path.open("wb")
        self._handle.write(line + b"\n")
        self._count += 1
        if self._count >= self.limit:
            self.close()

    def close(self) -> None:
        if self._handle is None or self._path is None:
            return
        self._handle.close()
        final = self._path.with_name(self._path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
        self._path.replace(final)
        self.closed.append(final)
        self._handle, self._path, self._count = None, None, 0


def export_stream(
    url: str,
    key: str,
    output: Path,
    *,
    after: str | None = None,
    page: int = PAGE_ENTRIES,
    file_records: int = FILE_RECORDS,
    progress: bool = True,
) -> ExportSummary:
    """Copy the entries of stream `key` (after entry id `after`) into files under `output`."""
    client = redis.Redis.from_url(url, socket_timeout=30.0)
    output.mkdir(parents=True, exist_ok=True)
    files = _Files(output, file_records)
    records = skipped = 0
    last_id: str | None = None
    start = "-" if after is None else _next_id(after)
    field = STREAM_FIELD.encode()
    try:
        total = client.xlen(key)
        with tqdm(total=total, desc="exporting predictions", unit="records",
                  disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip
            while True:
                entries = cast(list[Any], client.xrange(key, min=start, max="+", count=page))
                for raw_id, fields in entries:
                    last_id = raw_id.decode()
                    line = fields.get(field)
                    if line is None:
                        skipped += 1
                    else:
                        files.write(last_id, line)
                        records += 1
                bar.update(len(entries))
                if len(entries) < page or last_id is None:
                    break
                start = _next_id(last_id)
        files.close()
    except RedisError as exc:
        raise BatchError(f"cannot read the stream {key} at {_redacted(url)}: {exc}") from exc
    except OSError as exc:
        raise BatchError(f"{output}: cannot write the export: {exc}") from exc
    finally:
        client.close()
    return ExportSummary(records, files.closed, last_id, skipped)
