"""Prediction tasks: which cohort stays and which label columns each task uses.

* ``phenotyping``: every cohort stay, 25 binary labels (multi-label).
* ``mortality``: stays of at least ``cohort.mortality_min_hours`` (48 h), in-hospital death.
* ``length_of_stay``: the same stays, CareBench's 7 ICU length-of-stay classes [2, 3), [3, 4), [4, 5), [5, 6),
  [6, 7), [7, 14) and >= 14 days (single-label multiclass, one-hot columns ``los_*``), predicted from the first 48 h.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ehrcxr.resources import phenotype_labels

TASKS = ("phenotyping", "mortality", "length_of_stay")
MULTICLASS_TASKS = ("length_of_stay",)
LOS_EDGES_DAYS = (2, 3, 4, 5, 6, 7, 14)  # class k: [edge k, edge k + 1) days; the last: >= 14 days
LOS_LABELS = ["los_2_3d", "los_3_4d", "los_4_5d", "los_5_6d", "los_6_7d", "los_7_14d", "los_14d_plus"]


def task_labels(task: str) -> list[str]:
    """Label columns of ``task`` in stays.parquet (and y_/p_ suffixes in predictions)."""
    if task == "phenotyping":
        return phenotype_labels()
    if task == "mortality":
        return ["mortality"]
    if task == "length_of_stay":
        return list(LOS_LABELS)
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def is_multiclass(task: str) -> bool:
    """True for a single-label multiclass task (softmax head, cross-entropy, argmax metrics)."""
    task_labels(task)
    return task in MULTICLASS_TASKS


def tensor_task(task: str) -> str:
    """The task whose EHR tensor ``task`` reads: length of stay shares mortality's stays and 48-h window."""
    task_labels(task)
    return "mortality" if task == "length_of_stay" else task


def length_of_stay_classes(los_hours: pd.Series) -> pd.DataFrame:
    """One-hot ``los_*`` columns of ICU stays of ``los_hours``; all 0 for stays shorter than the first class
    (2 days: outside the task)."""
    days = los_hours.to_numpy(dtype=np.float64) / 24.0
    index = np.searchsorted(np.asarray(LOS_EDGES_DAYS, dtype=np.float64), days, side="right") - 1
    onehot = np.zeros((len(days), len(LOS_LABELS)), dtype=np.int8)
    inside = index >= 0
    onehot[np.flatnonzero(inside), index[inside]] = 1
    return pd.DataFrame(onehot, columns=LOS_LABELS, index=los_hours.index)


def task_stays(stays: pd.DataFrame, task: str) -> pd.DataFrame:
    """Cohort stays that belong to ``task`` (mortality: stays of at least the minimum length; length of stay: those
    of at least 2 days too), by stay_id."""
    task_labels(task)
    if task == "mortality":
        selected = stays[stays["in_mortality_task"]]
    elif task == "length_of_stay":  # also when cohort.mortality_min_hours is under the first class's 2 days
        selected = stays[stays["in_mortality_task"] & (stays["los_hours"] >= 24 * LOS_EDGES_DAYS[0])]
    else:
        selected = stays
    return selected.sort_values("stay_id").reset_index(drop=True)
