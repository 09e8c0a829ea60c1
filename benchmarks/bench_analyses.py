"""Time the report's analyses at paper scale and project the whole grid on 2 and on 16 cores.

Paper scale: 20 models × 3 tasks × 11 missingness levels × 5 seeds, 12,000 test stays (26.5% paired), 1,000
resamples. Each analysis job spreads its (task, missing) slices over its cores (``core.map_slices``: one forked
worker per slice). Timed for real on synthetic predictions held in memory: one phenotyping slice (25 labels, 20
models × 5 seeds) on one core and, with ``--two-cores``, two such slices on two cores (the workers' scaling on this
machine). Projected:
a slice costs in proportion to its label columns (mortality 1, length of stay 7, phenotyping 25); fairness runs at
one missing level, the others at all 11. Fairness spreads one slice per model and evaluation set, so it is timed on
``--fairness-models`` models (one EHR-only, one X-ray-only, fusion models) and scaled to ``--models``. On 16 cores an
analysis's slices are scheduled longest first.

    python benchmarks/bench_analyses.py [--stays 12000] [--models 20] [--seeds 5] [--boot 1000] [--two-cores]
"""
from __future__ import annotations

import argparse
import heapq
import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ehrcxr.analysis import fairness
from ehrcxr.analysis.core import Cell
from ehrcxr.analysis.fusion_gain import fusion_gain_table
from ehrcxr.analysis.imbalance import imbalance_table
from ehrcxr.analysis.robustness import missingness_at_test_time
from ehrcxr.evaluate.aggregate import Run
from ehrcxr.resources import phenotype_labels

PAIRED_SHARE = 0.265
TASK_LABELS = {"phenotyping": 25, "mortality": 1, "length_of_stay": 7}
MISSING_LEVELS = 11
RACES = ["WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER"]


def synthetic_cells(n_test: int, n_models: int, n_seeds: int, settings: list[str], rng: np.random.Generator
                    ) -> dict:
    """In-memory cells of phenotyping at each missing setting: a third of the models EHR-only, a sixth
    X-ray-only, the rest fusion models; scores of varying skill."""
    labels = phenotype_labels()
    n_val = n_test // 2
    has_cxr = rng.random(n_test) < PAIRED_SHARE
    y_test, y_val = rng.random((n_test, len(labels))) < 0.2, rng.random((n_val, len(labels))) < 0.2
    stays = np.arange(n_test)
    cells = {}
    for missing in settings:
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
                        skill = rng.uniform(0.5, 2)
                        scores = 1 / (1 + np.exp(-(skill * (y - 0.5) + rng.standard_normal(y.shape))))
                        columns.update({f"{prefix}_{label}": scores[:, j] for j, label in enumerate(labels)})
                    columns.update({f"y_{label}": y[:, j].astype(np.int8) for j, label in enumerate(labels)})
                    frames.append(pd.DataFrame(columns))
                runs.append(Run(Path(f"{missing}/model{m}/seed{seed}"), "phenotyping", f"model{m:02d}", missing, seed,
                                labels, "val_auprc", pd.concat(frames, ignore_index=True)))
            cells["phenotyping", f"model{m:02d}", missing] = Cell("phenotyping", f"model{m:02d}", missing, missing,
                                                                   modalities, runs)
    return cells


def synthetic_stays(n_test: int, rng: np.random.Generator) -> pd.DataFrame:
    """Demographics of the test stays, in MIMIC-like proportions (the fairness groups)."""
    return pd.DataFrame({
        "age": rng.integers(18, 95, n_test), "gender": rng.choice(["M", "F"], n_test, p=[0.56, 0.44]),
        "race": rng.choice(RACES, n_test, p=[0.65, 0.1, 0.04, 0.03, 0.18]),
        "insurance": rng.choice(["Medicare", "Medicaid", "Other"], n_test, p=[0.5, 0.1, 0.4]),
        "admission_type": rng.choice(["EW EMER.", "URGENT", "ELECTIVE", "SURGICAL SAME DAY ADMISSION"], n_test),
    }, index=pd.Index(np.arange(n_test), name="stay_id"))


def analyses(stays: pd.DataFrame, boot: int) -> dict:
    """name -> function(cells, threads) running that analysis over every slice of ``cells``."""
    options = dict(n_boot=boot, seed=0)
    return {
        "fusion_gain": lambda cells, threads: fusion_gain_table(cells, threads=threads, **options),
        "modality_imbalance": lambda cells, threads: imbalance_table(cells, threads=threads, **options),
        "robustness (test time, 5 rates)": lambda cells, threads: missingness_at_test_time(
            cells, {}, [0, 0.25, 0.5, 0.75, 1], threads=threads, **options),
        "fairness": lambda cells, threads: fairness.fairness_tables(cells, stays, "<bench>", threads=threads,
                                                                    missing="natural", **options),
    }


def longest_first_makespan(costs: list[float], workers: int) -> float:
    """Wall time of ``costs`` on ``workers`` when each free worker takes the longest slice left."""
    finish = [0.0] * workers
    for cost in sorted(costs, reverse=True):
        heapq.heapreplace(finish, finish[0] + cost)
    return max(finish)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stays", type=int, default=12_000)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--two-cores", action="store_true", help="also time two slices on two cores")
    parser.add_argument("--fairness-models", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    settings = ["natural", "miss0.5"] if args.two_cores else ["natural"]
    two = synthetic_cells(args.stays, args.models, args.seeds, settings, rng)
    one = {key: cell for key, cell in two.items() if key[2] == "natural"}
    stays = synthetic_stays(args.stays, rng)
    print(f"built {len(settings)} slice(s) × {args.models} models × {args.seeds} seeds, {args.stays} test stays: "
          f"{time.perf_counter() - started:.0f} s")
    scale = {task: labels / TASK_LABELS["phenotyping"] for task, labels in TASK_LABELS.items()}
    rows, serial_total, wall_16 = [], 0.0, 0.0
    sampled = sorted({model for _, model, _ in one})
    sampled = [sampled[0], sampled[args.models // 3], *sampled[args.models // 2:]][:args.fairness_models]
    for name, analysis in analyses(stays, args.boot).items():
        timed_one, timed_two, factor = one, two, 1.0
        if name == "fairness":  # one slice per model: time a few models, scale to all
            timed_one = {key: cell for key, cell in one.items() if key[1] in sampled}
            timed_two = {key: cell for key, cell in two.items() if key[1] in sampled}
            factor = args.models / len(sampled)
        started = time.perf_counter()
        with threadpool_limits(1):  # one core, BLAS included
            analysis(timed_one, 1)
        slice_s = (time.perf_counter() - started) * factor
        pair_s = np.nan
        if args.two_cores:
            started = time.perf_counter()
            analysis(timed_two, 2)
            pair_s = (time.perf_counter() - started) * factor
        levels, per_slice = (1, args.models * 2) if name == "fairness" else (MISSING_LEVELS, 1)
        costs = [slice_s * scale[task] / per_slice for task in TASK_LABELS for _ in range(levels * per_slice)]
        serial_total += sum(costs)
        wall_16 += longest_first_makespan(costs, 16)
        row = {"analysis": name, "1 slice, 1 core (s)": round(slice_s, 1)}
        if args.two_cores:
            work = 1 if name == "fairness" else 2  # fairness runs at natural only: the same slices on 2 cores
            row.update({"2× work, 2 cores (s)" if work == 2 else "same work, 2 cores (s)": round(pair_s, 1),
                        "2-core speed-up": round(work * slice_s / pair_s, 2)})
        rows.append({**row,
                     "grid slices": len(costs), "grid CPU (min)": round(sum(costs) / 60, 1),
                     "grid wall on 16 cores (min)": round(longest_first_makespan(costs, 16) / 60, 1)})
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f"\nwhole grid, every analysis: {serial_total / 60:.0f} min of CPU; {serial_total / 2 / 60:.0f} min on 2 cores; "
          f"{wall_16 / 60:.1f} min on 16 cores (analyses one after another, each over 16 workers)")


if __name__ == "__main__":
    main()
