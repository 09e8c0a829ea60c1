"""Calibration of the grid's models, and how their discrimination depends on the age of the paired X-ray.

Calibration: expected calibration error (ECE, equal-width bins on [0, 1]) and Brier score per label and their mean
over labels ('macro'), with percentile bootstrap CIs on the stay resamples every model of a task and test set
shares (those of the main table). A weighted resample's ECE and Brier score come from matrix products of the weight
rows with per-bin indicator matrices, all resamples at once; seeds are pooled by averaging each resample's value.

X-ray age: hours from the paired X-ray to the prediction time, min(los_hours, prediction_hour) − cxr_hours clipped
at 0; the paired test stays are stratified by it and each model's macro AUROC and AUPRC computed per stratum on the
shared resamples restricted to the stratum's stays.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.analysis.core import (EVAL_SETS, Cell, bootstrap_p_value, cells_of, load_cells, read_stays,
                                  task_settings)
from ehrcxr.analysis.publish import empty_figure, format_ci, format_p, save_figure, write_table
from ehrcxr.evaluate.bootstrap import pooled_resample_stats, resample_weights, summarise_resamples

MACRO = "macro"
CALIBRATION_COLUMNS = ["task", "missing", "eval_set", "model", "label", "metric", "estimate", "ci_low", "ci_high",
                       "n_stays"]
XRAY_AGE_COLUMNS = ["task", "missing", "model", "stratum", "age_low", "age_high", "metric", "estimate", "ci_low",
                    "ci_high", "n_stays", "suppressed"]
XRAY_AGE_GAIN_COLUMNS = ["task", "missing", "model", "reference", "stratum", "age_low", "age_high", "metric", "gain",
                         "ci_low", "ci_high", "p_value", "n_stays"]
MIN_STRATUM_STAYS = 10  # strata with fewer paired test stays are suppressed
STAY_COLUMNS = ("stay_id", "los_hours", "cxr_hours")
RELIABILITY_SET = "paired_test"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin (0 .. bins − 1) of each probability in equal-width bins on [0, 1], left-closed, the last bin closed."""
    p = np.asarray(p, dtype=np.float64)
    if ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ValueError(f"probabilities must lie in [0, 1], got {p[(p < 0) | (p > 1) | ~np.isfinite(p)][0]!r}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.minimum(np.searchsorted(edges, p, side="right") - 1, bins - 1)


def weighted_calibration(y: np.ndarray, p: np.ndarray, weights: np.ndarray, bins: int = 10
                         ) -> tuple[np.ndarray, np.ndarray]:
    """ECE and Brier score, each (W, L), of labels ``y`` and probabilities ``p`` (N, L) under every stay-weight row
    of ``weights`` (W, N). ECE = Σ_b (n_b / N) |mean y − mean p in bin b| = Σ_b |Σ_{i in b} w_i (y_i − p_i)| / Σ w;
    row ``r`` equals the unweighted value on the stays repeated ``weights[r]`` times."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    n_stays, n_labels = y.shape
    total = weights.sum(axis=1)[:, None]
    gap_in_bin = np.zeros((n_stays, n_labels, bins))  # (y − p) placed in each stay's bin: indicator × gap
    np.put_along_axis(gap_in_bin, bin_index(p, bins)[..., None], (y - p)[..., None], axis=2)
    binned = (weights @ gap_in_bin.reshape(n_stays, -1)).reshape(-1, n_labels, bins)
    ece = np.abs(binned).sum(axis=2) / total
    brier = weights @ (p - y) ** 2 / total
    return ece, brier


def _calibration_rows(cell: Cell, eval_set: str, weights: np.ndarray, bins: int, ci: float) -> list[dict]:
    """Rows of one cell and test set: ECE and Brier score, macro and (several labels) per label."""
    y = cell.labels_of(eval_set)
    per_seed = [weighted_calibration(y, p, weights, bins) for p in cell.scores(eval_set)]
    rows = []
    for k, metric in enumerate(("ece", "brier")):
        values = np.mean([seed_values[k] for seed_values in per_seed], axis=0)  # (W, L), seeds pooled
        named = {MACRO: values.mean(axis=1)}
        if len(cell.labels) > 1:
            named.update({label: values[:, j] for j, label in enumerate(cell.labels)})
        summary = summarise_resamples(np.column_stack(list(named.values())), ci)
        rows += [dict(task=cell.task, missing=cell.missing, eval_set=eval_set, model=cell.model, label=label,
                      metric=metric, estimate=estimate, ci_low=low, ci_high=high, n_stays=len(y))
                 for label, (estimate, low, high) in zip(named, summary)]
    return rows


def reliability_curve(y: np.ndarray, p_by_seed: list[np.ndarray], bins: int = 10
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin, the mean predicted probability, the observed frequency (NaN in empty bins) and the count, pooled
    over labels and seeds."""
    p = np.stack(p_by_seed).ravel()
    observed = np.broadcast_to(np.asarray(y, dtype=np.float64), (len(p_by_seed), *np.shape(y))).ravel()
    index = bin_index(p, bins)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return (np.bincount(index, p, bins) / count, np.bincount(index, observed, bins) / count, count)


def _parallel(function, jobs, threads: int) -> list:
    """``function(*job)`` for every job, ``threads`` at once (numpy releases the GIL), results in job order."""
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda job: function(*job), jobs))
    return [function(*job) for job in jobs]


def _shared_weights(cells: dict, n_boot: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
    """One resample weight matrix per (task, test set) with stays, shared by every model and missing setting."""
    weights = {}
    for (task, _, _), cell in cells.items():
        for eval_set in EVAL_SETS:
            n_stays = cell.stays(eval_set).size
            if n_stays and (task, eval_set) not in weights:
                weights[task, eval_set] = resample_weights(n_stays, n_boot, seed)
    return weights


def calibration_table(cells: dict, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, bins: int = 10,
                      threads: int = 1) -> pd.DataFrame:
    """The long calibration table (:data:`CALIBRATION_COLUMNS`) of every cell and test set."""
    weights = _shared_weights(cells, n_boot, seed)
    jobs = [(cell, eval_set, weights[cell.task, eval_set], bins, ci)
            for cell in cells.values() for eval_set in EVAL_SETS if (cell.task, eval_set) in weights]
    rows = [row for cell_rows in _parallel(_calibration_rows, jobs, threads) for row in cell_rows]
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def reliability_figure(cells: dict, bins: int = 10):
    """Reliability diagrams of the natural setting on the paired test set: one panel per task, one curve per model
    (pooled over labels and seeds), with the diagonal of perfect calibration."""
    plt = _pyplot()
    tasks = [task for task, missing in task_settings(cells) if missing == "natural"
             and cells_of(cells, task, missing)[0].stays(RELIABILITY_SET).size]
    if not tasks:
        return empty_figure("No reliability diagram: no natural-setting runs with paired test stays.")
    figure, axes = plt.subplots(len(tasks), 1, figsize=(4.8, 4.4 * len(tasks)), squeeze=False)
    for axis, task in zip(axes[:, 0], tasks):
        axis.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
        for cell in cells_of(cells, task, "natural"):
            predicted, observed, count = reliability_curve(cell.labels_of(RELIABILITY_SET),
                                                           cell.scores(RELIABILITY_SET), bins)
            filled = count > 0
            axis.plot(predicted[filled], observed[filled], marker="o", ms=3, lw=1.2, label=cell.model)
        axis.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="mean predicted probability",
                 ylabel="observed frequency", title=f"{task}: {RELIABILITY_SET}, natural")
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure


def _side_by_side(table: pd.DataFrame, keys: list[str], metrics: dict[str, str], text) -> pd.DataFrame:
    """One row per ``keys`` (in table order) with a column per metric (``metrics``: name -> header) holding
    ``text(row)``, and the stays."""
    display = table[keys + ["n_stays"]].drop_duplicates(keys)
    for metric, header in metrics.items():
        rows = table[table["metric"] == metric]
        display = display.merge(rows[keys].assign(**{header: [text(r) for r in rows.itertuples()]}), on=keys,
                                how="left")
    return display[[*keys, *metrics.values(), "n_stays"]].rename(columns={"n_stays": "stays"})


def _calibration_display(table: pd.DataFrame) -> pd.DataFrame:
    """Macro rows, ECE and Brier score side by side as 'estimate [low, high]'."""
    return _side_by_side(table[table["label"] == MACRO], ["task", "missing", "eval_set", "model"],
                         {"ece": "ECE", "brier": "Brier"}, lambda r: format_ci(r.estimate, r.ci_low, r.ci_high))


def run_calibration(run_dirs, modalities, tables_dir, figures_dir, *, ehr_only_models=(), grid_missing=(),
                    n_boot: int = 1000, ci: float = 0.95, seed: int = 0, bins: int = 10,
                    threads: int = 1) -> dict[str, pd.DataFrame]:
    """Write table ``calibration`` (ECE and Brier score with CIs, every cell, test set and label) and figure
    ``reliability``. Returns {'calibration': the long table}."""
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing, scores=("p",))
    table = calibration_table(cells, n_boot=n_boot, ci=ci, seed=seed, bins=bins, threads=threads)
    notes = [
        f"ECE: {bins} equal-width bins on [0, 1] (the last closed), Σ_b (n_b/N) |observed − mean predicted|; Brier "
        "score: mean (p − y)². Per label, then the mean over labels ('macro', shown here; the CSV also has every "
        "label of multi-label tasks). Seeds pooled: the mean over seeds of each resample's value.",
        f"{ci:.0%} percentile bootstrap CIs over {n_boot} stay resamples, shared by every model of a task and test "
        "set (those of the main table). Lower is better for both.",
    ]
    write_table(table, Path(tables_dir) / "calibration", title="Calibration (ECE, Brier score)",
                display=_calibration_display(table), notes=notes)
    save_figure(reliability_figure(cells, bins), Path(figures_dir) / "reliability")
    return {"calibration": table}


def read_stay_times(stays_path) -> pd.DataFrame:
    """stay_id, los_hours and cxr_hours of the cohort, indexed by stay_id."""
    return read_stays(stays_path, STAY_COLUMNS, "the X-ray ages")


def xray_ages(stay_times: pd.DataFrame, stay_ids: np.ndarray, prediction_hour: float, stays_path) -> np.ndarray:
    """Hours from each stay's paired X-ray to the prediction time: min(los_hours, prediction_hour) − cxr_hours,
    clipped at 0."""
    position = stay_times.index.get_indexer(stay_ids)
    if (position < 0).any():
        raise ValueError(f"{stays_path}: no row for stay_id {stay_ids[position < 0][0]} "
                         f"({(position < 0).sum()} test stays lack one)")
    times = stay_times.iloc[position]
    for column in ("los_hours", "cxr_hours"):
        undefined = times[column].isna().to_numpy()
        if undefined.any():
            raise ValueError(f"{stays_path}: stay_id {stay_ids[undefined][0]} (a paired test stay) has no {column}")
    prediction_time = np.minimum(times["los_hours"].to_numpy(np.float64), prediction_hour)
    return np.maximum(prediction_time - times["cxr_hours"].to_numpy(np.float64), 0.0)


def age_strata(ages: np.ndarray, age_bins, stay_ids: np.ndarray) -> np.ndarray:
    """Stratum (0 .. len(age_bins) − 2) of each age: bins between consecutive edges, left-closed, the last closed.
    An age outside the edges is an error naming its stay."""
    edges = np.asarray(age_bins, dtype=np.float64)
    if edges.size < 2 or (np.diff(edges) <= 0).any():
        raise ValueError(f"age_bins must be at least 2 increasing edges, got {list(age_bins)}")
    stratum = np.searchsorted(edges, ages, side="right") - 1
    stratum[ages == edges[-1]] = edges.size - 2
    outside = (stratum < 0) | (stratum > edges.size - 2)
    if outside.any():
        first = np.flatnonzero(outside)[0]
        raise ValueError(f"stay_id {stay_ids[first]}: its X-ray is {ages[first]:g} h old at prediction time, outside "
                         f"the age bins {edges.tolist()} ({outside.sum()} stays outside); widen age_bins")
    return stratum


def stratum_names(age_bins) -> list[str]:
    """'[0, 12) h', …, the last '[36, 48] h'."""
    edges = list(age_bins)
    return [f"[{low:g}, {high:g}{']' if i == len(edges) - 2 else ')'} h"
            for i, (low, high) in enumerate(zip(edges[:-1], edges[1:]))]


def _stratum_rows(cell: Cell, stratum: np.ndarray, age_bins, weights: np.ndarray, ci: float, threads: int
                  ) -> tuple[list[dict], dict[tuple[str, str], np.ndarray]]:
    """Macro AUROC and AUPRC of one cell per X-ray-age stratum of its paired test stays, and their values under
    every resample row ((stratum, metric) -> (W,), unsuppressed strata only) for paired differences."""
    y, p_by_seed = cell.labels_of("paired_test"), cell.scores("paired_test")
    rows, resamples = [], {}
    for s, name in enumerate(stratum_names(age_bins)):
        members = stratum == s
        n_stays = int(members.sum())
        suppressed = n_stays < MIN_STRATUM_STAYS
        if suppressed:
            summaries = [(np.nan, np.nan, np.nan)] * 2
        else:
            stats = pooled_resample_stats(y[members], [p[members] for p in p_by_seed], ["auroc", "auprc"],
                                          weights[:, members], threads)
            summaries = [summarise_resamples(macro, ci) for macro, _ in stats]
            resamples.update({(name, metric): macro for metric, (macro, _) in zip(("auroc", "auprc"), stats)})
        rows += [dict(task=cell.task, missing=cell.missing, model=cell.model, stratum=name, age_low=age_bins[s],
                      age_high=age_bins[s + 1], metric=metric, estimate=float(estimate), ci_low=float(low),
                      ci_high=float(high), n_stays=n_stays, suppressed=suppressed)
                 for metric, (estimate, low, high) in zip(("auroc", "auprc"), summaries)]
    return rows, resamples


def xray_age_table(cells: dict, stay_times: pd.DataFrame, stays_path, *, age_bins=(0, 12, 24, 36, 48),
                   prediction_hour: float = 48, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                   threads: int = 1, contrasts=()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long X-ray-age table (:data:`XRAY_AGE_COLUMNS`) of every cell with paired test stays, and the gain
    table (:data:`XRAY_AGE_GAIN_COLUMNS`) of each (model, reference) of ``contrasts`` trained at the same task and
    setting: model − reference per stratum, paired on the shared resamples, with a bootstrap p-value."""
    strata, weights, rows, resamples = {}, {}, [], {}
    for (task, _, _), cell in cells.items():
        stay_ids = cell.stays("paired_test")
        if stay_ids.size == 0:
            continue
        if task not in strata:
            ages = xray_ages(stay_times, stay_ids, prediction_hour, stays_path)
            strata[task] = age_strata(ages, age_bins, stay_ids)
            weights[task] = resample_weights(stay_ids.size, n_boot, seed)
        cell_rows, resamples[task, cell.missing, cell.model] = _stratum_rows(cell, strata[task], list(age_bins),
                                                                             weights[task], ci, threads)
        rows += cell_rows
    table = pd.DataFrame(rows, columns=XRAY_AGE_COLUMNS)
    return table, _gain_table(table, resamples, contrasts, ci)


def _gain_table(table: pd.DataFrame, resamples: dict, contrasts, ci: float) -> pd.DataFrame:
    """Rows of :data:`XRAY_AGE_GAIN_COLUMNS`: per contrast, task, setting, stratum and metric, the paired gain."""
    rows = []
    strata = table.drop_duplicates(["task", "stratum"]).set_index(["task", "stratum"])
    for model, reference in contrasts:
        for (task, missing, name), values in resamples.items():
            if name != model or (task, missing, reference) not in resamples:
                continue
            for (stratum, metric), own in values.items():
                other = resamples[task, missing, reference].get((stratum, metric))
                if other is None:
                    continue
                gain, low, high = summarise_resamples(own - other, ci)
                info = strata.loc[(task, stratum)]
                rows.append(dict(task=task, missing=missing, model=model, reference=reference, stratum=stratum,
                                 age_low=info["age_low"], age_high=info["age_high"], metric=metric, gain=float(gain),
                                 ci_low=float(low), ci_high=float(high),
                                 p_value=float(bootstrap_p_value(own - other)), n_stays=int(info["n_stays"])))
    return pd.DataFrame(rows, columns=XRAY_AGE_GAIN_COLUMNS)


def xray_age_figure(table: pd.DataFrame, age_bins):
    """Macro AUROC per X-ray-age stratum and model with CI error bars, natural setting, one panel per task."""
    def draw(axis, of_task: pd.DataFrame, names: list[str]) -> None:
        models = list(dict.fromkeys(of_task["model"]))
        for m, model in enumerate(models):
            curve = of_task[of_task["model"] == model].set_index("stratum").reindex(names)
            x = np.arange(len(names)) + 0.6 * (m - (len(models) - 1) / 2) / len(models)
            errors = np.vstack([curve["estimate"] - curve["ci_low"], curve["ci_high"] - curve["estimate"]])
            axis.errorbar(x, curve["estimate"], yerr=errors, marker="o", ms=4, capsize=2, lw=1, label=model)

    return _age_panels(table, age_bins, draw, "macro AUROC",
                       "No X-ray-age figure: no natural-setting runs with paired test stays.")


def _age_panels(table: pd.DataFrame, age_bins, draw, ylabel: str, empty_message: str):
    """One panel per task of ``table``'s natural-setting AUROC rows: ``draw(axis, task rows, stratum names)`` plots
    the curves; the strata with their stay counts label the x axis."""
    rows = table[(table["missing"] == "natural") & (table["metric"] == "auroc")]
    tasks = list(dict.fromkeys(rows["task"]))
    if not tasks:
        return empty_figure(empty_message)
    plt = _pyplot()
    names = stratum_names(age_bins)
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        of_task = rows[rows["task"] == task]
        draw(axis, of_task, names)
        counts = of_task.drop_duplicates("stratum").set_index("stratum").reindex(names)["n_stays"]
        axis.set_xticks(np.arange(len(names)),
                        [f"{name}\nn = {count:g}" for name, count in zip(names, counts.fillna(0))], fontsize=8)
        axis.set(xlabel="age of the paired X-ray at prediction time", ylabel=ylabel,
                 title=f"{task}: paired_test, natural")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _xray_age_display(table: pd.DataFrame) -> pd.DataFrame:
    """AUROC and AUPRC side by side per task, setting, model and stratum; suppressed strata say so."""
    return _side_by_side(table, ["task", "missing", "model", "stratum"], {"auroc": "AUROC", "auprc": "AUPRC"},
                         lambda r: (f"suppressed (< {MIN_STRATUM_STAYS} stays)" if r.suppressed
                                    else format_ci(r.estimate, r.ci_low, r.ci_high)))


def xray_age_gain_figure(gain: pd.DataFrame, age_bins):
    """Gain in macro AUROC over the reference per X-ray-age stratum with CI error bars, natural setting, one panel
    per task; one line per contrast."""
    def draw(axis, of_task: pd.DataFrame, names: list[str]) -> None:
        for (model, reference), curve in of_task.groupby(["model", "reference"], sort=False):
            curve = curve.set_index("stratum").reindex(names)
            errors = np.vstack([curve["gain"] - curve["ci_low"], curve["ci_high"] - curve["gain"]])
            axis.errorbar(np.arange(len(names)), curve["gain"], yerr=errors, marker="o", ms=4, capsize=2, lw=1,
                          label=f"{model} − {reference}")
        axis.axhline(0.0, color="grey", lw=0.8)

    return _age_panels(gain, age_bins, draw, "gain in macro AUROC",
                       "No X-ray-age gain figure: no contrast with both models at the natural setting.")


def _xray_age_gain_display(gain: pd.DataFrame) -> pd.DataFrame:
    """Gain with CI and p per contrast, setting, stratum and metric."""
    return pd.DataFrame({
        "task": gain["task"], "setting": gain["missing"], "model": gain["model"], "reference": gain["reference"],
        "stratum": gain["stratum"], "n": gain["n_stays"], "metric": gain["metric"].str.upper(),
        "gain [CI]": [format_ci(r.gain, r.ci_low, r.ci_high) for r in gain.itertuples()],
        "p": gain["p_value"].map(format_p)})


def run_xray_age(run_dirs, stays_path, modalities, tables_dir, figures_dir, *, ehr_only_models=(), grid_missing=(),
                 age_bins=(0, 12, 24, 36, 48), prediction_hour: float = 48, n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0, threads: int = 1, contrasts=()) -> dict[str, pd.DataFrame]:
    """Write table and figure ``xray_age``: every model's macro AUROC and AUPRC on the paired test stays per
    stratum of X-ray age at prediction time; and ``xray_age_gain``: the paired gain of each (model, reference) of
    ``contrasts`` (config analysis.xray_age_contrasts, e.g. DDL-CXR over its copy-x0 baseline) per stratum.
    Returns {'xray_age': ..., 'xray_age_gain': ...} (long tables)."""
    stay_times = read_stay_times(stays_path)
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing, scores=("p",))
    table, gain = xray_age_table(cells, stay_times, stays_path, age_bins=age_bins, prediction_hour=prediction_hour,
                                 n_boot=n_boot, ci=ci, seed=seed, threads=threads, contrasts=contrasts)
    notes = [
        f"Age of the paired X-ray at prediction time: min(los_hours, {prediction_hour:g}) − cxr_hours (hours from ICU "
        "admission to the X-ray), clipped at 0; strata left-closed, the last closed.",
        f"Macro AUROC and AUPRC on the paired test stays of each stratum (mean over seeds), with {ci:.0%} percentile "
        f"bootstrap CIs over {n_boot} resamples of the paired test stays shared by every model (each stratum keeps "
        f"its stays' draws). Strata with fewer than {MIN_STRATUM_STAYS} stays are suppressed.",
        "Strata differ in more than X-ray age (e.g. short stays predict earlier), so differences between strata are "
        "associations, not effects of the age alone.",
    ]
    write_table(table, Path(tables_dir) / "xray_age", title="Discrimination by age of the paired X-ray",
                display=_xray_age_display(table), notes=notes)
    save_figure(xray_age_figure(table, list(age_bins)), Path(figures_dir) / "xray_age")
    gain_notes = [
        "Gain = the model's macro metric minus the reference's on the same paired test stays of each X-ray-age "
        f"stratum; {ci:.0%} percentile CI and two-sided bootstrap p-value over the shared resamples (paired). "
        "Contrasts: config analysis.xray_age_contrasts.",
        "DDL-CXR against its copy-x0 baseline isolates the generated up-to-date latent: both read the same EHR and "
        "the same last real X-ray; the baseline's 'generated' latent is the last real latent itself.",
    ]
    write_table(gain, Path(tables_dir) / "xray_age_gain", title="Gain over a reference by age of the paired X-ray",
                display=_xray_age_gain_display(gain), notes=gain_notes)
    save_figure(xray_age_gain_figure(gain, list(age_bins)), Path(figures_dir) / "xray_age_gain")
    return {"xray_age": table, "xray_age_gain": gain}
