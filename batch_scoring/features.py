"""Where a batch job reads entity features: the online Redis, or a Parquet snapshot of it.

Both give the stored codec bytes of each entity, so the batch path decodes them with the very
code that serves (EntityCodec) and both sources score identically. Redis is read with the
synchronous client in large pipelined MGETs (one round trip per `keys_per_call` keys); the
snapshot, written by `write_snapshot` from a Redis, is one Parquet file of (entity, id, value)
rows with the store's schema stamp in its metadata, held in memory while a job runs (its size
is that of the feature table, not of the input).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, cast

import pyarrow as pa
import pyarrow.parquet as pq
import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from tqdm import tqdm

from batch_scoring.errors import FeatureSourceError
from feature_client.store import KeyLayout, SchemaStamp

Entity = Literal["user", "ad"]
ENTITIES: tuple[Entity, ...] = ("user", "ad")
# Keys per MGET: large enough that round trips vanish, small enough not to stall Redis (an
# MGET of 10k ~60-byte values is ~1 ms of server time).
KEYS_PER_CALL = 10_000
SCHEMA_METADATA_KEY = b"adscore.schema"
SNAPSHOT_SCHEMA = pa.schema([("entity", pa.string()), ("id", pa.string()), ("value", pa.binary())])


class FeatureSource(Protocol):
    """Stored feature vectors of entities, read in bulk."""

    def fetch(self, entity: Entity, ids: Sequence[str]) -> list[bytes | None]:
        """One value per id, in order, None where the entity has no stored vector.

        Raises:
            FeatureSourceError: the source could not be read.
        """
        ...

    def schema(self) -> SchemaStamp | None:
        """The stamp of the spec the features were encoded with, None when there is none."""
        ...

    def describe(self) -> dict[str, str]:
        """What a manifest records about this source (no credentials)."""
        ...

    def close(self) -> None: ...


class RedisFeatures:
    """The online feature store, read with pipelined MGETs over one connection."""

    def __init__(
        self, url: str, namespace: str = "adscore", keys_per_call: int = KEYS_PER_CALL
    ) -> None:
        self._url = url
        self.keys = KeyLayout(namespace)
        self._keys_per_call = keys_per_call
        # A batch job may retry a blip: unlike a request, it has no deadline to protect.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=30.0,
            socket_connect_timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=2.0), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        try:
            self._client.ping()
        except (RedisError, OSError) as exc:
            self._client.close()
            raise FeatureSourceError(f"cannot reach Redis at {_redacted(url)}: {exc}") from exc

    def fetch(self, entity: Entity, ids: Sequence[str]) -> list[bytes | None]:
        names = [self.keys.entity(entity, i) for i in ids]
        step = self._keys_per_call
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(names), step):
                    pipe.mget(names[start : start + step])
                replies = cast(list[list[bytes | None]], pipe.execute())
        except (RedisError, OSError) as exc:
            raise FeatureSourceError(f"redis: {type(exc).__name__}: {exc}") from exc
        return [value for reply in replies for value in reply]

    def schema(self) -> SchemaStamp | None:
        try:
            raw = cast(bytes | None, self._client.get(self.keys.schema))
        except (RedisError, OSError) as exc:
            raise FeatureSourceError(f"redis: {type(exc).__name__}: {exc}") from exc
        return None if raw is None else SchemaStamp.from_bytes(raw)

    def describe(self) -> dict[str, str]:
        return {"kind": "redis", "namespace": self.keys.namespace}

    def close(self) -> None:
        self._client.close()


def _redacted(url: str) -> str:
    """The URL without its password, for messages and manifests."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}"


class SnapshotFeatures:
    """A Parquet snapshot of the store, loaded into one dict per entity kind."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise FeatureSourceError(
                f"{path}: cannot read it as a feature snapshot: {exc}"
            ) from exc
        if not set(SNAPSHOT_SCHEMA.names) <= set(table.column_names):
            raise FeatureSourceError(
                f"{path}: not a feature snapshot (columns {', '.join(table.column_names)}; "
                f"expected {', '.join(SNAPSHOT_SCHEMA.names)})"
            )
        raw_stamp = (table.schema.metadata or {}).get(SCHEMA_METADATA_KEY)
        self._stamp = None if raw_stamp is None else SchemaStamp.from_bytes(raw_stamp)
        self._values: dict[str, dict[str, bytes]] = {entity: {} for entity in ENTITIES}
        entity_column = table.column("entity").to_pylist()
        ids = table.column("id").to_pylist()
        values = table.column("value").to_pylist()
        for entity, entity_id, value in zip(entity_column, ids, values, strict=True):
            self._values[entity][entity_id] = value

    def fetch(self, entity: Entity, ids: Sequence[str]) -> list[bytes | None]:
        get = self._values[entity].get
        return [get(i) for i in ids]

    def schema(self) -> SchemaStamp | None:
        return self._stamp

    def describe(self) -> dict[str, str]:
        return {"kind": "snapshot", "path": str(self._path.resolve())}

    def close(self) -> None:
        self._values = {entity: {} for entity in ENTITIES}


def _scan_entity(
    client: redis.Redis, keys: KeyLayout, entity: Entity, batch: int
) -> Iterator[tuple[list[str], list[bytes | None]]]:
    prefix = keys.entity(entity, "")
    names: list[bytes] = []
    for name in client.scan_iter(match=f"{prefix}*", count=batch):
        names.append(name)
        if len(names) == batch:
            yield _read_names(client, prefix, names)
            names = []
    if names:
        yield _read_names(client, prefix, names)


def _read_names(
    client: redis.Redis, prefix: str, names: list[bytes]
) -> tuple[list[str], list[bytes | None]]:
    values = cast(list[bytes | None], client.mget(names))
    return [n.decode()[len(prefix) :] for n in names], values


def write_snapshot(
    url: str, namespace: str, output: Path, *, batch: int = KEYS_PER_CALL, progress: bool = True
) -> dict[str, int]:
    """Copy every user and ad vector of a Redis into a Parquet snapshot; returns the counts.

    SCAN walks the keys without blocking the server; a key deleted meanwhile is skipped. The
    file is written under a temporary name and renamed, so a snapshot is never half written.
    """
    client = redis.Redis.from_url(url, socket_timeout=30.0)
    keys = KeyLayout(namespace)
    counts: dict[str, int] = dict.fromkeys(ENTITIES, 0)
    try:
        raw_stamp = cast(bytes | None, client.get(keys.schema))
        metadata = {} if raw_stamp is None else {SCHEMA_METADATA_KEY: raw_stamp}
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.partial")
        with (
            pq.ParquetWriter(partial, SNAPSHOT_SCHEMA.with_metadata(metadata)) as writer,
            tqdm(desc="exporting features", unit="keys", disable=not progress) as bar,
        ):
            for entity in ENTITIES:
                for ids, values in _scan_entity(client, keys, entity, batch):
                    kept = [(i, v) for i, v in zip(ids, values, strict=True) if v is not None]
                    writer.write_table(
                        pa.table(
                            {
                                "entity": pa.array([entity] * len(kept), pa.string()),
                                "id": pa.array([i for i, _ in kept], pa.string()),
                                "value": pa.array([v for _, v in kept], pa.binary()),
                            },
                            schema=SNAPSHOT_SCHEMA,
                        )
                    )
                    counts[entity] += len(kept)
                    bar.update(len(ids))
        partial.replace(output)
    except (RedisError, OSError) as exc:
        raise FeatureSourceError(f"cannot export from Redis at {_redacted(url)}: {exc}") from exc
    finally:
        client.close()
    return counts
