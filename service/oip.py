"""Open Inference Protocol (KServe v2) tensors: JSON and Triton's binary tensor extension.

A request body is either one JSON object, or (binary extension) a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian tensors of the inputs
that carry a `binary_data_size` parameter, in input order. Replies take the same form when an
output asks for `binary_data` (or the request sets `binary_data_output`).
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NAMES = {dtype: name for name, dtype in DATATYPES.items()}


class OipError(Exception):
    """A request the protocol cannot accept; answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, npt.NDArray[Any]]
    outputs: list[RequestedOutput] | None
    binary_by_default: bool


def decompress(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError) as exc:
        raise OipError(f"body: not valid {encoding} data: {exc}") from None
    raise OipError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", 415)


def _json_header(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OipError(
                f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                f"{len(body)} bytes"
            )
        head, rest = body[: int(header_length)], body[int(header_length) :]
    try:
        return orjson.loads(head), rest
    except orjson.JSONDecodeError as exc:
        raise OipError(f"the inference header is not valid JSON: {exc}") from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        return [x for item in data for x in _flatten(item)]
    return data


def _tensor(spec: Any, rest: bytes, offset: int) -> tuple[str, npt.NDArray[Any], int]:
    if not isinstance(spec, dict):
        raise OipError("inputs: each input must be an object")
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str):
        raise OipError("inputs: an input has no name")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise OipError(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in DATATYPES:
        raise OipError(f"input {name!r}: datatype {datatype!r} is not supported")
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise OipError(
                f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of "
                f"{datatype} ({count * dtype.itemsize} bytes)"
            )
        if offset + size > len(rest):
            raise OipError(f"input {name!r}: the binary data is truncated")
        array = np.frombuffer(rest, dtype=dtype, count=count, offset=offset)
        return name, array.reshape(shape), offset + size
    if "data" not in spec:
        raise OipError(f"input {name!r}: no data and no binary_data_size")
    values = _flatten(spec["data"])
    if len(values) != count:
        raise OipError(f"input {name!r}: {len(values)} values for shape {shape} ({count})")
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise OipError(f"input {name!r}: data is not {datatype}: {exc}") from None
    return name, array.reshape(shape), offset


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    header, rest = _json_header(body, header_length)
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise OipError('the request needs an "inputs" list')
    inputs: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for spec in header["inputs"]:
        name, array, offset = _tensor(spec, rest, offset)
        if name in inputs:
            raise OipError(f"input {name!r} is given twice")
        inputs[name] = array
    if offset != len(rest):
        raise OipError(f"{len(rest) - offset} bytes of binary data belong to no input")
    parameters = header.get("parameters") or {}
    binary_by_default = bool(parameters.get("binary_data_output", False))
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise OipError('"outputs" must be a list')
        outputs = []
        for out in header["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise OipError("outputs: each requested output needs a name")
            binary = (out.get("parameters") or {}).get("binary_data", binary_by_default)
            outputs.append(RequestedOutput(out["name"], bool(binary)))
    request_id = header.get("id")
    return InferRequest(
        None if request_id is None else str(request_id), inputs, outputs, binary_by_default
    )


def encode_reply(
    header: dict[str, Any], tensors: list[tuple[str, npt.NDArray[Any], bool]]
) -> tuple[bytes, int | None]:
    """The reply body, and the JSON header's length when binary outputs follow it."""
    outputs = []
    blobs = []
    for name, array, binary in tensors:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": NAMES[array.dtype.newbyteorder("<")],
            "shape": list(array.shape),
        }
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    head = orjson.dumps(header | {"outputs": outputs})
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
