"""DCN-v2 that computes the per-request part of its first layers once per request, not per ad.

Published as the `-request-once` variant (`adscore train --request-once`, or `adscore
request-once --name NAME --version N` for a published fp32 version).

The user's and the context's features are the same for every candidate of a request, and the
first cross layer and the first deep layer are linear in x0: W x0 = W_r x0_r + W_c x0_c. The
request half (W_r x0_r, and the request features' embedding lookups) is computed once per
distinct request row and gathered back onto the candidates; only the ad half runs per row.

The module is an exact re-parameterisation of a trained `DCNv2`: the same weights, reordered so
that request columns come first (the cross layers are elementwise in x0, so a consistent
permutation of the width changes nothing but the order of sums). Its inputs are unchanged,
(dense [N, D], ids [N, S]) rows, so the service, the prediction log, explanations and offline
scoring feed it like any other version. Requests are found in the rows themselves: a run of
consecutive rows with bit-identical user and context columns is one request, which is how the
service lays out a request (and a micro-batch of requests) anyway. Rows in any other order are
still scored exactly, only without the saving.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from feature_client.assembly import ModelInputs, concatenate_inputs
from feature_client.spec import FeatureSpec
from models.dcn import DCNConfig, DCNv2
from models.export import export_onnx, onnx_logits
from models.train import predict_logits
from service.model_metadata import ModelMetadata
from service.repository import ModelRepository, file_sha256

REQUEST_SOURCES = ("user", "context")
"""Feature sources shared by all candidates of a request."""
SUFFIX = "-request-once"
"""Of the architecture name of a request-once version."""


def _request_columns(spec: FeatureSpec) -> tuple[list[int], list[int], list[int], list[int]]:
    """(request dense, candidate dense, request ids, candidate ids) column indices."""
    dense = [f.source in REQUEST_SOURCES for f in spec.dense()]
    ids = [f.source in REQUEST_SOURCES for f in spec.categorical()]
    return (
        [i for i, shared in enumerate(dense) if shared],
        [i for i, shared in enumerate(dense) if not shared],
        [i for i, shared in enumerate(ids) if shared],
        [i for i, shared in enumerate(ids) if not shared],
    )


def _x0_positions(
    id_columns: Sequence[int], dense_columns: Sequence[int], dim: int, ids: int
) -> list[int]:
    """Positions in DCNv2's x0 (embeddings of every id column, then dense) of these columns."""
    return [c * dim + k for c in id_columns for k in range(dim)] + [
        ids * dim + d for d in dense_columns
    ]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class _SplitLinears(nn.Module):
    """Several linear maps of x0 = [request part | candidate part], fused into one matrix per
    part: the request part's product runs on R request rows and is gathered onto the N rows."""

    def __init__(
        self, layers: Sequence[nn.Linear], request: list[int], candidate: list[int]
    ) -> None:
        super().__init__()
        weight = torch.cat([layer.weight.detach() for layer in layers])
        biases = [
            layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)
            for layer in layers
        ]
        self.request = _linear(weight[:, request], None)
        self.candidate = _linear(weight[:, candidate], torch.cat(biases))
        self.sizes = [layer.out_features for layer in layers]

    def forward(
        self, x0_request: torch.Tensor, request_index: torch.Tensor, x0_candidate: torch.Tensor
    ) -> list[torch.Tensor]:
        per_request = torch.index_select(self.request(x0_request), 0, request_index)
        return list(torch.split(per_request + self.candidate(x0_candidate), self.sizes, dim=1))


def _runs(columns: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive column indices as [start, stop) runs: the spec orders columns by source, so
    the request columns are two runs (user first, context last) and a slice beats a gather."""
    runs: list[tuple[int, int]] = []
    for column in columns:
        if runs and runs[-1][1] == column:
            runs[-1] = (runs[-1][0], column + 1)
        else:
            runs.append((column, column + 1))
    return runs


def _select(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The columns of `runs`, side by side (none: a zero-width slice)."""
    parts = [x[:, start:stop] for start, stop in runs] or [x[:, :0]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor:
    """Non-empty blocks concatenated along columns (a source may lack dense or id features)."""
    kept = [p for p in parts if p.shape[1] > 0]
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)


class RequestOnceDCN(nn.Module):
    """A trained DCNv2 whose per-request part runs once per request (see the module doc)."""

    request_mean: torch.Tensor
    request_inv_std: torch.Tensor
    candidate_mean: torch.Tensor
    candidate_inv_std: torch.Tensor
    request_offsets: torch.Tensor
    candidate_offsets: torch.Tensor

    def __init__(self, model: DCNv2, spec: FeatureSpec) -> None:
        super().__init__()
        if not model.cross or not model.deep:
            raise ValueError("request-once needs at least one cross layer and one deep layer")
        request_dense, candidate_dense, request_ids, candidate_ids = _request_columns(spec)
        if not (request_dense or request_ids) or not (candidate_dense or candidate_ids):
            raise ValueError("request-once needs both request (user, context) and ad features")
        self.request_dense, self.candidate_dense = _runs(request_dense), _runs(candidate_dense)
        self.request_ids, self.candidate_ids = _runs(request_ids), _runs(candidate_ids)
        offsets, mean, inv_std = (
            model.embedding.offsets,
            model.normalize.mean,
            model.normalize.inv_std,
        )
        for name, tensor in (
            ("request_offsets", offsets[request_ids]),
            ("candidate_offsets", offsets[candidate_ids]),
            ("request_mean", mean[request_dense]),
            ("request_inv_std", inv_std[request_dense]),
            ("candidate_mean", mean[candidate_dense]),
            ("candidate_inv_std", inv_std[candidate_dense]),
        ):
            self.register_buffer(name, tensor.clone())
        self.table = model.embedding.table

        dim = model.embedding.table.embedding_dim
        slots = len(spec.categorical())
        request = _x0_positions(request_ids, request_dense, dim, slots)
        candidate = _x0_positions(candidate_ids, candidate_dense, dim, slots)
        order = torch.tensor(request + candidate)
        first, *rest = model.cross
        deep_first, *deep_rest = model.deep
        assert isinstance(deep_first, nn.Linear)
        first_linear = _cross_linear(first)
        if isinstance(first_linear, nn.Linear):  # full rank: W x0, with its rows permuted
            first_cross = _permuted_rows(first_linear, order)
            self.first_cross_up: nn.Module = nn.Identity()
        else:  # low rank: V^T x0 here, U applied to the sum
            first_cross, up = _factors(first_linear)
            self.first_cross_up = _permuted_rows(up, order)
        self.first_layers = _SplitLinears([first_cross, deep_first], request, candidate)
        self.cross = nn.ModuleList(_permuted_cross(_cross_linear(layer), order) for layer in rest)
        self.deep = nn.Sequential(*deep_rest)  # starts with the first deep layer's ReLU
        width = len(order)
        head = model.head.weight.detach()
        self.head = _linear(
            torch.cat([head[:, :width][:, order], head[:, width:]], dim=1), model.head.bias.detach()
        )

    def _x0(
        self,
        dense: torch.Tensor,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        mean: torch.Tensor,
        inv_std: torch.Tensor,
    ) -> torch.Tensor:
        embedded = self.table(ids + offsets).flatten(1) if ids.shape[1] else ids[:, :0]
        return _side_by_side([embedded, (dense - mean) * inv_std])

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        request_dense = _select(dense, self.request_dense)
        request_ids = _select(ids, self.request_ids)
        # A row starts a new request when any of its request columns differs from the row
        # before (compared as values: -0.0 == 0.0 scores the same; NaN only loses sharing).
        changed = _side_by_side(
            [request_dense[1:] != request_dense[:-1], request_ids[1:] != request_ids[:-1]]
        ).any(dim=1)
        # Cut to the rows there are: zero rows give zero starts.
        starts = torch.cat([torch.ones(1, dtype=torch.bool), changed])[: dense.shape[0]]
        request_index = starts.long().cumsum(0) - 1
        first_rows = starts.nonzero().squeeze(1)

        x0_request = self._x0(
            torch.index_select(request_dense, 0, first_rows),
            torch.index_select(request_ids, 0, first_rows),
            self.request_offsets,
            self.request_mean,
            self.request_inv_std,
        )
        x0_candidate = self._x0(
            _select(dense, self.candidate_dense),
            _select(ids, self.candidate_ids),
            self.candidate_offsets,
            self.candidate_mean,
            self.candidate_inv_std,
        )
        x0 = torch.cat([torch.index_select(x0_request, 0, request_index), x0_candidate], dim=1)
        first_cross, first_deep = self.first_layers(x0_request, request_index, x0_candidate)
        x = x0 * self.first_cross_up(first_cross) + x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        logit: torch.Tensor = self.head(torch.cat([x, self.deep(first_deep)], dim=1)).squeeze(-1)
        return logit


def _permuted_rows(linear: nn.Linear, order: torch.Tensor) -> nn.Linear:
    """`linear` whose outputs come in `order` (the x0 permutation)."""
    bias = linear.bias.detach()[order] if linear.bias is not None else None
    return _linear(linear.weight.detach()[order], bias)


def _cross_linear(layer: nn.Module) -> nn.Module:
    linear = layer.linear
    assert isinstance(linear, nn.Module)
    return linear


def _factors(low_rank: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """V^T and U of a low-rank cross layer's Sequential(V^T, U)."""
    down, up = list(low_rank.children())
    assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear)
    return down, up


def _permuted_cross(linear: nn.Module, order: torch.Tensor) -> nn.Module:
    """A cross layer's W (or U V^T) acting on permuted x: P W P^T, P b."""
    if isinstance(linear, nn.Linear):
        bias = linear.bias.detach()[order] if linear.bias is not None else None
        return _linear(linear.weight.detach()[order][:, order], bias)
    down, up = _factors(linear)
    return nn.Sequential(_linear(down.weight.detach()[:, order], None), _permuted_rows(up, order))


def request_shaped(inputs: ModelInputs, spec: FeatureSpec, candidates: int) -> ModelInputs:
    """`inputs` laid out like requests of `candidates` rows: each block of rows takes the user
    and context columns of its first row (the ad columns stay as they are)."""
    request_dense, _, request_ids, _ = _request_columns(spec)
    dense, ids = inputs.dense.copy(), inputs.ids.copy()
    firsts = np.arange(len(inputs)) // candidates * candidates
    dense[:, request_dense] = dense[firsts][:, request_dense]
    ids[:, request_ids] = ids[firsts][:, request_ids]
    return ModelInputs(dense, ids)


def load_published_dcn(model_path: Path, metadata: ModelMetadata) -> DCNv2:
    """The torch DCNv2 of a published fp32 version, its weights read back from model.onnx."""
    import onnx
    from onnx import numpy_helper

    architecture = metadata.training.get("architecture")
    variant = metadata.training.get("variant", {})
    if not metadata.architecture.startswith("dcn-v2") or not isinstance(architecture, dict):
        raise ValueError(
            f"{metadata.name} v{metadata.version} is not a DCN-v2 ({metadata.architecture})"
        )
    quantization = variant.get(
        "quantization", "int8" if "-int8" in metadata.architecture else "none"
    )
    if quantization != "none":
        raise ValueError(
            f"{metadata.name} v{metadata.version} is quantized ({quantization}): "
            "derive from its fp32 version, or train with --request-once --quantize int8"
        )
    if variant.get("request_once"):
        raise ValueError(
            f"{metadata.name} v{metadata.version} already computes its request part once"
        )
    try:
        config = DCNConfig(**(architecture | {"mlp_layers": tuple(architecture["mlp_layers"])}))
    except (TypeError, KeyError) as exc:
        raise ValueError(
            f"{metadata.name} v{metadata.version}: unreadable architecture {architecture}: {exc}"
        ) from exc
    spec = metadata.spec()
    dense = len(spec.dense_names)
    model = DCNv2(
        spec.cardinalities, np.zeros(dense, np.float32), np.ones(dense, np.float32), config
    )
    try:
        initializers = onnx.load(str(model_path)).graph.initializer
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise ValueError(f"{model_path}: not a readable ONNX file: {exc}") from exc
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in initializers}
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    if missing:
        raise ValueError(f"{model_path}: no weights for {', '.join(missing)}")
    for key in state:
        if weights[key].shape != state[key].shape:
            raise ValueError(
                f"{model_path}: {key} has shape {tuple(weights[key].shape)}, "
                f"the architecture says {tuple(state[key].shape)}"
            )
    model.load_state_dict({key: weights[key] for key in state})
    return model.eval()


PARITY_ROWS = 4096


def random_rows(model: DCNv2, spec: FeatureSpec, rows: int, seed: int) -> ModelInputs:
    """Rows with uniform ids and dense values around the training distribution's moments."""
    rng = np.random.default_rng(seed)
    mean = model.normalize.mean.numpy()
    std = 1.0 / model.normalize.inv_std.numpy()
    dense = (mean + std * rng.standard_normal((rows, len(mean)))).astype(np.float32)
    ids = np.stack([rng.integers(0, c, rows) for c in spec.cardinalities], axis=1)
    return ModelInputs(dense, ids.astype(np.int64))


def publish_request_once(
    repository: ModelRepository, name: str, version: int, *, activate: bool = False
) -> ModelMetadata:
    """Publish a request-once copy of a published fp32 DCN-v2 version: the same weights and
    scores, so its calibration, metrics, golden rows and drift reference carry over. Parity is
    measured against the source version's model.onnx on random and on request-shaped rows, and
    a copy that differs by more than the golden rows' tolerance is not published."""
    source = repository.read_metadata(name, version)
    source_path = repository.model_path(name, version)
    if file_sha256(source_path) != source.sha256:
        raise ValueError(f"{source_path}: sha256 does not match its metadata.json")
    model = load_published_dcn(source_path, source)
    spec = source.spec()
    golden = ModelInputs(
        np.array(source.golden.dense, dtype=np.float32), np.array(source.golden.ids, np.int64)
    )
    drawn = random_rows(model, spec, PARITY_ROWS, seed=version)
    rows = concatenate_inputs([golden, drawn, request_shaped(drawn, spec, 64)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(RequestOnceDCN(model, spec).eval(), rows, path)
        before, after = onnx_logits(source_path, rows), onnx_logits(path, rows)
        loaded = predict_logits(model, golden)
        calibration = source.calibration
        parity = {
            "rows": float(len(rows)),
            "max_abs_logit_diff": float(np.abs(after - before).max()),
            "max_abs_probability_diff": float(
                np.abs(calibration.apply(after) - calibration.apply(before)).max()
            ),
            "torch_vs_source_max_abs_logit_diff": float(
                np.abs(loaded - before[: len(golden)]).max()
            ),
        }
        if not parity["max_abs_probability_diff"] <= source.golden.tolerance:
            raise ValueError(
                f"{name} v{version}: the request-once copy's scores differ from the source's by "
                f"up to {parity['max_abs_probability_diff']:.2g}, more than the golden rows' "
                f"tolerance {source.golden.tolerance:g}; nothing was published"
            )
        variant = (
            {"quantization": "none"}
            | dict(source.training.get("variant", {}))
            | {"request_once": True}
        )
        metadata = source.model_copy(
            update={
                "created_at": datetime.now(UTC),
                "architecture": source.architecture + SUFFIX,
                "parity": parity,
                "training": source.training | {"variant": variant, "derived_from": version},
            }
        )
        return repository.publish(name, path, metadata, activate=activate)
