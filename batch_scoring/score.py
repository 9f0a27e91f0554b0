"""The batch scoring function: request rows in, calibrated probabilities out, as online.

It runs the serving path's own pieces on many requests at once: EntityCodec.decode of the stored
vectors (defaults where an entity is missing), assemble_inputs in spec order, LoadedModel.score
(onnxruntime, then the version's Platt calibration). Context values are encoded with the spec's
own `encode_one`, as `context_blocks` does for one request, with the same rules: text or integer
for categorical features, numbers for dense ones, absent or null meaning unknown or default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batch_scoring.errors import BatchInputError
from batch_scoring.features import Entity, FeatureSource
from batch_scoring.reader import AD_COLUMN, USER_COLUMN
from feature_client.assembly import ContextBlocks, ModelInputs, assemble_inputs
from feature_client.codec import DecodedRows, EntityCodec
from feature_client.spec import UNKNOWN_ID, CategoricalFeature, FeatureSpec
from service.registry import LoadedModel

# Rows per onnxruntime call: past a few thousand rows the per-call overhead is gone, and the
# activations of one call stay in cache.
INFERENCE_ROWS = 100_000
OUTPUT_COLUMNS = ("model", "model_version", "score", "missing_user", "missing_ad")


@dataclass(frozen=True)
class ScoredRows:
    """Calibrated probabilities of N rows and which rows were scored on defaults."""

    scores: npt.NDArray[np.float64]
    missing_user: npt.NDArray[np.bool_]
    missing_ad: npt.NDArray[np.bool_]
    rejected: int
    """Stored vectors present but unreadable (another schema, or corrupt): scored on defaults."""


def _plain(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    return array


def _categorical_ids(feature: CategoricalFeature, column: pa.Array) -> npt.NDArray[np.int32]:
    name = feature.name
    kind = column.type
    if pa.types.is_null(kind):
        return np.full(len(column), UNKNOWN_ID, dtype=np.int32)
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
    ):
        raise BatchInputError(
            f"column {name}: expected text or integers (as /v1/score takes), got {kind}"
        )
    encoded = column.dictionary_encode()
    # One encode_one per distinct value, then a gather: the last slot is null's unknown id.
    distinct = encoded.dictionary.to_pylist()
    lookup = np.fromiter(
        (feature.encode_one(str(v)) for v in distinct),
        dtype=np.int32,
        count=len(distinct),
    )
    lookup = np.append(lookup, np.int32(UNKNOWN_ID))
    positions = encoded.indices.fill_null(len(distinct)).to_numpy()
    ids: npt.NDArray[np.int32] = lookup[positions]
    return ids


def _dense_values(default: float, name: str, column: pa.Array) -> npt.NDArray[np.float32]:
    kind = column.type
    if pa.types.is_null(kind):
        return np.full(len(column), default, dtype=np.float32)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise BatchInputError(f"column {name}: expected numbers (as /v1/score takes), got {kind}")
    values = pc.fill_null(column.cast(pa.float64()), default)
    result: npt.NDArray[np.float32] = values.to_numpy().astype(np.float32)
    return result


def encode_context(spec: FeatureSpec, frame: pa.Table) -> ContextBlocks:
    """Per-row context blocks: dense [N, Dc] float32 and ids [N, Sc] int32, in spec order."""
    rows = frame.num_rows
    dense_features = spec.dense("context")
    dense = np.empty((rows, len(dense_features)), dtype=np.float32)
    for j, feature in enumerate(dense_features):
        if feature.name in frame.column_names:
            column = _plain(frame.column(feature.name))
            dense[:, j] = _dense_values(feature.default, feature.name, column)
        else:
            dense[:, j] = feature.default
    categorical = spec.categorical("context")
    ids = np.empty((rows, len(categorical)), dtype=np.int32)
    for j, cat in enumerate(categorical):
        if cat.name in frame.column_names:
            ids[:, j] = _categorical_ids(cat, _plain(frame.column(cat.name)))
        else:
            ids[:, j] = UNKNOWN_ID
    return dense, ids


def _entity_ids(frame: pa.Table, column_name: str) -> pa.DictionaryArray:
    column = _plain(frame.column(column_name))
    if pa.types.is_integer(column.type):
        column = column.cast(pa.string())
    elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise BatchInputError(f"column {column_name}: expected text ids, got {column.type}")
    empty = column.null_count + pc.sum(pc.equal(pc.utf8_length(column), 0)).as_py()
    if empty:
        raise BatchInputError(f"column {column_name}: {empty} row(s) have a null or empty id")
    encoded: pa.DictionaryArray = column.dictionary_encode()
    return encoded


def _entity_rows(
    features: FeatureSource, codec: EntityCodec, entity: Entity, ids: pa.DictionaryArray
) -> DecodedRows:
    """Each distinct entity fetched and decoded once, then gathered per row."""
    distinct = codec.decode(features.fetch(entity, ids.dictionary.to_pylist()))
    rows = ids.indices.to_numpy()
    found = distinct.found[rows]
    return DecodedRows(
        distinct.dense[rows],
        distinct.ids[rows],
        found,
        distinct.rejected,
        missing=len(found) - int(found.sum()),
    )


def model_inputs(
    model: LoadedModel, frame: pa.Table, features: FeatureSource
) -> tuple[ModelInputs, DecodedRows, DecodedRows]:
    """The model's two input matrices for every row of `frame`, and the decoded entities."""
    context_dense, context_ids = encode_context(model.spec, frame)
    user = _entity_rows(features, model.user_codec, "user", _entity_ids(frame, USER_COLUMN))
    ad = _entity_rows(features, model.ad_codec, "ad", _entity_ids(frame, AD_COLUMN))
    inputs = assemble_inputs(
        frame.num_rows, [user.dense, ad.dense, context_dense], [user.ids, ad.ids, context_ids]
    )
    return inputs, user, ad


def score_inputs(
    model: LoadedModel, inputs: ModelInputs, batch_rows: int = INFERENCE_ROWS
) -> npt.NDArray[np.float64]:
    """Calibrated probabilities, `batch_rows` rows per onnxruntime call."""
    scores = np.empty(len(inputs), dtype=np.float64)
    for start in range(0, len(inputs), batch_rows):
        stop = start + batch_rows
        scores[start:stop] = model.score(
            ModelInputs(inputs.dense[start:stop], inputs.ids[start:stop])
        )
    return scores


def score_frame(
    model: LoadedModel,
    frame: pa.Table,
    features: FeatureSource,
    batch_rows: int = INFERENCE_ROWS,
) -> ScoredRows:
    """Score every request row of `frame` (user_id, ad_id and context columns)."""
    inputs, user, ad = model_inputs(model, frame, features)
    return ScoredRows(
        score_inputs(model, inputs, batch_rows),
        ~user.found,
        ~ad.found,
        user.rejected + ad.rejected,
    )


def with_scores(model: LoadedModel, frame: pa.Table, scored: ScoredRows) -> pa.Table:
    """The input rows with the model, its version, the score and the missing flags appended."""
    clash = [c for c in OUTPUT_COLUMNS if c in frame.column_names]
    if clash:
        raise BatchInputError(
            f"input column(s) {', '.join(clash)} would be overwritten by the output"
        )
    n = frame.num_rows
    columns = {
        "model": pa.array([model.name] * n, pa.string()),
        "model_version": pa.array(np.full(n, model.version, dtype=np.int32)),
        "score": pa.array(scored.scores),
        "missing_user": pa.array(scored.missing_user),
        "missing_ad": pa.array(scored.missing_ad),
    }
    for name, values in columns.items():
        frame = frame.append_column(name, values)
    return frame
