"""Threshold-free classification metrics (scikit-learn definitions) and their macro mean over labels.

A metric is a function ``(y, p) -> float`` of 1-D binary labels and scores. Every metric in
:data:`METRICS` is reported by the aggregation stage; a metric is undefined (NaN) when ``y`` holds a
single class, and :func:`macro` leaves such labels out of the mean.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


def check_binary_scores(y, p, what: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """Return ``y`` (int8, values 0/1) and ``p`` (float64, finite) as 1-D arrays of equal length, or raise."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"{what}: y and p must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"{what}: y has {y.size} values but p has {p.size}")
    bad_label = ~np.isin(y, (0, 1))
    if bad_label.any():
        row = int(np.flatnonzero(bad_label)[0])
        raise ValueError(f"{what}: labels must be 0/1; row {row} holds {y[row]!r}")
    bad_score = ~np.isfinite(p)
    if bad_score.any():
        row = int(np.flatnonzero(bad_score)[0])
        raise ValueError(f"{what}: scores must be finite; row {row} holds {p[row]!r}")
    return y.astype(np.int8), p


def has_both_classes(y) -> bool:
    """True when the 0/1 vector ``y`` holds at least one positive and one negative."""
    y = np.asarray(y)
    return bool(y.size) and bool(y.min() != y.max())


def auroc(y, p) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN if ``y`` has one class."""
    from sklearn.metrics import roc_auc_score  # imported on use: scikit-learn takes ~1 s to import

    y, p = check_binary_scores(y, p, "auroc")
    return float(roc_auc_score(y, p)) if has_both_classes(y) else float("nan")


def auprc(y, p) -> float:
    """Average precision (``sklearn.metrics.average_precision_score``); NaN if ``y`` has one class."""
    from sklearn.metrics import average_precision_score

    y, p = check_binary_scores(y, p, "auprc")
    return float(average_precision_score(y, p)) if has_both_classes(y) else float("nan")


METRICS: dict[str, Metric] = {"auroc": auroc, "auprc": auprc}


def resolve_metric(metric: str | Metric) -> Metric:
    """A metric function from its name in :data:`METRICS`, or the callable itself."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[metric]


def per_label(y, p, metric: str | Metric) -> np.ndarray:
    """Metric of each column of ``y`` (N, L) and ``p`` (N, L); NaN for columns with a single class. A metric named
    in :data:`METRICS` is computed by its exact vectorised form at unit weights (``ehrcxr.evaluate.bootstrap``;
    equal to scikit-learn's, without its ~3 ms of input checks per call: the trainer scores every epoch)."""
    y, p = np.asarray(y), np.asarray(p)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y and p must both be (N, L); got shapes {y.shape} and {p.shape}")
    fn = resolve_metric(metric)
    if isinstance(metric, str):
        from ehrcxr.evaluate.bootstrap import WEIGHTED_METRICS  # imports this module

        fn = partial(WEIGHTED_METRICS[metric], w=np.ones(y.shape[0], dtype=np.int32))
    return np.array(
        [fn(y[:, j], p[:, j]) if has_both_classes(y[:, j]) else np.nan for j in range(y.shape[1])],
        dtype=np.float64,
    )


def macro(y, p, metric: str | Metric) -> float:
    """Macro mean of ``metric`` over the labels (columns) of ``y``/``p`` (N, L).

    Labels whose column of ``y`` holds a single class (metric undefined) are left out of the mean;
    the result is NaN when no label has both classes.
    """
    values = per_label(y, p, metric)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else float("nan")
