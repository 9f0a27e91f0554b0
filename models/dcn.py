"""Ranking models in PyTorch: DCN-v2 and the logistic-regression baseline on the same inputs.

Both take (dense float32 [N, D], ids int64 [N, S]) and return conversion log-odds [N]. Dense
normalisation lives inside the model, so serving passes raw feature values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import torch
from torch import nn


@dataclass(frozen=True)
class DCNConfig:
    """Architecture of a DCN-v2 (parallel cross and deep towers)."""

    embedding_dim: int = 16
    cross_layers: int = 3
    mlp_layers: tuple[int, ...] = (256, 128, 64)
    cross_rank: int | None = None
    """Low-rank cross layers (U V^T) when set; full-rank otherwise."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def multiply_adds(self, categorical: int, dense: int) -> int:
        """Multiply-adds per candidate in the cross, deep and head layers (the compute)."""
        width = categorical * self.embedding_dim + dense
        per_cross = width * width if self.cross_rank is None else 2 * width * self.cross_rank
        sizes = (width, *self.mlp_layers)
        deep = sum(a * b for a, b in pairwise(sizes))
        return self.cross_layers * per_cross + deep + width + sizes[-1]


class _DenseNormalizer(nn.Module):
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: npt.NDArray[np.float32], std: npt.NDArray[np.float32]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer(
            "inv_std", torch.as_tensor(1.0 / np.maximum(std, 1e-6), dtype=torch.float32)
        )

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return (dense - self.mean) * self.inv_std


class _FlatEmbedding(nn.Module):
    """All categorical tables in one matrix: one gather per call instead of one per feature."""

    offsets: torch.Tensor

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.as_tensor(offsets))
        self.table = nn.Embedding(int(sum(cardinalities)), dim)
        nn.init.normal_(self.table.weight, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedded: torch.Tensor = self.table(ids + self.offsets)
        return embedded.flatten(1)


class _CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l, with W full or factored as U V^T."""

    def __init__(self, width: int, rank: int | None) -> None:
        super().__init__()
        self.linear: nn.Module = (
            nn.Linear(width, width)
            if rank is None
            else nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))
        )

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x0 * self.linear(x) + x
        return out


class DCNv2(nn.Module):
    """Deep & Cross Network v2 (Wang et al., 2021), parallel structure."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        dense_mean: npt.NDArray[np.float32],
        dense_std: npt.NDArray[np.float32],
        config: DCNConfig,
    ) -> None:
        super().__init__()
        self.normalize = _DenseNormalizer(dense_mean, dense_std)
        self.embedding = _FlatEmbedding(cardinalities, config.embedding_dim)
        width = len(cardinalities) * config.embedding_dim + len(dense_mean)
        self.cross = nn.ModuleList(
            _CrossLayer(width, config.cross_rank) for _ in range(config.cross_layers)
        )
        layers: list[nn.Module] = []
        previous = width
        for size in config.mlp_layers:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(width + previous, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([self.embedding(ids), self.normalize(dense)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        logit: torch.Tensor = self.head(torch.cat([x, self.deep(x0)], dim=1)).squeeze(-1)
        return logit


class LogisticRegression(nn.Module):
    """One weight per categorical id and per normalised dense feature: no interactions."""

    def __init__(
        self,
        cardinalities: Sequence[int],
        dense_mean: npt.NDArray[np.float32],
        dense_std: npt.NDArray[np.float32],
    ) -> None:
        super().__init__()
        self.normalize = _DenseNormalizer(dense_mean, dense_std)
        self.embedding = _FlatEmbedding(cardinalities, 1)
        self.dense = nn.Linear(len(dense_mean), 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.embedding(ids).sum(dim=1) + self.dense(
            self.normalize(dense)
        ).squeeze(-1)
        return logit
