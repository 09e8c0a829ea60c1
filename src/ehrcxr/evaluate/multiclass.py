"""Metrics of a single-label multiclass task (length of stay: ordered classes) from one-hot labels and class
probabilities, under every bootstrap weight row at once: accuracy, macro-F1 and linearly weighted Cohen's kappa.

The predicted class is the most probable one (first on ties, as ``argmax``). A weight row's confusion matrix is
``weights @ onehot(true · K + predicted)`` — one matrix product for every resample — and each metric follows from
it as scikit-learn defines it: ``accuracy_score``; ``f1_score(average='macro')`` over the classes present in the
resample's true or predicted labels (an F1 with no true and no predicted member is left out, one with a zero
denominator otherwise counts 0); ``cohen_kappa_score(weights='linear', labels=range(K))`` with the class index as
its ordinal position (fixed K classes, so an empty class does not shift the distances).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ehrcxr.evaluate.bootstrap import _check_inputs

MULTICLASS_METRICS = ("accuracy", "macro_f1", "kappa_linear")


def true_classes(y: np.ndarray) -> np.ndarray:
    """(N,) class index of one-hot labels ``y`` (N, K); raises unless every row holds exactly one 1."""
    y = np.asarray(y)
    per_row = y.sum(axis=1)
    bad = np.flatnonzero(per_row != 1)
    if bad.size:
        raise ValueError(f"multiclass labels must be one-hot: row {bad[0]} holds {int(per_row[bad[0]])} ones")
    return y.argmax(axis=1)


def confusion_counts(true: np.ndarray, predicted: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """(W, K, K) weighted confusion matrices (rows: true class, columns: predicted) of every weight row."""
    cell = true * n_classes + predicted
    indicator = np.zeros((cell.size, n_classes * n_classes))
    indicator[np.arange(cell.size), cell] = 1.0
    return (np.asarray(weights, dtype=np.float64) @ indicator).reshape(-1, n_classes, n_classes)


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and linear-weighted kappa of (W, K, K) confusion matrices -> (W,) each."""
    total = confusion.sum(axis=(1, 2))
    true_totals, predicted_totals = confusion.sum(axis=2), confusion.sum(axis=1)
    correct = np.einsum("wkk->wk", confusion)
    accuracy = np.divide(correct.sum(axis=1), total, out=np.full(total.shape, np.nan), where=total > 0)
    denominator = true_totals + predicted_totals
    f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
    present = denominator > 0
    count = present.sum(axis=1)
    macro_f1 = np.divide((f1 * present).sum(axis=1), count, out=np.full(total.shape, np.nan), where=count > 0)
    k = confusion.shape[1]
    distance = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(np.float64)
    expected = np.divide(true_totals[:, :, None] * predicted_totals[:, None, :], total[:, None, None],
                         out=np.zeros_like(confusion), where=total[:, None, None] > 0)
    observed_disagreement = np.einsum("wij,ij->w", confusion, distance)
    expected_disagreement = np.einsum("wij,ij->w", expected, distance)
    kappa = 1 - np.divide(observed_disagreement, expected_disagreement, out=np.full(total.shape, np.nan),
                          where=expected_disagreement > 0)
    return {"accuracy": accuracy, "macro_f1": macro_f1, "kappa_linear": kappa}


def multiclass_resample_stats(y, p_by_seed: Sequence, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Seed-pooled (mean over seeds) accuracy, macro-F1 and linear kappa under every weight row -> (W,) each."""
    y, p_by_seed = _check_inputs(y, p_by_seed)
    true = true_classes(y)
    per_seed = [metrics_from_confusion(confusion_counts(true, p.argmax(axis=1), y.shape[1], weights))
                for p in p_by_seed]
    return {metric: np.mean([values[metric] for values in per_seed], axis=0) for metric in MULTICLASS_METRICS}
