"""Vectorised stay-level bootstrap of AUROC and AUPRC, pooled over training seeds.

A bootstrap resample of ``n`` stays is stored as a row of integer counts (how often each stay was
drawn, with replacement). For one label, one sort of the scores serves every resample: split by class, the
running weight of the negatives (and positives) scoring below each positive gives AUROC (ties count ½, as
``roc_auc_score``) and average precision (tied scores form one threshold, as ``average_precision_score``) for
all resamples at once, touching the positives' columns only after two running sums.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ClassSplit:
    """One sort of a label's scores, split by class: the positives' and negatives' stay indices in ascending score
    order, and for every positive (in that order) how many negatives score below it, how many score at most as
    high, and how many positives score below it. Ties need no special case: they are these counts."""

    positives: np.ndarray
    negatives: np.ndarray
    negatives_below: np.ndarray
    negatives_not_above: np.ndarray
    positives_below: np.ndarray


def split_by_class(y: np.ndarray, p: np.ndarray) -> ClassSplit:
    """The :class:`ClassSplit` of 0/1 labels ``y`` and scores ``p`` (n,)."""
    positive = np.asarray(y).astype(bool)
    order = np.argsort(p, kind="stable")
    positives, negatives = order[positive[order]], order[~positive[order]]
    positive_scores, negative_scores = p[positives], p[negatives]
    return ClassSplit(positives, negatives,
                      np.searchsorted(negative_scores, positive_scores, side="left"),
                      np.searchsorted(negative_scores, positive_scores, side="right"),
                      np.searchsorted(positive_scores, positive_scores, side="left"))


def _running_sums(w: np.ndarray) -> np.ndarray:
    """(n + 1, B) running sums down the stays of ``w`` (n, B), starting at 0, in ``w``'s dtype (int32 sums are exact
    and faster than float ones). Blocked: ~2√n vector additions of whole rows, several times faster than
    ``np.cumsum`` along either axis, which adds one element at a time."""
    n, width = w.shape
    block = max(1, int(np.sqrt(n)))
    n_blocks = -(-n // block)
    out = np.zeros((n_blocks * block + 1, width), dtype=w.dtype)
    out[1:n + 1] = w
    blocks = out[1:].reshape(n_blocks, block, width)
    for j in range(1, block):  # running sums within every block at once
        np.add(blocks[:, j], blocks[:, j - 1], out=blocks[:, j])
    for i in range(1, n_blocks):  # then carry each block's total into the next
        np.add(blocks[i], blocks[i - 1, -1], out=blocks[i])
    return out[:n + 1]


def _split_metrics(w: np.ndarray, split: ClassSplit, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """AUROC and/or average precision under each weight column of ``w`` (n stays, B resamples) -> (B,) each.

    AUROC = Σ_pos w_i (negatives below + ½ tied) / (P N), as ``roc_auc_score``; average precision =
    Σ_pos w_i precision(s_i) / P, where precision(s) counts every stay scoring ≥ s (tied scores are one threshold),
    as ``average_precision_score``. NaN where a resample lacks a class (AUROC) or positives (AP). Integer weights
    are summed as integers, then everything is float64. Stays run down the rows, so every step adds or gathers
    whole contiguous rows of B resamples."""
    negatives = _running_sums(w[split.negatives])
    positive_weights = w[split.positives].astype(np.float64)
    n_pos, n_neg = positive_weights.sum(axis=0), negatives[-1].astype(np.float64)
    below = negatives[split.negatives_below].astype(np.float64)
    out = {}
    if "auroc" in metrics:
        tied_half = 0.5 * (negatives[split.negatives_not_above] - below)
        concordant = np.einsum("ib,ib->b", positive_weights, below + tied_half)
        denom = n_pos * n_neg
        out["auroc"] = np.divide(concordant, denom, out=np.full(denom.shape, np.nan), where=denom > 0)
    if "auprc" in metrics:
        positives_below = _running_sums(w[split.positives])[split.positives_below].astype(np.float64)
        at_or_above_pos = n_pos - positives_below
        predicted = at_or_above_pos + (n_neg - below)
        precision = np.divide(at_or_above_pos, predicted, out=np.zeros_like(predicted), where=predicted > 0)
        summed = np.einsum("ib,ib->b", positive_weights, precision)
        out["auprc"] = np.divide(summed, n_pos, out=np.full(n_pos.shape, np.nan), where=n_pos > 0)
    return out


def _summable(weights: np.ndarray) -> np.ndarray:
    """``weights`` as int32 when they are whole counts whose row sums fit (bootstrap counts), else float64."""
    if weights.size and np.array_equal(weights, np.round(weights)) and weights.sum(axis=1).max() < 2**31 - 1:
        return weights.astype(np.int32)
    return weights.astype(np.float64)


BLOCK_ROWS = 128  # bootstrap rows evaluated together (at least): a label's (n, 128) arrays stay in the CPU cache
BLOCK_ELEMENTS = 1 << 19  # small sets (subgroups) take more rows per block, up to this many weights
VECTORISED = ("auroc", "auprc")


def _weighted(metric: str, y, p, w):
    y, p = check_binary_scores(y, p, f"weighted_{metric}")
    w, single = _check_weights(w, y.size)
    values = _split_metrics(np.ascontiguousarray(_summable(w).T), split_by_class(y, p), (metric,))[metric]
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

    Vectorised metrics share one sort per seed and label, then run over blocks of at least ``BLOCK_ROWS`` weight
    rows, transposed once to (stays, rows) for every label (their arrays stay in the CPU cache); ``threads`` (seed,
    label) pairs run at once (numpy releases the GIL).
    """
    n_seeds, (n, n_labels) = len(p_by_seed), y.shape
    out = [np.empty((n_seeds, weights.shape[0], n_labels)) for _ in metrics]
    vectorised = [isinstance(m, str) and m in VECTORISED for m in metrics]
    fast = tuple(m for m, v in zip(metrics, vectorised) if v)
    stays = np.arange(n)
    int_weights = weights.astype(np.int64) if not all(vectorised) else None  # only for expanded resamples
    blocks = []
    if fast:
        summable, rows = _summable(weights), max(BLOCK_ROWS, BLOCK_ELEMENTS // max(n, 1))
        blocks = [(slice(start, start + rows), np.ascontiguousarray(summable[start:start + rows].T))
                  for start in range(0, weights.shape[0], rows)]

    def one_label(s: int, j: int) -> None:
        p = p_by_seed[s]
        if fast:
            split = split_by_class(y[:, j], p[:, j])
            for block, block_weights in blocks:
                values = _split_metrics(block_weights, split, fast)
                for k, metric in enumerate(metrics):
                    if vectorised[k]:
                        out[k][s, block, j] = values[metric]
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


def _percentile_ci(values: np.ndarray, ci: float) -> np.ndarray:
    """(2, K) central ``ci`` percentile interval of each column of ``values`` (B, K) over its finite entries, by
    ``np.percentile``'s linear interpolation, all columns at once; NaN for a column without finite entries."""
    values = np.where(np.isfinite(values), values, np.nan)
    ordered = np.sort(values, axis=0)  # NaN last
    count = np.isfinite(ordered).sum(axis=0)
    out = np.full((2, values.shape[1]), np.nan)
    present = np.flatnonzero(count > 0)
    for row, q in enumerate((0.5 * (1 - ci), 0.5 * (1 + ci))):
        position = q * (count[present] - 1)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, count[present] - 1)
        low_values, high_values = ordered[below, present], ordered[above, present]
        out[row, present] = low_values + (high_values - low_values) * (position - below)
    return out


def _masked_mean(values: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(1 + n_boot, n) float64 stay weights: row 0 = the full set (ones), then ``n_boot`` resamples drawn with
    ``resample_counts`` and ``np.random.default_rng(seed)``. Every model, group and label scored on these stays
    shares them, so differences between models are paired."""
    counts = resample_counts(n, n_boot, np.random.default_rng(seed))
    return np.vstack([np.ones((1, n)), counts]).astype(np.float64)


def pooled_resample_stats(y, p_by_seed: Sequence, metrics: Sequence[str | Metric], weights: np.ndarray,
                          threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per metric, the seed-pooled ``(macro (W,), per-label (W, L))`` value under every weight row (``weights``
    (W, N), e.g. :func:`resample_weights`). A label lacking a class under a row is NaN there and left out of that
    row's macro mean; the macro value is the mean over seeds of each seed's macro mean, a label's the mean over
    seeds."""
    y, p_by_seed = _check_inputs(y, p_by_seed)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != y.shape[0]:
        raise ValueError(f"weights must have shape (W, {y.shape[0]}), got {weights.shape}")
    valid = (weights @ y > 0) & (weights @ (1 - y) > 0)  # (W, L): both classes present
    results = []
    for stats in _label_stats(y, p_by_seed, list(metrics), weights, threads):  # (S, W, L) each
        stats = np.where(valid[None], stats, np.nan)
        macro = _masked_mean(stats, np.isfinite(stats), axis=2).mean(axis=0)  # (W,)
        results.append((macro, stats.mean(axis=0)))
    return results


def summarise_resamples(values: np.ndarray, ci: float = 0.95) -> np.ndarray:
    """``(..., 3)`` estimate, low, high from resample values ``(W, ...)``: row 0 is the estimate, the central
    ``ci`` percentile interval of the finite rows 1.. the CI (NaN where none is finite)."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(values.shape[0], -1)
    out = np.column_stack([flat[0], _percentile_ci(flat[1:], ci).T])
    return out.reshape(*values.shape[1:], 3)


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
    weights = resample_weights(y.shape[0], n_boot, seed)
    results = []
    for macro, labels in pooled_resample_stats(y, p_by_seed, metrics, weights, threads):
        results.append((tuple(float(v) for v in summarise_resamples(macro, ci)), summarise_resamples(labels, ci)))
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
    "METRICS", "WEIGHTED_METRICS", "bootstrap_ci", "bootstrap_metrics", "pooled_resample_stats", "resample_counts",
    "resample_weights", "summarise_resamples",
    "weighted_auprc", "weighted_auroc",
]
