"""The prediction log's record: one scored request, exactly as the model saw it.

One JSON object per line (JSON Lines files) or per stream entry (Redis stream field `record`):

    {"format": 1, "time": 1764129000.123, "request_id": "r-1", "tenant": null,
     "model": "pcvr", "model_version": 3, "role": "active", "spec": "<spec fingerprint>",
     "user_id": "u42", "ad_ids": ["a9", "a17"], "context": {"device": "ios", "hour": 14},
     "dense": [[...], [...]], "ids": [[...], [...]], "scores": [0.081, 0.099],
     "degraded": false}

`dense` and `ids` are the model's input rows, one per candidate in `ad_ids` order, after
defaults and encoding: training on them reproduces serving exactly (no training/serving skew).
float32 values are written as their shortest round-tripping decimal, so reading them back as
float32 gives the same bits. `time` is the Unix time the request was scored. Readers skip
records of a newer `format` than they know, and say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

FORMAT = 1

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class RecordError(ValueError):
    """A log line that is not a prediction record of a known format."""


@dataclass(frozen=True)
class PredictionRecord:
    """One logged request: ids, the model's input rows, and the scores it answered."""

    time: float
    request_id: str | None
    tenant: str | None
    model: str
    model_version: int
    role: str
    spec: str
    user_id: str
    ad_ids: list[str]
    context: Mapping[str, str | int | float]
    dense: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    degraded: bool

    def __len__(self) -> int:
        return len(self.ad_ids)

    def encode(self) -> bytes:
        """The record as one line of JSON, without the newline."""
        return orjson.dumps(
            {
                "format": FORMAT,
                "time": self.time,
                "request_id": self.request_id,
                "tenant": self.tenant,
                "model": self.model,
                "model_version": self.model_version,
                "role": self.role,
                "spec": self.spec,
                "user_id": self.user_id,
                "ad_ids": self.ad_ids,
                "context": self.context,
                "dense": self.dense,
                "ids": self.ids,
                "scores": self.scores,
                "degraded": self.degraded,
            },
            option=_OPTIONS,
        )

    @classmethod
    def decode(cls, line: bytes | str) -> PredictionRecord:
        """Parse one line; RecordError names what is wrong with it."""
        try:
            data: Any = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise RecordError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError("not a JSON object")
        version = data.get("format")
        if version != FORMAT:
            raise RecordError(f"record format {version!r}; this reader knows format {FORMAT}")
        try:
            ad_ids = [str(a) for a in data["ad_ids"]]
            rows = len(ad_ids)
            dense = np.asarray(data["dense"], dtype=np.float32).reshape(rows, -1)
            ids = np.asarray(data["ids"], dtype=np.int64).reshape(rows, -1)
            scores = np.asarray(data["scores"], dtype=np.float64).reshape(rows)
            return cls(
                time=float(data["time"]),
                request_id=data.get("request_id"),
                tenant=data.get("tenant"),
                model=str(data["model"]),
                model_version=int(data["model_version"]),
                role=str(data.get("role", "active")),
                spec=str(data["spec"]),
                user_id=str(data["user_id"]),
                ad_ids=ad_ids,
                context=dict(data.get("context") or {}),
                dense=dense,
                ids=ids,
                scores=scores,
                degraded=bool(data.get("degraded", False)),
            )
        except KeyError as exc:
            raise RecordError(f"missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise RecordError(f"malformed field: {exc}") from None
