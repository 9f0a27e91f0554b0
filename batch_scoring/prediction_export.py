"""The prediction log's Redis stream, copied into JSON Lines files that the log reader takes.

XRANGE pages through the stream from its oldest entry (or after a given entry id) and each
record is written as it is stored, one per line, through the service's own JsonLinesSink: a file
is written as `.jsonl.open` and renamed `.jsonl` once complete, so an interrupted export leaves
no file the reader would take for whole. The last entry id copied is returned: pass it as
`after` next time to copy only newer entries. The stream itself is left as it is (its length is
bounded by the service's approximate MAXLEN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.exceptions import RedisError
from tqdm import tqdm

from batch_scoring.errors import BatchError
from batch_scoring.features import _redacted
from service.prediction_sinks import STREAM_FIELD, JsonLinesSink

PAGE_ENTRIES = 1_000
FILE_RECORDS = 100_000
UNBOUNDED = 1 << 62  # files close by record count only


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
    try:
        # The service's own sink: the same names, the same .jsonl.open -> .jsonl rename.
        files = JsonLinesSink(
            output, max_file_bytes=UNBOUNDED, rotate_seconds=math.inf, max_file_rows=file_records
        )
    except OSError as exc:
        raise BatchError(f"{output}: cannot write the export: {exc}") from exc
    client = redis.Redis.from_url(url, socket_timeout=30.0)
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
                        files.write([line], 1)
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
    return ExportSummary(records, files.closed_files, last_id, skipped)
