"""An in-process feature store: a dict with the Redis store's behaviour, for demos and tests."""

from __future__ import annotations

from collections.abc import Sequence

from feature_client.store import KeyLayout, RawFeatures, SchemaStamp


class InMemoryFeatureStore:
    """Feature vectors in a dict of this process; same keys and values as in Redis."""

    def __init__(self, namespace: str = "adscore") -> None:
        self.keys = KeyLayout(namespace)
        self._values: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._values)

    async def fetch(self, user_id: str, ad_ids: Sequence[str]) -> RawFeatures:
        get = self._values.get
        return RawFeatures(get(self.keys.user(user_id)), list(map(get, self.keys.ads(ad_ids))))

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._values.update(items)

    async def read_schema(self) -> SchemaStamp | None:
        raw = self._values.get(self.keys.schema)
        return None if raw is None else SchemaStamp.from_bytes(raw)

    async def write_schema(self, stamp: SchemaStamp) -> None:
        self._values[self.keys.schema] = stamp.to_bytes()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None  # nothing to release; the values live as long as the object
