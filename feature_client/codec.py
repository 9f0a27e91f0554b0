"""The binary codec of one entity's feature vector, as stored in the online store.

Layout, little-endian, fixed length per entity kind and schema version:
    uint16 magic | uint16 schema_version | float32 dense[D] | int32 ids[S]
Decoding many values is one `numpy.frombuffer` over their concatenation: no Python loop per
feature, and the rows come back as views of that buffer (input assembly copies them once, into
the model's matrices). A value of the wrong length, magic or schema version is treated as
missing, never decoded into garbage, and counted so that the caller can report it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from feature_client.spec import FeatureSource, FeatureSpec

MAGIC = 0xAD5C


@dataclass(slots=True)  # not frozen: see ScoreRequest in service/scoring.py
class DecodedRows:
    """Decoded features of N entities of one kind; defaults where `found` is False."""

    dense: npt.NDArray[np.float32]
    """[N, D] float32."""
    ids: npt.NDArray[np.int32]
    """[N, S] int32 categorical ids."""
    found: npt.NDArray[np.bool_]
    """[N] True where the store held a valid vector."""
    rejected: int
    """Values present but unreadable (wrong length, magic or schema version)."""
    missing: int
    """Entities without a valid vector: `found` False (0 spares the caller a scan of it)."""


class EntityCodec:
    """Encodes and decodes the feature vectors of one entity kind (user or ad)."""

    def __init__(self, spec: FeatureSpec, source: FeatureSource) -> None:
        self.spec = spec
        self.source = source
        dense = spec.dense(source)
        categorical = spec.categorical(source)
        # Magic and schema version read as one little-endian 32-bit header: one comparison
        # checks both.
        self.dtype = np.dtype(
            [
                ("header", "<u4"),
                ("dense", "<f4", (len(dense),)),
                ("ids", "<i4", (len(categorical),)),
            ]
        )
        self.value_size = self.dtype.itemsize
        self._header = MAGIC | spec.schema_version << 16
        self._default_dense = spec.dense_defaults(source)
        self._dense_width = len(dense)
        self._ids_width = len(categorical)

    def encode(self, dense: npt.NDArray[np.float32], ids: npt.NDArray[np.int32]) -> list[bytes]:
        """One value per row of `dense` [N, D] and `ids` [N, S]."""
        if dense.shape != (len(dense), self._dense_width) or ids.shape != (
            len(dense),
            self._ids_width,
        ):
            raise ValueError(
                f"{self.source} features: expected dense [N, {self._dense_width}] and ids "
                f"[N, {self._ids_width}], got {dense.shape} and {ids.shape}"
            )
        records = np.empty(len(dense), dtype=self.dtype)
        records["header"] = self._header
        records["dense"] = dense
        records["ids"] = ids
        blob = records.tobytes()
        size = self.value_size
        return [blob[i : i + size] for i in range(0, len(blob), size)]

    def decode(self, values: Sequence[bytes | None]) -> DecodedRows:
        """Decode store values (None where a key is missing) into arrays."""
        n = len(values)
        size = self.value_size
        if n and None not in values and set(map(len, values)) == {size}:  # type: ignore[arg-type]
            # The common case, every entity stored and well sized: no per-value Python loop.
            records = np.frombuffer(b"".join(values), dtype=self.dtype)  # type: ignore[arg-type]
            # count_nonzero and fill: .all() and np.ones() wrap them in Python, about 1 µs each.
            if not np.count_nonzero(records["header"] != self._header):
                found = np.empty(n, dtype=np.bool_)
                found.fill(True)
                return DecodedRows(records["dense"], records["ids"], found, 0, 0)
        well_sized = [i for i, v in enumerate(values) if v is not None and len(v) == size]
        present = n - values.count(None)
        dense = np.broadcast_to(self._default_dense, (n, self._dense_width)).copy()
        ids = np.zeros((n, self._ids_width), dtype=np.int32)
        found = np.zeros(n, dtype=np.bool_)
        if well_sized:
            records = np.frombuffer(
                b"".join([values[i] for i in well_sized]),  # type: ignore[misc]
                dtype=self.dtype,
            )
            valid = records["header"] == self._header
            rows = np.asarray(well_sized)[valid]
            dense[rows] = records["dense"][valid]
            ids[rows] = records["ids"][valid]
            found[rows] = True
        valid_count = int(found.sum())
        return DecodedRows(
            dense, ids, found, rejected=present - valid_count, missing=n - valid_count
        )
