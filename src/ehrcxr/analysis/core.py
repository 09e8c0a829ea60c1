"""What every analysis shares: the grid's runs as cells (task, model, missing) with their seeds pooled, the
stay resamples shared by every model, group and label of an evaluation set, bootstrap p-values, and the choice
of reference models on validation.

The analyses read the per-stay predictions the train cells write (``predictions.parquet``: the val stays and both
test sets, each scored as trained, ``p``, and with one modality withheld, ``p_nocxr`` / ``p_noehr``). Resamples
are those of the main table (:func:`ehrcxr.evaluate.bootstrap.resample_weights` with ``evaluate.seed``), so an
analysis's estimates and CIs agree with ``main_results`` where they overlap.
"""
from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from ehrcxr.evaluate.aggregate import (
    EVAL_SETS, Run, check_runs_current, load_run, served_missing, _as_run_dirs, _group_runs, _missing_order,
)
from ehrcxr.evaluate.bootstrap import pooled_resample_stats, resample_weights
from ehrcxr.evaluate.metrics import macro

log = logging.getLogger("ehrcxr.analysis")

SCORES = ("p", "p_nocxr", "p_noehr")  # as trained; X-ray withheld; EHR withheld
MACRO = "macro"  # the label column of a multi-label task's macro rows (a single-label task shows its label)


@dataclass
class Cell:
    """One (task, model, missing) of the grid with its runs (one per seed). ``run_missing`` is the setting the
    runs were trained at (an EHR-only model's first miss<r> serves every miss<r>)."""

    task: str
    model: str
    missing: str
    run_missing: str
    modalities: tuple[str, ...]
    runs: list[Run]

    @property
    def labels(self) -> list[str]:
        return self.runs[0].labels

    @property
    def is_fusion(self) -> bool:
        return set(self.modalities) >= {"ehr", "cxr"}

    def stays(self, eval_set: str) -> np.ndarray:
        """stay_id of ``eval_set`` (sorted; every seed shares them)."""
        return self.runs[0].eval_set(eval_set)["stay_id"].to_numpy(np.int64)

    def labels_of(self, eval_set: str) -> np.ndarray:
        """(N, L) int8 labels of ``eval_set``."""
        return self.runs[0].eval_set(eval_set)[[f"y_{label}" for label in self.labels]].to_numpy(np.int8)

    def has_cxr(self, eval_set: str) -> np.ndarray:
        """(N,) bool: the stay had its X-ray when scored as trained."""
        frame = self.runs[0].eval_set(eval_set)
        if "has_cxr" not in frame:
            raise ValueError(f"{self.runs[0].path}/predictions.parquet lacks column has_cxr")
        return frame["has_cxr"].to_numpy() > 0

    def scores(self, eval_set: str, score: str = "p") -> list[np.ndarray]:
        """Per seed, the (N, L) probabilities ``score`` (one of :data:`SCORES`) of ``eval_set``."""
        return [run.eval_set(eval_set)[[f"{score}_{label}" for label in self.labels]].to_numpy(np.float64)
                for run in self.runs]

    def val_score(self, metric: str = "auprc") -> float:
        """Mean over seeds of the macro ``metric`` on the cell's own val stays: how a reference model is chosen
        (never on test)."""
        values = []
        for run in self.runs:
            frame = run.eval_set("val")
            if frame.empty:
                raise ValueError(f"{run.path}/predictions.parquet has no val rows (written by an older ehrcxr); "
                                 "rerun the cell")
            y = frame[[f"y_{label}" for label in self.labels]].to_numpy(np.int8)
            p = frame[[f"p_{label}" for label in self.labels]].to_numpy(np.float64)
            values.append(macro(y, p, metric))
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


METRICS = ("auroc", "auprc")  # the ranking metrics every resample cache holds


class ResampleCache:
    """Seed-pooled per-resample metrics of cells, computed once per (cell, eval set, score) on the weights of
    their (task, eval set), which every model shares (so differences are paired)."""

    def __init__(self, n_boot: int, seed: int, threads: int = 1):
        self.n_boot, self.seed, self.threads = n_boot, seed, threads
        self._weights: dict[tuple[str, str], np.ndarray] = {}
        self._stats: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def weights(self, cell: Cell, eval_set: str) -> np.ndarray:
        key = (cell.task, eval_set)
        if key not in self._weights:
            self._weights[key] = resample_weights(cell.stays(eval_set).size, self.n_boot, self.seed)
        return self._weights[key]

    def stats(self, cell: Cell, eval_set: str, score: str = "p") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """metric -> (macro (W,), per label (W, L))."""
        key = (cell.task, cell.model, cell.run_missing, eval_set, score)
        if key not in self._stats:
            values = pooled_resample_stats(cell.labels_of(eval_set), cell.scores(eval_set, score), METRICS,
                                           self.weights(cell, eval_set), self.threads)
            self._stats[key] = dict(zip(METRICS, values))
        return self._stats[key]


def load_cells(run_dirs, modalities: dict[str, list[str]], ehr_only_models=(), grid_missing=(),
               scores: tuple[str, ...] = SCORES) -> dict[tuple[str, str, str], Cell]:
    """The grid's cells from run directories (or files inside them). ``modalities``: model -> the modalities it
    reads (config ``models``); ``ehr_only_models``/``grid_missing`` as in the main table (an EHR-only model's
    runs at one miss<r> also give its cells at every other miss<r>). Outdated runs are named in one error."""
    runs = [load_run(run_dir, prefixes=scores) for run_dir in _as_run_dirs(run_dirs)]
    if not runs:
        raise ValueError("no runs to analyse")
    check_runs_current(runs)
    groups = _group_runs(runs)
    unknown = sorted({key[1] for key in groups} - set(modalities))
    if unknown:
        raise ValueError(f"runs of models {unknown} have no entry in the config's models")
    cells = {key: Cell(*key, key[2], tuple(modalities[key[1]]), members) for key, members in groups.items()}
    for key, source in served_missing(groups, ehr_only_models, grid_missing).items():
        cells[key] = Cell(*key, source[2], tuple(modalities[key[1]]), groups[source])
    return dict(sorted(cells.items(), key=lambda item: (item[0][0], _missing_order(item[0][2]), item[0][1])))


def cells_of(cells: dict, task: str, missing: str) -> list[Cell]:
    """The cells of one task and missing setting, by model name."""
    return [cell for (t, _, m), cell in cells.items() if t == task and m == missing]


def task_settings(cells: dict) -> list[tuple[str, str]]:
    """Every (task, missing) of the cells, tasks sorted, settings in grid order (natural, miss<r> ascending)."""
    keys = {(task, missing) for task, _, missing in cells}
    return sorted(keys, key=lambda k: (k[0], _missing_order(k[1])))


def missing_rate(missing: str) -> float | None:
    """r of 'miss<r>'; None for 'natural'."""
    return None if missing == "natural" else float(missing[len("miss"):])


def best_by_validation(cells: list[Cell], metric: str = "auprc") -> Cell | None:
    """The cell with the highest validation macro ``metric`` (ties: first by model name); None if none."""
    scored = [(cell.val_score(metric), cell.model, cell) for cell in cells]
    scored = [item for item in scored if np.isfinite(item[0])]
    if not scored:
        return None
    return sorted(scored, key=lambda item: (-item[0], item[1]))[0][2]


def bootstrap_p_value(differences: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p-value of H0 'difference = 0' from resample rows 1.. of ``differences`` (W, ...):
    p = min(1, 2 min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1))) over the B finite resamples (the +1
    keeps p > 0 with finitely many resamples); NaN where none is finite."""
    d = np.asarray(differences, dtype=np.float64)[1:]
    finite = np.isfinite(d)
    n = finite.sum(axis=0)
    below = ((d <= 0) & finite).sum(axis=0)
    above = ((d >= 0) & finite).sum(axis=0)
    p = np.minimum(1.0, 2.0 * np.minimum(below + 1, above + 1) / (n + 1.0))
    return np.where(n > 0, p, np.nan)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values (``scipy.stats.false_discovery_control``) of the finite ``p_values``; NaN
    stays NaN."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = false_discovery_control(p[finite], method="bh")
    return q


def eval_sets_of(cell: Cell) -> list[str]:
    """The evaluation sets a cell has stays in."""
    return [eval_set for eval_set in EVAL_SETS if cell.stays(eval_set).size]


def read_stays(stays_path, columns, needed_for: str) -> pd.DataFrame:
    """The cohort's ``columns`` (stay_id among them), indexed by stay_id; a missing column or a repeated stay_id is
    named with the file and what needs it."""
    import pyarrow.parquet as pq

    available = set(pq.read_schema(stays_path).names)
    for column in columns:
        if column not in available:
            raise ValueError(f"{stays_path}: missing column {column!r} (needed for {needed_for})")
    stays = pd.read_parquet(stays_path, columns=list(columns))
    duplicated = stays["stay_id"].duplicated()
    if duplicated.any():
        raise ValueError(f"{stays_path}: stay_id {stays['stay_id'][duplicated].iloc[0]} appears twice")
    return stays.set_index("stay_id")


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """The rows a summary shows: the macro rows of multi-label tasks and every row of single-label tasks."""
    single = table.groupby("task")["label"].transform("nunique") == 1
    return table[(table["label"] == MACRO) | single]


_FORKED_CELLS: dict | None = None  # the cells map_slices's forked workers read (inherited, never pickled)


def _run_slice(job):
    from threadpoolctl import threadpool_limits

    function, key = job
    with threadpool_limits(1):  # one core per worker: BLAS (the weight-matrix products) must not spread wider
        return function(_FORKED_CELLS, key, 1)


def slice_table(slice_rows, cells: dict, threads: int = 1, **options) -> pd.DataFrame:
    """One long table of the row dicts ``slice_rows(cells, (task, missing), threads, **options)`` returns for every
    (task, missing) slice of ``cells``, the slices spread over ``threads`` cores (:func:`map_slices`)."""
    parts = map_slices(partial(slice_rows, **options), cells, task_settings(cells), threads)
    return pd.DataFrame([row for rows in parts for row in rows])


def map_slices(function, cells: dict, keys: list, threads: int = 1) -> list:
    """``function(cells, key, threads_per_slice)`` for every ``key`` (a slice of the work whose first item is its
    task, e.g. (task, missing)), ``threads`` cores in all, results in key order: one slice at a time with every
    thread, or up to ``threads`` slices at once in forked worker processes (which share the loaded ``cells``
    without copying) with one thread each. ``function`` must be module-level (or a ``functools.partial`` of one)
    and return picklable rows. Slices start widest task first (most labels: the longest), so the workers finish
    together."""
    processes = min(threads, len(keys))
    if processes <= 1:
        return [function(cells, key, threads) for key in keys]
    width = {task: len(cell.labels) for (task, _, _), cell in cells.items()}
    global _FORKED_CELLS
    _FORKED_CELLS = cells
    try:
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {index: pool.submit(_run_slice, (function, keys[index]))
                       for index in sorted(range(len(keys)), key=lambda index: -width.get(keys[index][0], 0))}
            return [futures[index].result() for index in range(len(keys))]
    finally:
        _FORKED_CELLS = None
