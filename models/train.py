"""Training with early stopping on a held-out split, with a progress bar.

Ranking models on click and conversion logs typically overfit from the second epoch on (the
"one-epoch phenomenon"): the id embeddings memorise. So validation runs several times per epoch
and the best weights seen are restored at the end.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from feature_client.assembly import ModelInputs
from models.evaluation import log_loss, roc_auc


@dataclass(frozen=True)
class LabelledRows:
    """Model inputs with their observed outcomes (and true probabilities, when known)."""

    inputs: ModelInputs
    labels: npt.NDArray[np.float32]
    true_probabilities: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FitConfig:
    """Optimiser and stopping rule of one training run."""

    learning_rate: float = 1e-3
    batch_size: int = 1024
    max_epochs: int = 2
    evaluations_per_epoch: int = 4
    patience: int = 2
    """Evaluations without a better validation log loss before stopping."""
    seed: int = 0


@dataclass
class FitReport:
    """What happened during fitting, for metadata and the console."""

    evaluations: list[dict[str, float]] = field(default_factory=list)
    best_validation_log_loss: float = math.inf
    best_epoch_fraction: float = 0.0
    stopped_early: bool = False
    seconds: float = 0.0


def predict_logits(
    model: nn.Module, inputs: ModelInputs, batch_size: int = 65_536
) -> npt.NDArray[np.float32]:
    """Log-odds for all rows, in evaluation mode, without gradients."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            dense = torch.from_numpy(inputs.dense[start : start + batch_size])
            ids = torch.from_numpy(inputs.ids[start : start + batch_size])
            outputs.append(model(dense, ids).numpy())
    return np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)


def _sigmoid(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def fit(
    model: nn.Module,
    train: LabelledRows,
    validation: LabelledRows,
    config: FitConfig,
    *,
    description: str = "training",
    progress: bool = True,
) -> FitReport:
    """Train with Adam on log loss; keep the weights with the best validation log loss."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    dense = torch.from_numpy(train.inputs.dense)
    ids = torch.from_numpy(train.inputs.ids)
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    eval_every = max(1, steps_per_epoch // config.evaluations_per_epoch)
    report = FitReport()
    best_state = copy.deepcopy(model.state_dict())
    evaluations_since_best = 0
    bar = tqdm(
        total=steps_per_epoch * config.max_epochs,
        desc=description,
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(config.max_epochs):
            order = torch.randperm(len(train), generator=generator)
            model.train()
            for step in range(steps_per_epoch):
                batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(dense[batch], ids[batch]), labels[batch]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                bar.update()
                last_step = step == steps_per_epoch - 1
                if (step + 1) % eval_every and not last_step:
                    continue
                if not last_step and steps_per_epoch - (step + 1) < eval_every // 2:
                    continue  # the end-of-epoch evaluation is close: skip this one
                p = _sigmoid(predict_logits(model, validation.inputs))
                model.train()
                evaluation = {
                    "epoch": round(epoch + (step + 1) / steps_per_epoch, 3),
                    "validation_log_loss": log_loss(validation.labels, p),
                    "validation_auc": roc_auc(validation.labels, p),
                }
                report.evaluations.append(evaluation)
                bar.set_postfix(
                    val_logloss=f"{evaluation['validation_log_loss']:.5f}",
                    val_auc=f"{evaluation['validation_auc']:.4f}",
                )
                if evaluation["validation_log_loss"] < report.best_validation_log_loss:
                    report.best_validation_log_loss = evaluation["validation_log_loss"]
                    report.best_epoch_fraction = evaluation["epoch"]
                    best_state = copy.deepcopy(model.state_dict())
                    evaluations_since_best = 0
                else:
                    evaluations_since_best += 1
                    if evaluations_since_best >= config.patience:
                        report.stopped_early = True
                        return report
    finally:
        bar.close()
        model.load_state_dict(best_state)
        model.eval()
        report.seconds = time.perf_counter() - started
    return report
