"""Time the vectorised bootstrap against a naive scikit-learn loop.

Usage: PYTHONPATH=src python benchmarks/bench_bootstrap.py [--stays 1200 --labels 25 --boot 1000]

The naive loop (sklearn on every ``np.repeat``-expanded resample) runs on ``--naive-boot`` resamples
and is extrapolated linearly to ``--boot``; both paths are checked to agree on those resamples.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrcxr.evaluate.bootstrap import WEIGHTED_METRICS, bootstrap_ci, bootstrap_metrics, resample_counts

SKLEARN = {"auroc": roc_auc_score, "auprc": average_precision_score}


def naive_resample_stats(y, p, metric, counts):
    """(B,) macro metric per resample, computed with sklearn on expanded resamples."""
    fn, stays = SKLEARN[metric], np.arange(len(y))
    out = []
    for row in counts:
        idx = np.repeat(stays, row)
        values = [fn(y[idx, j], p[idx, j]) for j in range(y.shape[1]) if 0 < y[idx, j].sum() < len(idx)]
        out.append(np.mean(values))
    return np.array(out)


def vectorised_resample_stats(y, p, metric, counts):
    """(B,) macro metric per resample via the weighted tie-group computation."""
    w = counts.astype(np.float64)
    stats = np.stack([WEIGHTED_METRICS[metric](y[:, j], p[:, j], w) for j in range(y.shape[1])], 1)
    valid = (w @ y > 0) & (w @ (1 - y) > 0)
    return np.where(valid, stats, 0).sum(1) / valid.sum(1)


def timed(fn, repeats=3):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stays", type=int, default=1200)
    parser.add_argument("--labels", type=int, default=25)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--naive-boot", type=int, default=20)
    parser.add_argument("--prevalence", type=float, default=0.15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    y = (rng.random((args.stays, args.labels)) < args.prevalence).astype(np.int8)
    p_by_seed = [np.clip(0.3 * y + rng.random(y.shape), 0, 1).round(3) for _ in range(3)]  # realistic ties
    print(f"{args.stays} stays x {args.labels} labels, {args.boot} resamples (best of 3, seconds)")
    full_seconds = {}
    for metric in SKLEARN:
        full_seconds[metric], result = timed(lambda: bootstrap_ci(y, p_by_seed[:1], metric, n_boot=args.boot))
        print(f"  bootstrap_ci {metric}, 1 seed:            {full_seconds[metric]:6.2f}  -> {np.round(result, 4)}")
    seconds, _ = timed(lambda: bootstrap_metrics(y, p_by_seed, n_boot=args.boot))
    print(f"  bootstrap_metrics auroc+auprc, 3 seeds: {seconds:6.2f}")

    counts = resample_counts(args.stays, args.naive_boot, np.random.default_rng(1))
    for metric in SKLEARN:
        naive_s, naive = timed(lambda: naive_resample_stats(y, p_by_seed[0], metric, counts), repeats=1)
        np.testing.assert_allclose(vectorised_resample_stats(y, p_by_seed[0], metric, counts), naive, atol=1e-10)
        naive_full = naive_s / args.naive_boot * args.boot
        print(f"  {metric}: naive sklearn loop {naive_s / args.naive_boot * 1e3:6.1f} ms/resample, "
              f"~{naive_full:6.1f} s for {args.boot} (extrapolated from {args.naive_boot}); "
              f"speed-up of bootstrap_ci x{naive_full / full_seconds[metric]:.0f}; results agree")


if __name__ == "__main__":
    main()
