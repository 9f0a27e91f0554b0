"""RESP framing of the one command on the hot path, MGET, in a single join."""

from __future__ import annotations

from collections.abc import Sequence


def pack_mget(keys: Sequence[str]) -> list[bytes]:
    """`MGET key...` as Redis's wire protocol (RESP2 array of bulk strings), UTF-8 keys."""
    encoded = [key.encode() for key in keys]
    header = b"*%d\r\n$4\r\nMGET\r\n" % (len(encoded) + 1)
    return [header + b"".join(b"$%d\r\n%s\r\n" % (len(key), key) for key in encoded)]
