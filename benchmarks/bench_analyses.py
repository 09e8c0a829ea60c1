"""Time the report's analyses at paper scale and project the whole grid.

Paper scale: 20 models × 3 tasks × 11 missingness levels × 5 seeds, 12,000 test stays (26.5% paired). One slice is
timed for real — phenotyping (25 labels), one missing level, 20 models × 5 seeds, 1,000 resamples — on synthetic
predictions held in memory; the grid is projected by the analyses' cost per label-column (mortality 1 label, length
of stay 7) and missing level. Fairness, calibration and X-ray age are not timed here (they need the cohort).

    python benchmarks/bench_analyses.py [--stays 12000] [--models 20] [--seeds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.analysis.core import Cell
from ehrcxr.analysis.fusion_gain import fusion_gain_table
from ehrcxr.analysis.imbalance import imbalance_table
from ehrcxr.analysis.robustness import missingness_at_test_time
from ehrcxr.evaluate.aggregate import Run
from ehrcxr.resources import phenotype_labels

PAIRED_SHARE = 0.265
TASK_LABELS = {"phenotyping": 25, "mortality": 1, "length_of_stay": 7}
MISSING_LEVELS = 11


def synthetic_cells(n_test: int, n_models: int, n_seeds: int, rng: np.random.Generator) -> dict:
    """In-memory cells of one task (phenotyping) and setting: a third of the models EHR-only, a sixth X-ray-only,
    the rest fusion models; scores of varying skill."""
    labels = phenotype_labels()
    n_val = n_test // 2
    has_cxr = rng.random(n_test) < PAIRED_SHARE
    y_test, y_val = rng.random((n_test, len(labels))) < 0.2, rng.random((n_val, len(labels))) < 0.2
    stays = np.arange(n_test)
    cells = {}
    for m in range(n_models):
        modalities = ("ehr",) if m < n_models // 3 else ("cxr",) if m < n_models // 2 else ("ehr", "cxr")
        runs = []
        for seed in range(n_seeds):
            frames = []
            for eval_set, y, ids, cxr in (("val", y_val, np.arange(10**6, 10**6 + n_val), np.ones(n_val, bool)),
                                          ("paired_test", y_test[has_cxr], stays[has_cxr], has_cxr[has_cxr]),
                                          ("partial_test", y_test, stays, has_cxr)):
                columns = {"stay_id": ids, "eval_set": eval_set, "has_cxr": cxr.astype(np.int8)}
                for prefix in ("p", "p_nocxr", "p_noehr"):
                    scores = 1 / (1 + np.exp(-(rng.uniform(0.5, 2) * (y - 0.5) + rng.standard_normal(y.shape))))
                    columns.update({f"{prefix}_{label}": scores[:, j] for j, label in enumerate(labels)})
                columns.update({f"y_{label}": y[:, j].astype(np.int8) for j, label in enumerate(labels)})
                frames.append(pd.DataFrame(columns))
            runs.append(Run(Path(f"model{m}/seed{seed}"), "phenotyping", f"model{m:02d}", "natural", seed, labels,
                            "val_auprc", pd.concat(frames, ignore_index=True)))
        cells["phenotyping", f"model{m:02d}", "natural"] = Cell("phenotyping", f"model{m:02d}", "natural",
                                                                 "natural", modalities, runs)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stays", type=int, default=12_000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    cells = synthetic_cells(args.stays, args.models, args.seeds, rng)
    print(f"built {len(cells)} cells × {args.seeds} seeds, {args.stays} test stays: {time.perf_counter() - started:.1f} s")
    options = dict(n_boot=args.boot, seed=0, threads=args.threads)
    timings = {}
    for name, analysis in (("fusion_gain", lambda: fusion_gain_table(cells, **options)),
                           ("modality_imbalance", lambda: imbalance_table(cells, **options)),
                           ("robustness (test time, 5 rates)",
                            lambda: missingness_at_test_time(cells, {}, [0, 0.25, 0.5, 0.75, 1], **options))):
        started = time.perf_counter()
        analysis()
        timings[name] = time.perf_counter() - started
        print(f"{name}: {timings[name]:.1f} s for one task × one missing level")
    label_factor = sum(TASK_LABELS.values()) / TASK_LABELS["phenotyping"]
    total = sum(timings.values()) * label_factor * MISSING_LEVELS
    print(f"projected grid ({len(TASK_LABELS)} tasks × {MISSING_LEVELS} levels): {total / 60:.1f} min on "
          f"{args.threads} threads; ~{total * args.threads / 16 / 60:.1f} min on 16 cores if the work were split "
          "into 16 independent jobs (today each analysis is one job over every task and level)")


if __name__ == "__main__":
    main()
