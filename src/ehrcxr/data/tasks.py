"""Prediction tasks: which cohort stays and which label columns each task uses."""
from __future__ import annotations

import pandas as pd

from ehrcxr.resources import phenotype_labels

TASKS = ("phenotyping", "mortality")


def task_labels(task: str) -> list[str]:
    """Label columns of ``task`` in stays.parquet (and y_/p_ suffixes in predictions)."""
    if task == "phenotyping":
        return phenotype_labels()
    if task == "mortality":
        return ["mortality"]
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def task_stays(stays: pd.DataFrame, task: str) -> pd.DataFrame:
    """Cohort stays that belong to ``task`` (mortality: stays of at least the minimum length), by stay_id."""
    task_labels(task)
    selected = stays[stays["in_mortality_task"]] if task == "mortality" else stays
    return selected.sort_values("stay_id").reset_index(drop=True)
