"""Vectorised stay-level bootstrap of AUROC and AUPRC, pooled over training seeds.

A bootstrap resample of ``n`` stays is stored as a row of integer counts (how often each stay was
drawn, with replacement). For one label, one sort of the scores serves every resample: the weighted
positive and negative counts of each group of tied scores give AUROC (ties count ½, as
``roc_auc_score``) and average precision (tied scores form one threshold, as
``average_precision_score``) for all resamples at once.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ehrcxr.evaluate.metrics import METRICS, Metric, check_binary_scores, resolve_metric


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) int64 counts of ``n`` draws with replacement from ``n`` stays (multinomial rows)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"resample_counts needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    draws = rng.integers(0, n, size=(n_boot, n))
    flat = (draws + np.arange(n_boot)[:, None] * n).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)


def _check_weights(w, n: int) -> tuple[np.ndarray, bool]:
    w = np.asarray(w, dtype=np.float64)
    single = w.ndim == 1
    w = np.atleast_2d(w)
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape (n_boot, {n}) or ({n},), got {np.shape(w)}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    return w, single


def _tie_groups(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One sort of a label's scores: (ascending order, whether each sorted stay is positive, the start of each
    group of tied scores or None when no two scores tie)."""
    order = np.argsort(p, kind="stable")
    sorted_p = p[order]
    positive = y[order].astype(bool)
    starts = None
    if sorted_p.size > 1 and (sorted_p[1:] == sorted_p[:-1]).any():
        starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    return order, positive, starts


def _group_sums(w: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray | None]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per tie group (ascending scores) of weight rows ``w`` (B, n) -> (B, G)."""
    order, positive, starts = groups
    weights = w[:, order]
    pos = weights * positive
    neg = weights - pos
    if starts is not None:
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    return pos, neg


def _tie_group_sums(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per group of tied scores, groups in ascending score order.

    ``y`` (n,) 0/1, ``p`` (n,), ``w`` (B, n) float weights -> two (B, G) arrays.
    """
    return _group_sums(w, _tie_groups(y, p))


def _auroc_from_groups(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC per row from ascending tie-group sums: P(score_pos > score_neg) + ½ P(tie); NaN if one class."""
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below_plus_half_tied = np.cumsum(neg, axis=1)
    neg_below_plus_half_tied -= 0.5 * neg
    concordant = np.einsum("bg,bg->b", pos, neg_below_plus_half_tied)
    denom = n_pos * n_neg
    return np.divide(concordant, denom, out=np.full(denom.shape, np.nan), where=denom > 0)


def _auprc_from_groups(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision per row from ascending tie-group sums; NaN when a row has no positives."""
    # true positives and all predicted positives when thresholding at each group's score (it and all higher)
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
    predicted = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    predicted += tp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    n_pos = tp[:, 0] if tp.shape[1] else np.zeros(tp.shape[0])
    summed = np.einsum("bg,bg->b", pos, precision)
    return np.divide(summed, n_pos, out=np.full(n_pos.shape, np.nan), where=n_pos > 0)


BLOCK_ROWS = 64  # bootstrap rows evaluated together: a label's (64, n) arrays fit in the CPU cache
_FROM_GROUPS = {"auroc": _auroc_from_groups, "auprc": _auprc_from_groups}


def _weighted(metric: str, y, p, w):
    y, p = check_binary_scores(y, p, f"weighted_{metric}")
    w, single = _check_weights(w, y.size)
    values = _FROM_GROUPS[metric](*_tie_group_sums(y, p, w))
    return float(values[0]) if single else values


def weighted_auroc(y, p, w) -> np.ndarray:
    """AUROC of ``y``/``p`` (n,) under each row of integer weights ``w`` (B, n) -> (B,); NaN if one class.

    Equals ``roc_auc_score(np.repeat(y, w[b]), np.repeat(p, w[b]))`` for every row ``b``.
    A 1-D ``w`` gives a float.
    """
    return _weighted("auroc", y, p, w)


def weighted_auprc(y, p, w) -> np.ndarray:
    """Average precision of ``y``/``p`` (n,) under each row of integer weights ``w`` (B, n) -> (B,).

    Equals ``average_precision_score`` on the ``np.repeat``-expanded resample of each row; NaN when a
    row has no positives. A 1-D ``w`` gives a float.
    """
    return _weighted("auprc", y, p, w)


WEIGHTED_METRICS = {"auroc": weighted_auroc, "auprc": weighted_auprc}


def _check_inputs(y, p_by_seed: Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"y must be (N, L), got shape {y.shape}")
    bad = np.argwhere(~np.isin(y, (0, 1)))
    if bad.size:
        row, col = bad[0]
        raise ValueError(f"y must be 0/1; row {row}, column {col} holds {y[row, col]!r}")
    if len(p_by_seed) == 0:
        raise ValueError("p_by_seed is empty: need the predictions of at least one seed")
    checked = []
    for s, p in enumerate(p_by_seed):
        p = np.asarray(p, dtype=np.float64)
        if p.shape != y.shape:
            raise ValueError(f"p_by_seed[{s}] has shape {p.shape}, expected {y.shape} like y")
        bad = np.argwhere(~np.isfinite(p))
        if bad.size:
            row, col = bad[0]
            raise ValueError(f"p_by_seed[{s}] must be finite; row {row}, column {col} holds {p[row, col]!r}")
        checked.append(p)
    return y.astype(np.int8), checked


def _label_stats(
    y: np.ndarray, p_by_seed: list[np.ndarray], metrics: Sequence[str | Metric], weights: np.ndarray, threads: int = 1
) -> list[np.ndarray]:
    """Per metric, the (S, W, L) value for every seed, weight row and label (NaN where undefined).

    Vectorised metrics share one sort per seed and label, then run over blocks of ``BLOCK_ROWS`` weight rows
    (whose arrays stay in the CPU cache); ``threads`` (seed, label) pairs run at once (numpy releases the GIL).
    """
    n_seeds, (n, n_labels) = len(p_by_seed), y.shape
    out = [np.empty((n_seeds, weights.shape[0], n_labels)) for _ in metrics]
    vectorised = [isinstance(m, str) and m in _FROM_GROUPS for m in metrics]
    stays, int_weights = np.arange(n), weights.astype(np.int64)

    def one_label(s: int, j: int) -> None:
        p = p_by_seed[s]
        if any(vectorised):
            groups = _tie_groups(y[:, j], p[:, j])
            for start in range(0, weights.shape[0], BLOCK_ROWS):
                block = slice(start, start + BLOCK_ROWS)
                sums = _group_sums(weights[block], groups)
                for k, metric in enumerate(metrics):
                    if vectorised[k]:
                        out[k][s, block, j] = _FROM_GROUPS[metric](*sums)
        for k, metric in enumerate(metrics):
            if not vectorised[k]:
                fn = resolve_metric(metric)  # no weighted form: evaluate each expanded resample
                for b, row in enumerate(int_weights):
                    idx = np.repeat(stays, row)
                    out[k][s, b, j] = fn(y[idx, j], p[idx, j])

    pairs = [(s, j) for s in range(n_seeds) for j in range(n_labels)]
    if threads > 1 and all(vectorised):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda pair: one_label(*pair), pairs))
    else:
        for pair in pairs:
            one_label(*pair)
    return out


def _percentile_ci(values: np.ndarray, ci: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [50 * (1 - ci), 50 * (1 + ci)])
    return float(low), float(high)


def _masked_mean(values: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def bootstrap_metrics(
    y,
    p_by_seed: Sequence,
    metrics: Sequence[str | Metric] = tuple(METRICS),
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    threads: int = 1,
) -> list[tuple[tuple[float, float, float], np.ndarray]]:
    """Seed-pooled macro and per-label bootstrap estimates of each metric, on the same resamples.

    Returns, per metric, ``((estimate, low, high) of the macro metric, (L, 3) array of per-label
    estimate, low, high)``; see :func:`bootstrap_ci` for the definitions. A label lacking a class on
    the full set gets a NaN estimate. ``threads``: labels evaluated at once (the results do not depend on it).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    y, p_by_seed = _check_inputs(y, p_by_seed)
    n = y.shape[0]
    counts = resample_counts(n, n_boot, np.random.default_rng(seed))
    weights = np.vstack([np.ones((1, n)), counts]).astype(np.float64)  # row 0 = the full set
    valid = (weights @ y > 0) & (weights @ (1 - y) > 0)  # (W, L): both classes present
    results = []
    for stats in _label_stats(y, p_by_seed, list(metrics), weights, threads):  # (S, W, L) each
        stats = np.where(valid[None], stats, np.nan)
        macro_pooled = _masked_mean(stats, np.isfinite(stats), axis=2).mean(axis=0)  # (W,)
        macro_ci = (float(macro_pooled[0]), *_percentile_ci(macro_pooled[1:], ci))
        label_pooled = stats.mean(axis=0)  # (W, L)
        label_ci = np.array(
            [(label_pooled[0, j], *_percentile_ci(label_pooled[1:, j], ci)) for j in range(y.shape[1])]
        ).reshape(-1, 3)
        results.append((macro_ci, label_ci))
    return results


def bootstrap_ci(
    y, p_by_seed: Sequence, metric: str | Metric, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Seed-pooled macro ``metric`` with a percentile bootstrap CI -> ``(estimate, low, high)``.

    ``y`` (N, L) 0/1 labels; ``p_by_seed`` one (N, L) score array per training seed, rows aligned
    with ``y``. The estimate is the mean over seeds of the macro metric on all N stays. Each of the
    ``n_boot`` resamples (``resample_counts`` with ``np.random.default_rng(seed)``) is shared by every
    seed and label; its value is the mean over seeds of the per-seed macro metric, where labels
    lacking a class in that resample are left out. The CI is the central ``ci`` percentile interval
    (``np.percentile``) of the finite resample values. ``metric`` is a name in :data:`METRICS`
    (vectorised for auroc and auprc) or a callable ``(y, p) -> float``.
    """
    [(macro_ci, _)] = bootstrap_metrics(y, p_by_seed, [metric], n_boot=n_boot, ci=ci, seed=seed)
    return macro_ci


__all__ = [
    "METRICS", "WEIGHTED_METRICS", "bootstrap_ci", "bootstrap_metrics", "resample_counts",
    "weighted_auprc", "weighted_auroc",
]
