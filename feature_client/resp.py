"""RESP framing: the one command on the hot path, MGET, in a single join, and any other."""

from __future__ import annotations

from collections.abc import Sequence


def pack_mget(keys: Sequence[str]) -> list[bytes]:
    """`MGET key...` as Redis's wire protocol (RESP2 array of bulk strings), UTF-8 keys."""
    header = b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)
    # Framed as text and encoded once (a third less CPU for 257 keys than encoding and framing
    # each key as bytes): with ASCII keys, the usual case, a key's length in characters is its
    # length in bytes.
    text = "".join([f"${len(key)}\r\n{key}\r\n" for key in keys])
    if text.isascii():
        return [header + text.encode()]
    encoded = [key.encode() for key in keys]
    return [header + b"".join(b"$%d\r\n%s\r\n" % (len(key), key) for key in encoded)]


def pack_command(*parts: str) -> bytes:
    """A command as Redis's wire protocol (RESP2 array of bulk strings), UTF-8 arguments."""
    encoded = [part.encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded
    )
