"""The online feature store protocol, shared by the Redis and in-process implementations.

Key layout (one key per entity, values are codec vectors):
    {namespace}:u:{user_id}    {namespace}:a:{ad_id}    {namespace}:schema (a SchemaStamp)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from feature_client.spec import FeatureSpec


class FeatureStoreUnavailable(Exception):
    """The store could not answer (connection refused, timed out, or failed)."""


@dataclass(slots=True)
class RawFeatures:
    """Stored vectors of one user and N ads, None where a key does not exist."""

    user: bytes | None
    ads: list[bytes | None]


@dataclass(frozen=True)
class SchemaStamp:
    """Which feature spec the loaded features were encoded with."""

    schema_version: int
    fingerprint: str

    @classmethod
    def of(cls, spec: FeatureSpec) -> SchemaStamp:
        return cls(spec.schema_version, spec.fingerprint())

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"schema_version": self.schema_version, "fingerprint": self.fingerprint}
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SchemaStamp:
        data = json.loads(raw)
        return cls(int(data["schema_version"]), str(data["fingerprint"]))


@dataclass(frozen=True)
class KeyLayout:
    """Names of the keys of one namespace."""

    namespace: str

    def user(self, user_id: str) -> str:
        return f"{self.namespace}:u:{user_id}"

    def ad(self, ad_id: str) -> str:
        return f"{self.namespace}:a:{ad_id}"

    def ads(self, ad_ids: Sequence[str]) -> list[str]:
        """The keys of many ads (one concatenation each, for the hot path)."""
        prefix = f"{self.namespace}:a:"
        return [prefix + ad_id for ad_id in ad_ids]

    def entity(self, source: str, entity_id: str) -> str:
        return f"{self.namespace}:{source[0]}:{entity_id}"

    @property
    def schema(self) -> str:
        return f"{self.namespace}:schema"


class FeatureStore(Protocol):
    """Reads and writes entity feature vectors."""

    keys: KeyLayout

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        """One user's and N ads' vectors in one round trip.

        Returns:
            `RawFeatures` with one value per ad id, in order, None for a missing key.
        Raises:
            FeatureStoreUnavailable: the store did not answer within its timeout, or failed.
        """
        ...

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store (key, value) pairs, overwriting; keys come from `KeyLayout`."""
        ...

    async def read_schema(self) -> SchemaStamp | None:
        """The stamp the loader wrote, or None when no features were loaded."""
        ...

    async def write_schema(self, stamp: SchemaStamp) -> None: ...

    async def ping(self) -> bool:
        """True when the store answers."""
        ...

    async def close(self) -> None: ...
