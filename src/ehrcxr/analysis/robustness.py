"""Robustness to a missing X-ray, two ways, with missing-aware and missing-unaware models side by side.

* Train/validation missingness: the ``miss<r>`` cells (X-ray withheld from a share r of train+val stays), scored
  on the paired and partial test sets: metric against r with CIs, the area under that curve (normalised by the
  rate range, so it is the mean metric over r) and the drop from the lowest to the highest r, on shared resamples.
* Test-time missingness: every trained cell scored on its paired test set with the X-ray withheld from a seeded
  share r of the stays, no retraining. The stays withheld at rate r are the first round(r N) of one permutation
  per task (``np.random.default_rng(seed)``), so the sets are nested across rates and shared by every model; a
  withheld stay's score is the cell's ``p_nocxr`` (its prediction with the X-ray withheld), the others' ``p``.

Both summaries also compare each model's drop with the fusion baseline's (``analysis.fusion_baseline``, late
fusion): ``drop_vs_baseline`` = drop − the baseline's drop over the same rates, on the same resamples (negative: the
model loses less of its metric than the baseline as the X-ray share falls).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from ehrcxr.analysis.core import (
    MACRO, METRICS, ResampleCache, bootstrap_p_value, cells_of, headline, load_cells, map_slices, missing_rate,
    task_settings,
)
from ehrcxr.analysis.publish import empty_figure, format_ci, save_figure, write_table
from ehrcxr.evaluate.bootstrap import pooled_resample_stats, summarise_resamples
from ehrcxr.evaluate.aggregate import EVAL_SETS

TEST_EVAL_SET = "paired_test"


def _series_rows(base: dict, values: dict[str, tuple[np.ndarray, np.ndarray]], labels: list[str], ci: float
                 ) -> list[dict]:
    """Rows (macro + per label) of estimate and CI for one point of a curve."""
    rows = []
    for metric in METRICS:
        macro_values, label_values = values[metric]
        named = [(MACRO if len(labels) > 1 else labels[0], macro_values)]
        if len(labels) > 1:
            named += [(label, label_values[:, j]) for j, label in enumerate(labels)]
        for label, series in named:
            estimate = summarise_resamples(series, ci)
            rows.append({**base, "metric": metric, "label": label, "estimate": estimate[0], "ci_low": estimate[1],
                         "ci_high": estimate[2]})
    return rows


BASELINE_COLUMNS = ("drop_vs_baseline", "drop_vs_baseline_low", "drop_vs_baseline_high", "drop_vs_baseline_p")


def _summary_row(base: dict, rates: list[float], curve: np.ndarray, ci: float) -> tuple[dict, np.ndarray]:
    """Area under a (W, R) metric curve over the rates (trapezoid / rate range) and the drop first − last rate: the
    summary row and the drop on each resample (W,)."""
    span = rates[-1] - rates[0]
    area = np.trapezoid(curve, rates, axis=1) / span if span > 0 else curve[:, 0]
    drop = curve[:, 0] - curve[:, -1]
    area_ci, drop_ci = summarise_resamples(area, ci), summarise_resamples(drop, ci)
    return {**base, "rates": ";".join(f"{r:g}" for r in rates), "auc": area_ci[0], "auc_low": area_ci[1],
            "auc_high": area_ci[2], "drop": drop_ci[0], "drop_low": drop_ci[1], "drop_high": drop_ci[2],
            "drop_p": float(bootstrap_p_value(drop))}, drop


def _against_baseline(summaries: list[tuple[dict, np.ndarray]], baseline: str | None, ci: float) -> list[dict]:
    """Summary rows of one slice with ``drop_vs_baseline`` (+ CI, p): a model's drop minus the ``baseline`` model's
    on the same resamples, for rows of the same eval set and metric over the same rates; NaN where there is none
    (and for the baseline itself)."""
    drops = {(row["model"], row["eval_set"], row["metric"], row["rates"]): drop for row, drop in summaries}
    rows = []
    for row, drop in summaries:
        reference = drops.get((baseline, row["eval_set"], row["metric"], row["rates"]))
        values = (np.nan,) * 4
        if reference is not None and row["model"] != baseline:
            difference = drop - reference
            values = (*summarise_resamples(difference, ci), float(bootstrap_p_value(difference)))
        rows.append({**row, **dict(zip(BASELINE_COLUMNS, values))})
    return rows


def missingness_in_training(cells: dict, aware: dict[str, bool], *, baseline: str | None = None, n_boot=1000, ci=0.95,
                            seed=0, threads=1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curve, summary) over the grid's miss<r> cells. curve: task, model, missing_aware, eval_set, rate, metric,
    label, estimate, ci_low, ci_high. summary (macro metric): task, model, missing_aware, eval_set, metric, rates,
    auc (+CI), drop (+CI, p), drop_vs_baseline (+CI, p; against the ``baseline`` model). ``threads``: cores, spread
    over the tasks."""
    tasks = [(task, "miss") for task in sorted({task for task, _ in task_settings(cells)})]
    options = dict(aware=aware, baseline=baseline, n_boot=n_boot, ci=ci, seed=seed)
    return _frames(map_slices(partial(_training_rows, **options), cells, tasks, threads))


def _frames(parts: list[tuple[list, list]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.DataFrame([row for curve, _ in parts for row in curve]),
            pd.DataFrame([row for _, summary in parts for row in summary]))


def _training_rows(cells: dict, key: tuple[str, str], threads: int, *, aware, baseline, n_boot, ci, seed
                   ) -> tuple[list, list]:
    """Curve and summary rows of one task's miss<r> cells (``key`` = (task, 'miss'))."""
    task = key[0]
    cache, curve_rows, summaries = ResampleCache(n_boot, seed, threads), [], []
    settings = [m for t, m in task_settings(cells) if t == task and missing_rate(m) is not None]
    models = sorted({cell.model for m in settings for cell in cells_of(cells, task, m)})
    for model in models:
        series = [(missing_rate(m), cells[task, model, m]) for m in settings if (task, model, m) in cells]
        if not series:
            continue
        for eval_set in EVAL_SETS:
            if series[0][1].stays(eval_set).size == 0:
                continue
            base = dict(task=task, model=model, missing_aware=aware.get(model, False), eval_set=eval_set)
            stats = [cache.stats(cell, eval_set) for _, cell in series]
            for (rate, cell), values in zip(series, stats):
                curve_rows += _series_rows({**base, "rate": rate}, values, cell.labels, ci)
            if len(series) > 1:
                for metric in METRICS:
                    curve = np.stack([values[metric][0] for values in stats], axis=1)
                    summaries.append(_summary_row({**base, "metric": metric}, [r for r, _ in series], curve, ci))
    return curve_rows, _against_baseline(summaries, baseline, ci)


def withheld_stays(n: int, rate: float, seed: int) -> np.ndarray:
    """(n,) bool: the stays whose X-ray is withheld at test-time rate ``rate`` — the first round(rate n) of one
    permutation (``np.random.default_rng(seed)``), so higher rates withhold a superset."""
    order = np.random.default_rng(seed).permutation(n)
    withheld = np.zeros(n, dtype=bool)
    withheld[order[:int(round(rate * n))]] = True
    return withheld


def missingness_at_test_time(cells: dict, aware: dict[str, bool], rates, *, baseline: str | None = None, n_boot=1000,
                             ci=0.95, seed=0, threads=1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curve, summary) of test-time missingness for every cell that reads an X-ray: task, missing (the setting it
    was trained at), model, missing_aware, rate, metric, label, estimate, CI; summary as in
    :func:`missingness_in_training`. ``threads``: cores, spread over the (task, missing) slices."""
    options = dict(aware=aware, baseline=baseline, rates=sorted(float(r) for r in rates), n_boot=n_boot, ci=ci,
                   seed=seed)
    return _frames(map_slices(partial(_test_time_rows, **options), cells, task_settings(cells), threads))


def _test_time_rows(cells: dict, key: tuple[str, str], threads: int, *, aware, baseline, rates, n_boot, ci, seed
                    ) -> tuple[list, list]:
    """Curve and summary rows of one (task, missing) slice. At r = 0 and r = 1 the mixed scores are the scores as
    trained and with the X-ray withheld, whose resample metrics the cache computes once."""
    cache, curve_rows, summaries = ResampleCache(n_boot, seed, threads), [], []
    for cell in cells_of(cells, *key):
        if "cxr" not in cell.modalities or cell.stays(TEST_EVAL_SET).size == 0 or cell.run_missing != cell.missing:
            continue
        n = cell.stays(TEST_EVAL_SET).size
        weights = cache.weights(cell, TEST_EVAL_SET)
        present, absent = cell.scores(TEST_EVAL_SET, "p"), cell.scores(TEST_EVAL_SET, "p_nocxr")
        base = dict(task=cell.task, missing=cell.missing, model=cell.model, missing_aware=aware.get(cell.model, False),
                    eval_set=TEST_EVAL_SET)
        stats = []
        for rate in rates:
            withheld = withheld_stays(n, rate, seed)
            if not withheld.any() or withheld.all():
                values = cache.stats(cell, TEST_EVAL_SET, "p_nocxr" if withheld.any() else "p")
            else:
                mixed = [np.where(withheld[:, None], p_absent, p_present) for p_present, p_absent in zip(present, absent)]
                values = dict(zip(METRICS, pooled_resample_stats(cell.labels_of(TEST_EVAL_SET), mixed, METRICS,
                                                                 weights, threads)))
            stats.append(values)
            curve_rows += _series_rows({**base, "rate": rate}, values, cell.labels, ci)
        if len(rates) > 1:
            for metric in METRICS:
                curve = np.stack([values[metric][0] for values in stats], axis=1)
                summaries.append(_summary_row({**base, "metric": metric}, rates, curve, ci))
    return curve_rows, _against_baseline(summaries, baseline, ci)


def curves_figure(curve: pd.DataFrame, title: str, metric: str = "auroc", panel_by: str = "eval_set"):
    """Macro ``metric`` against the missing rate with CI bands, one line per model (dashed: missing-unaware),
    one panel per task and ``panel_by`` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = headline(curve[curve["metric"] == metric]) if not curve.empty else curve
    panels = list(shown.groupby(["task", panel_by], sort=True)) if not shown.empty else []
    if not panels:
        return empty_figure(f"{title}: no cells with a missing rate to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, ((task, panel), part) in zip(axes[0], panels):
        for model, line in part.groupby("model", sort=True):
            line = line.sort_values("rate")
            style = "-" if line["missing_aware"].iloc[0] else "--"
            drawn = axis.plot(line["rate"], line["estimate"], style, marker="o", ms=3, label=model)[0]
            axis.fill_between(line["rate"], line["ci_low"], line["ci_high"], color=drawn.get_color(), alpha=0.15)
        axis.set_xlabel("X-ray missing rate r")
        axis.set_ylabel(f"macro {metric.upper()}")
        axis.set_title(f"{task} — {panel}", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best", title="solid: missing-aware", title_fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    shown = summary[summary["metric"] == "auroc"]
    keys = [k for k in ("task", "missing", "model", "missing_aware", "eval_set", "rates") if k in shown]
    return shown[keys].assign(
        **{"AUROC area (mean over r)": [format_ci(r.auc, r.auc_low, r.auc_high) for r in shown.itertuples()],
           "drop (lowest − highest r)": [format_ci(r.drop, r.drop_low, r.drop_high) for r in shown.itertuples()],
           "drop − baseline's drop": ["" if np.isnan(r.drop_vs_baseline) else
                                      format_ci(r.drop_vs_baseline, r.drop_vs_baseline_low, r.drop_vs_baseline_high)
                                      for r in shown.itertuples()]})


def run_robustness(run_dirs, modalities: dict[str, list[str]], missing_aware: dict[str, bool], tables_dir,
                   figures_dir, *, test_rates=(0.0, 0.25, 0.5, 0.75, 1.0), ehr_only_models=(), grid_missing=(),
                   baseline: str | None = None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                   threads: int = 1) -> dict[str, pd.DataFrame]:
    """Workflow entry point: tables ``robustness_train`` (+ ``_summary``), ``robustness_test`` (+ ``_summary``) and
    figures ``robustness_train``, ``robustness_test`` under ``tables_dir`` / ``figures_dir``; drops are also compared
    with the ``baseline`` model's (``analysis.fusion_baseline``)."""
    from pathlib import Path

    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing)
    options = dict(baseline=baseline, n_boot=n_boot, ci=ci, seed=seed, threads=threads)
    train_curve, train_summary = missingness_in_training(cells, missing_aware, **options)
    test_curve, test_summary = missingness_at_test_time(cells, missing_aware, test_rates, **options)
    common = (f"{n_boot} shared stay resamples, seeds pooled, {ci:.0%} percentile CIs. Area: the area under the "
              "macro curve divided by the rate range (the mean metric over r); drop: metric at the lowest rate − at "
              "the highest, paired. missing_aware: the model's config declares it handles a missing X-ray. Drop − "
              f"baseline's drop: against {baseline or 'no baseline'} (config analysis.fusion_baseline) over the same "
              "rates, on the same resamples; negative = the model loses less as the X-ray share falls.")
    write_table(train_curve, tables_dir / "robustness_train", title="Train/validation missingness (miss<r> cells)",
                display=_summary_display(train_summary),
                notes=["X-ray withheld from a share r of train and validation stays; test stays untouched. " + common,
                       "The CSV holds every rate, label and both test sets; "
                       "`robustness_train_summary.csv` the areas and drops."])
    write_table(train_summary, tables_dir / "robustness_train_summary", title="Train/validation missingness: summary",
                display=_summary_display(train_summary), notes=[common])
    write_table(test_curve, tables_dir / "robustness_test", title="Test-time missingness (no retraining)",
                display=_summary_display(test_summary),
                notes=["Each trained cell on its paired test set with the X-ray withheld from a seeded share r of the "
                       "stays (nested across r, shared by every model). " + common])
    write_table(test_summary, tables_dir / "robustness_test_summary", title="Test-time missingness: summary",
                display=_summary_display(test_summary), notes=[common])
    save_figure(curves_figure(train_curve, "X-ray withheld in training (miss<r>)"), figures_dir / "robustness_train")
    natural = test_curve[test_curve["missing"] == "natural"] if not test_curve.empty else test_curve
    save_figure(curves_figure(natural, "X-ray withheld at test time (cells trained at natural)"),
                figures_dir / "robustness_test")
    return {"robustness_train": train_curve, "robustness_train_summary": train_summary,
            "robustness_test": test_curve, "robustness_test_summary": test_summary}
