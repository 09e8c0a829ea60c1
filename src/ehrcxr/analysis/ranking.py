"""How the fusion strategies compare across the whole benchmark: average ranks over blocks, the Friedman test and
the Nemenyi critical difference (Demšar 2006, J. Mach. Learn. Res. 7:1–30).

A block is one (task, test set, label) of a missing setting; its value per model is the full-set metric of that
label, mean over seeds. Models are ranked within each block (1 = best, ties share their mean rank). A scope (all
tasks of a missing setting, or one task) keeps the models with runs in every task of it and the blocks where every
kept model's value is defined.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import friedmanchisquare, rankdata, studentized_range

from ehrcxr.analysis.core import EVAL_SETS, cells_of, load_cells, task_settings
from ehrcxr.analysis.publish import empty_figure, format_p, save_figure, write_table
from ehrcxr.evaluate.bootstrap import pooled_resample_stats

ALL_TASKS = "all tasks"
COLUMNS = ["missing", "scope", "model", "average_rank", "n_blocks", "k_models", "friedman_chi2", "friedman_p", "cd"]
BLOCK_KEYS = ["task", "eval_set", "label"]


def block_values(cells: dict, task: str, missing: str, metric: str = "auroc") -> pd.DataFrame:
    """Rows (task, eval_set, label) of one task and missing setting, columns model (every model with runs there):
    the full-set ``metric`` of each label, mean over seeds (NaN where a label lacks a class)."""
    records, models = [], []
    for cell in cells_of(cells, task, missing):
        models.append(cell.model)
        for eval_set in EVAL_SETS:
            n_stays = cell.stays(eval_set).size
            if n_stays == 0:
                continue
            [(_, per_label)] = pooled_resample_stats(cell.labels_of(eval_set), cell.scores(eval_set), [metric],
                                                     np.ones((1, n_stays)))
            records += [dict(task=task, eval_set=eval_set, label=label, model=cell.model, value=value)
                        for label, value in zip(cell.labels, per_label[0])]
    long = pd.DataFrame(records, columns=[*BLOCK_KEYS, "model", "value"])
    return long.pivot(index=BLOCK_KEYS, columns="model", values="value").reindex(columns=models)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Mean rank of each model (column) over the blocks (rows) of ``values``, higher value = better = rank 1;
    ties share their mean rank."""
    return rankdata(-np.asarray(values, dtype=np.float64), axis=1).mean(axis=0)


def friedman_test(values: np.ndarray) -> tuple[float, float]:
    """Friedman chi-square statistic and p-value of equal ranks over the blocks (rows) of ``values``; NaN with
    fewer than 3 models or 2 blocks, or when every block is one tie."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[1] < 3 or values.shape[0] < 2:
        return float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        result = friedmanchisquare(*values.T)
    return float(result.statistic), float(result.pvalue)


def nemenyi_cd(k: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks of ``k`` models over ``n_blocks`` blocks:
    q_alpha sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile over sqrt(2); NaN for k < 2."""
    if k < 2 or n_blocks < 1:
        return float("nan")
    q_alpha = studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q_alpha * np.sqrt(k * (k + 1) / (6 * n_blocks)))


def cd_cliques(sorted_ranks: np.ndarray, cd: float) -> list[tuple[int, int]]:
    """Maximal runs (first, last index) of ascending ``sorted_ranks`` whose span is below ``cd``: the groups a
    critical-difference diagram joins with a bar (runs of one model are left out)."""
    cliques: list[tuple[int, int]] = []
    for first, rank in enumerate(sorted_ranks):
        last = int(np.flatnonzero(sorted_ranks - rank < cd).max())
        if last > first and (not cliques or last > cliques[-1][1]):
            cliques.append((first, last))
    return cliques


def _scope_rows(values: pd.DataFrame, models: list[str], missing: str, scope: str, alpha: float,
                notes: list[str]) -> list[dict]:
    """The ranking rows of one scope from its block values, ranking ``models`` (those with runs in every task of
    the scope)."""
    kept_models = [model for model in values.columns if model in models]
    dropped = sorted(set(values.columns) - set(kept_models))
    if dropped:
        notes.append(f"{missing}, {scope}: left out {', '.join(dropped)} (no runs in every task).")
    values = values[kept_models]
    finite = np.isfinite(values.to_numpy()).all(axis=1)
    if (~finite).any():
        notes.append(f"{missing}, {scope}: left out {int((~finite).sum())} blocks where a model's value is "
                     "undefined (a label lacking a class).")
    values = values[finite]
    if values.empty or not kept_models:
        notes.append(f"{missing}, {scope}: no blocks left to rank.")
        return []
    n_blocks, k = values.shape
    if k < 3:
        notes.append(f"{missing}, {scope}: Friedman test not computed, it needs at least 3 models ({k} here).")
    chi2, p = friedman_test(values.to_numpy())
    cd = nemenyi_cd(k, n_blocks, alpha)
    ranked = sorted(zip(average_ranks(values.to_numpy()), kept_models))
    return [dict(missing=missing, scope=scope, model=model, average_rank=float(rank), n_blocks=n_blocks, k_models=k,
                 friedman_chi2=chi2, friedman_p=p, cd=cd) for rank, model in ranked]


def rank_models(cells: dict, metric: str = "auroc", alpha: float = 0.05) -> tuple[pd.DataFrame, list[str]]:
    """The ranking table (:data:`COLUMNS`; every missing setting over all tasks, then per task, models by average
    rank) and notes on what was left out."""
    settings = task_settings(cells)
    rows, notes = [], []
    for missing in dict.fromkeys(missing for _, missing in settings):
        per_task = {task: block_values(cells, task, missing, metric) for task, m in settings if m == missing}
        in_every_task = [model for model in dict.fromkeys(m for v in per_task.values() for m in v.columns)
                         if all(model in values.columns for values in per_task.values())]
        rows += _scope_rows(pd.concat(per_task.values()), in_every_task, missing, ALL_TASKS, alpha, notes)
        for task, values in per_task.items():
            rows += _scope_rows(values, list(values.columns), missing, task, alpha, notes)
    return pd.DataFrame(rows, columns=COLUMNS), notes


def cd_figure(names: list[str], ranks: np.ndarray, cd: float, title: str):
    """Critical-difference diagram: a rank axis (1 = best, left), each model's name joined to its average rank
    (better half left, worse half right), bars joining models whose ranks differ by less than ``cd``, and the
    CD itself drawn above the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(ranks, kind="stable")
    names, ranks = [names[i] for i in order], np.asarray(ranks, dtype=np.float64)[order]
    k = len(names)
    cliques = cd_cliques(ranks, cd) if np.isfinite(cd) else []
    bar_step, name_step = 0.12, 0.3
    first_name = -0.25 - bar_step * len(cliques)
    n_left = (k + 1) // 2
    figure, axis = plt.subplots(figsize=(7, 1.6 + name_step * 1.6 * n_left + bar_step * len(cliques)))
    axis.plot([1, k], [0, 0], color="black", lw=1)
    for tick in range(1, k + 1):
        axis.plot([tick, tick], [0, 0.07], color="black", lw=1)
        axis.text(tick, 0.12, str(tick), ha="center", va="bottom", fontsize=9)
    for i, (name, rank) in enumerate(zip(names, ranks)):
        left = i < n_left
        level = first_name - name_step * (i if left else k - 1 - i)
        end = 0.6 if left else k + 0.4
        axis.plot([rank, rank, end], [0, level, level], color="0.3", lw=0.8)
        axis.text(end + (-0.05 if left else 0.05), level, f"{name} ({rank:.2f})", ha="right" if left else "left",
                  va="center", fontsize=9)
    for c, (first, last) in enumerate(cliques):
        level = -0.12 - bar_step * c
        axis.plot([ranks[first] - 0.03, ranks[last] + 0.03], [level, level], color="black", lw=3,
                  solid_capstyle="round")
    if np.isfinite(cd):
        axis.plot([1, 1 + cd], [0.45, 0.45], color="black", lw=1.5)
        for x in (1, 1 + cd):
            axis.plot([x, x], [0.4, 0.5], color="black", lw=1)
        axis.text(1 + cd / 2, 0.52, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    axis.set_xlim(0.5, k + 0.5)
    axis.set_ylim(first_name - name_step * n_left, 0.8)
    axis.axis("off")
    axis.set_title(title, fontsize=10)
    return figure


def _figure(table: pd.DataFrame, metric: str, alpha: float):
    """The critical-difference diagram of the natural setting over all tasks (or why there is none)."""
    rows = table[(table["missing"] == "natural") & (table["scope"] == ALL_TASKS)]
    if len(rows) < 2:
        return empty_figure("No critical-difference diagram: fewer than 2 models ranked over all tasks in the "
                            "natural setting.")
    first = rows.iloc[0]
    p_text = format_p(first.friedman_p)
    friedman = f"Friedman p {p_text}" if p_text.startswith("<") else f"Friedman p = {p_text or 'n/a'}"
    title = (f"{metric.upper()} average ranks, natural setting, all tasks\n"
             f"k = {first.k_models} models, N = {first.n_blocks} blocks, {friedman}, Nemenyi α = {alpha}")
    return cd_figure(rows["model"].tolist(), rows["average_rank"].to_numpy(), float(first.cd), title)


def _display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "missing": table["missing"], "scope": table["scope"], "model": table["model"],
        "average rank": table["average_rank"].map("{:.2f}".format), "blocks": table["n_blocks"],
        "models": table["k_models"],
        "Friedman χ²": table["friedman_chi2"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else ""),
        "Friedman p": table["friedman_p"].map(format_p),
        "CD": table["cd"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else ""),
    })


def run_ranking(run_dirs, modalities: dict[str, list[str]], tables_dir, figures_dir, *, ehr_only_models=(),
                grid_missing=(), metric: str = "auroc", alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """Rank the grid's models per missing setting (over all tasks and per task) and write table ``ranking`` and
    figure ``ranking_cd`` (the natural setting over all tasks). Returns {'ranking': the long table}."""
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing, scores=("p",))
    table, left_out = rank_models(cells, metric, alpha)
    notes = [
        f"Blocks: every (task, test set, label) of a missing setting; a model's value in a block is its full-set "
        f"{metric.upper()} of that label, mean over seeds. Models are ranked within each block (1 = best, ties "
        "share their mean rank) and their ranks averaged; a scope keeps the models with runs in every task of it "
        "and the blocks where every model's value is defined.",
        f"Friedman test of equal average ranks (k ≥ 3 models); Nemenyi critical difference "
        f"CD = q_α √(k(k+1)/(6N)) at α = {alpha}, q_α the studentized range quantile / √2: two models whose "
        "average ranks differ by more than CD differ significantly (Demšar 2006).",
        "Caveat: a task's test sets and labels share stays, so blocks are not independent; and with few blocks "
        "(one task, few labels) the test has little power — a non-significant result is no evidence that models "
        "perform alike.",
        *left_out,
    ]
    write_table(table, Path(tables_dir) / "ranking", title=f"Average ranks of the models ({metric.upper()})",
                display=_display(table), notes=notes)
    save_figure(_figure(table, metric, alpha), Path(figures_dir) / "ranking_cd")
    return {"ranking": table}
