"""CoalescingReader: concurrent lookups merged into few reads (a fake read, timed by the test)."""

from __future__ import annotations

import asyncio

import pytest

from feature_client.coalescing import CoalescingReader, Values
from feature_client.store import FeatureStoreUnavailable


class FakeReads:
    """Each key's value is its name in bytes ("missing" keys are absent). Reads wait until the
    test opens the gate, so it decides when reads are in flight."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def __call__(self, keys: list[str]) -> Values:
        self.calls.append(keys)
        await self.gate.wait()
        if self.fail:
            raise FeatureStoreUnavailable("redis: ConnectionError")
        return [None if k == "missing" else k.encode() for k in keys]


def test_lookups_queued_behind_a_read_share_the_next_one() -> None:
    async def scenario() -> tuple[FakeReads, list[Values]]:
        reads = FakeReads()
        reader = CoalescingReader(reads, max_in_flight=1)
        first = asyncio.ensure_future(reader.get(["u1", "a1"]))
        await asyncio.sleep(0)
        others = [
            asyncio.ensure_future(reader.get(keys))
            for keys in (["u2", "a1", "a2"], ["u3", "missing"], ["u2", "a3"])
        ]
        await asyncio.sleep(0)
        assert len(reads.calls) == 1  # the others wait for the read in flight
        reads.gate.set()
        results = await asyncio.gather(first, *others)
        return reads, results

    reads, results = asyncio.run(scenario())
    assert reads.calls == [["u1", "a1"], ["u2", "a1", "a2", "u3", "missing", "a3"]]
    assert results == [
        [b"u1", b"a1"],
        [b"u2", b"a1", b"a2"],
        [b"u3", None],
        [b"u2", b"a3"],
    ]


def test_an_idle_reader_sends_at_once_and_in_parallel_up_to_the_limit() -> None:
    async def scenario() -> FakeReads:
        reads = FakeReads()
        reader = CoalescingReader(reads, max_in_flight=2)
        tasks = [asyncio.ensure_future(reader.get([f"k{i}"])) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert reads.calls == [["k0"], ["k1"]]  # each went out at once; k2 waits for a slot
        reads.gate.set()
        await asyncio.gather(*tasks)
        return reads

    assert asyncio.run(scenario()).calls == [["k0"], ["k1"], ["k2"]]


def test_a_read_carries_at_most_max_keys_unless_one_lookup_is_larger() -> None:
    async def scenario() -> FakeReads:
        reads = FakeReads()
        reads.gate.set()
        reader = CoalescingReader(reads, max_in_flight=1, max_keys=4)
        blocker = asyncio.Event()

        async def slow(keys: list[str]) -> Values:
            await blocker.wait()
            return await reads(keys)

        reader._fetch_keys = slow
        tasks = [asyncio.ensure_future(reader.get(k)) for k in (["a"], ["b", "c"], ["d", "e"])]
        tasks.append(asyncio.ensure_future(reader.get([f"x{i}" for i in range(6)])))
        await asyncio.sleep(0)
        blocker.set()
        await asyncio.gather(*tasks)
        return reads

    reads = asyncio.run(scenario())
    assert reads.calls == [["a"], ["b", "c", "d", "e"], [f"x{i}" for i in range(6)]]


def test_a_failed_read_fails_every_lookup_in_it_and_the_next_read_runs() -> None:
    async def scenario() -> None:
        reads = FakeReads(fail=True)
        reader = CoalescingReader(reads, max_in_flight=1)
        lookups = [asyncio.ensure_future(reader.get([k])) for k in ("a", "b", "c")]
        await asyncio.sleep(0)
        reads.gate.set()
        for lookup in lookups:
            with pytest.raises(FeatureStoreUnavailable, match="ConnectionError"):
                await lookup
        reads.fail = False
        assert await reader.get(["d"]) == [b"d"]

    asyncio.run(scenario())


def test_a_caller_that_gives_up_leaves_the_read_running() -> None:
    async def scenario() -> tuple[FakeReads, Values]:
        reads = FakeReads()
        reader = CoalescingReader(reads, max_in_flight=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await reader.get(["a"])
        late = asyncio.ensure_future(reader.get(["b"]))
        await asyncio.sleep(0)
        assert reads.calls == [["a"]]  # not cancelled: still holding the one slot
        reads.gate.set()
        result = await late
        await reader.close()
        return reads, result

    reads, result = asyncio.run(scenario())
    assert reads.calls == [["a"], ["b"]] and result == [b"b"]


@pytest.mark.parametrize("started", [False, True], ids=["before-it-began", "mid-read"])
def test_a_cancelled_read_fails_its_lookups_and_frees_its_slot(started: bool) -> None:
    async def scenario() -> None:
        reads = FakeReads()
        reader = CoalescingReader(reads, max_in_flight=1)
        lookup = asyncio.ensure_future(reader.get(["a"]))
        await asyncio.sleep(0)
        if started:
            await asyncio.sleep(0)
            assert reads.calls == [["a"]]
        for task in list(reader._tasks):
            task.cancel()
        with pytest.raises(FeatureStoreUnavailable, match="cancelled"):
            await asyncio.wait_for(lookup, 2)
        reads.gate.set()
        assert await asyncio.wait_for(reader.get(["b"]), 2) == [b"b"]

    asyncio.run(scenario())


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CoalescingReader(FakeReads(), max_in_flight=0)
