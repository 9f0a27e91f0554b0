"""Coalesced reads: the key lookups of concurrent requests merged into few MGETs.

A round trip costs the client a fixed few hundred µs of CPU however many keys it carries, and
every command in flight holds a pooled connection. Here requests queue their keys; at most
`max_in_flight` MGETs run at once, and each takes everything queued meanwhile (up to
`max_keys`, duplicates sent once). An idle store adds no wait: the first request goes out at
once. A request that stops waiting (its deadline passed) leaves the MGET running, so the
connection comes back to the pool intact instead of being dropped mid-reply and re-opened.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from feature_client.store import FeatureStoreUnavailable

Values = list[bytes | None]
FetchKeys = Callable[[list[str]], Awaitable[Values]]
Lookup = tuple[Sequence[str], "asyncio.Future[Values]"]


class CoalescingReader:
    """Merges concurrent `get` calls into at most `max_in_flight` calls of `fetch_keys`."""

    def __init__(self, fetch_keys: FetchKeys, *, max_in_flight: int = 2, max_keys: int = 4096):
        if max_in_flight < 1 or max_keys < 1:
            raise ValueError("max_in_flight and max_keys must be at least 1")
        self._fetch_keys = fetch_keys
        self._max_in_flight = max_in_flight
        self._max_keys = max_keys
        self._waiting: deque[Lookup] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, keys: Sequence[str]) -> Values:
        """The values of `keys`, in order (None where a key is absent)."""
        future: asyncio.Future[Values] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, future))
        self._launch()
        return await future

    def _launch(self) -> None:
        while self._in_flight < self._max_in_flight and self._waiting:
            batch: list[Lookup] = []
            size = 0
            while self._waiting:
                keys, future = self._waiting[0]
                if batch and size + len(keys) > self._max_keys:
                    break
                self._waiting.popleft()
                if not future.done():  # a caller that gave up is not fetched for
                    batch.append((keys, future))
                    size += len(keys)
            if batch:
                self._in_flight += 1
                task = asyncio.get_running_loop().create_task(self._read(batch))
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: list[Lookup], task: asyncio.Task[None]) -> None:
        """Bookkeeping in a done callback: it runs even for a read cancelled before it began."""
        self._tasks.discard(task)
        self._in_flight -= 1
        for _, future in batch:  # only a cancelled read leaves any: nobody may wait forever
            if not future.done():
                future.set_exception(FeatureStoreUnavailable("the read was cancelled"))
        self._launch()

    async def _read(self, batch: list[Lookup]) -> None:
        try:
            if len(batch) == 1:
                keys, future = batch[0]
                results = [await self._fetch_keys(list(keys))]
            else:
                # Merged, deduplicated and split back in C loops (chain, dict, map).
                unique = list(dict.fromkeys(itertools.chain.from_iterable(k for k, _ in batch)))
                found = dict(zip(unique, await self._fetch_keys(unique), strict=True))
                results = [list(map(found.__getitem__, keys)) for keys, _ in batch]
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), values in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(values)

    async def close(self) -> None:
        """Wait for the reads in flight (their connections go back to the pool)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
