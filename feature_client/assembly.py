"""Input assembly: per-entity feature blocks into the model's two input matrices.

Used by training and by serving alike, so both feed the model the same layout: dense [N, D]
float32 and ids [N, S] int64, with blocks in spec source order (user, ad, context). A block of
one row (the request's user or context) is broadcast to all N candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from feature_client.spec import UNKNOWN_ID, FeatureSpec

DENSE_INPUT = "dense"
IDS_INPUT = "ids"
LOGIT_OUTPUT = "logit"


@dataclass(slots=True)
class ModelInputs:
    """The two tensors every ranking model takes."""

    dense: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.dense)

    def as_feed(self) -> dict[str, npt.NDArray[np.float32] | npt.NDArray[np.int64]]:
        return {DENSE_INPUT: self.dense, IDS_INPUT: self.ids}


def concatenate_inputs(parts: Sequence[ModelInputs]) -> ModelInputs:
    """The rows of several inputs, one after another (a micro-batch, or rows of two kinds)."""
    if len(parts) == 1:
        return parts[0]
    return ModelInputs(
        np.concatenate([p.dense for p in parts]), np.concatenate([p.ids for p in parts])
    )


def _fill(
    out: npt.NDArray[np.float32] | npt.NDArray[np.int64],
    blocks: Sequence[npt.NDArray[np.float32] | npt.NDArray[np.int32]],
) -> None:
    column = 0
    for block in blocks:
        width = block.shape[1]
        out[:, column : column + width] = block  # broadcasts a one-row block over all rows
        column += width
    if column != out.shape[1]:
        raise ValueError(f"blocks cover {column} columns, the model expects {out.shape[1]}")


def assemble_inputs(
    rows: int,
    dense_blocks: Sequence[npt.NDArray[np.float32]],
    id_blocks: Sequence[npt.NDArray[np.int32]],
) -> ModelInputs:
    """Lay out blocks of [rows or 1, width] side by side into the model's input matrices."""
    dense = np.empty((rows, sum(b.shape[1] for b in dense_blocks)), dtype=np.float32)
    ids = np.empty((rows, sum(b.shape[1] for b in id_blocks)), dtype=np.int64)
    _fill(dense, dense_blocks)
    _fill(ids, id_blocks)
    return ModelInputs(dense, ids)


class ContextError(ValueError):
    """A request context value has a type its feature cannot take."""

    def __init__(self, feature: str, message: str) -> None:
        super().__init__(f"{feature}: {message}")
        self.feature = feature


ContextBlocks = tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]


def context_blocks(spec: FeatureSpec, context: Mapping[str, str | int | float]) -> ContextBlocks:
    """The request context as a one-row dense block and a one-row id block.

    Categorical values are matched as text (hour 14 and "14" are the same value); unknown
    values and absent features take the unknown id or the dense default. Keys the spec does
    not name are ignored, so clients may send context that only newer models read.
    """
    dense_features = spec.dense("context")
    dense = np.empty((1, len(dense_features)), dtype=np.float32)
    for j, feature in enumerate(dense_features):
        value = context.get(feature.name)
        if value is None:
            dense[0, j] = feature.default
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            dense[0, j] = value
        else:
            raise ContextError(feature.name, f"expected a number, got {value!r}")
    categorical = spec.categorical("context")
    ids = np.empty((1, len(categorical)), dtype=np.int32)
    for j, cat in enumerate(categorical):
        value = context.get(cat.name)
        if value is None:
            ids[0, j] = UNKNOWN_ID
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            ids[0, j] = cat.encode_one(str(value))
        else:
            raise ContextError(cat.name, f"expected a string or an integer, got {value!r}")
    return dense, ids


class ContextEncoder:
    """`context_blocks` of one spec, remembering the blocks of the contexts it has seen.

    An auction's context (device, country, hour, placement) takes few distinct values, and
    encoding one costs a hash per categorical feature and a loop over the spec. The blocks are
    shared by every request with that context, so they are read-only.
    """

    def __init__(self, spec: FeatureSpec, capacity: int = 4096) -> None:
        self.spec = spec
        self._capacity = capacity
        self._known: dict[object, ContextBlocks] = {}

    def blocks(self, context: Mapping[str, str | int | float]) -> ContextBlocks:
        # The types are part of the key: 14 and 14.0 are equal, but only 14 is a valid value of
        # a categorical feature.
        key = (tuple(context.items()), tuple(map(type, context.values())))
        try:
            return self._known[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value, which context_blocks refuses with its reason
            return context_blocks(self.spec, context)
        blocks = context_blocks(self.spec, context)
        for block in blocks:
            block.setflags(write=False)
        if len(self._known) >= self._capacity:
            self._known.clear()  # a bounded memo; recent contexts come back at once
        self._known[key] = blocks
        return blocks
