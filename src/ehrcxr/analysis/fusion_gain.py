"""When does fusion help: per label and macro, the paired difference fusion model − reference model on the same
stay resamples (estimate, percentile CI, two-sided bootstrap p, Benjamini–Hochberg q across labels).

References are chosen on validation (never on test), per task and missing setting: ``best_unimodal`` = the
single-modality model with the highest validation macro AUPRC (EHR-only or X-ray-only), ``best_ehr_only`` = the
best EHR-only model; and ``baseline``, a fixed fusion model named in config (late fusion: does a method's way of
fusing beat the simplest one?). On synthetic data every label carries its planted signal class
(``signal_map.json``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.analysis.core import (
    MACRO, METRICS, Cell, ResampleCache, benjamini_hochberg, best_by_validation, bootstrap_p_value, cells_of,
    eval_sets_of, load_cells, slice_table,
)
from ehrcxr.analysis.publish import empty_figure, format_ci, format_p, save_figure, write_table
from ehrcxr.evaluate.bootstrap import summarise_resamples

log = logging.getLogger("ehrcxr.analysis")

SIGNAL_COLOURS = {"both": "tab:purple", "cxr": "tab:orange", "ehr": "tab:blue", "weak": "tab:gray", "": "black"}


def read_signal_map(path: str | Path | None) -> dict[str, str]:
    """label -> planted signal class ('ehr', 'cxr', 'both', 'weak') from the synthetic ``signal_map.json``;
    empty without one (real data)."""
    if not path:
        return {}
    signals = json.loads(Path(path).read_text())
    return {label: value for label, value in signals.items() if value in ("ehr", "cxr", "both", "weak")}


def references(cells: list[Cell], baseline: str | None = None) -> dict[str, Cell]:
    """reference kind -> the cell chosen on validation among the single-modality cells, and the ``baseline``
    model's cell (when it is in the slice)."""
    unimodal = [cell for cell in cells if len(cell.modalities) == 1]
    chosen = {"best_unimodal": best_by_validation(unimodal),
              "best_ehr_only": best_by_validation([cell for cell in unimodal if cell.modalities == ("ehr",)]),
              "baseline": next((cell for cell in cells if cell.model == baseline), None)}
    return {kind: cell for kind, cell in chosen.items() if cell is not None}


def _class_mean(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(W,) mean over the member labels' columns of (W, L) values, ignoring undefined (NaN) labels."""
    chosen = values[:, members]
    count = np.isfinite(chosen).sum(axis=1)
    return np.divide(np.nansum(chosen, axis=1), count, out=np.full(count.shape, np.nan), where=count > 0)


def _difference_rows(fusion: Cell, reference: Cell, kind: str, eval_set: str, cache: ResampleCache, ci: float,
                     signals: dict[str, str]) -> list[dict]:
    """Rows of one fusion model against one reference: macro, every label, and (multi-label tasks with planted
    signals) every signal class, the mean over its labels. q: BH across the labels, and across the classes."""
    y = fusion.labels_of(eval_set)
    fused, base = cache.stats(fusion, eval_set), cache.stats(reference, eval_set)
    labels = fusion.labels if len(fusion.labels) > 1 else []
    classes = sorted({signals[label] for label in labels if label in signals})
    rows = []
    for metric in METRICS:
        (fused_macro, fused_labels), (base_macro, base_labels) = fused[metric], base[metric]
        families = [[(fusion.labels[0] if not labels else MACRO, fused_macro, base_macro, y)]]
        families.append([(label, fused_labels[:, j], base_labels[:, j], y[:, [j]]) for j, label in enumerate(labels)])
        members = {signal: np.array([signals.get(label) == signal for label in labels]) for signal in classes}
        families.append([(f"class:{signal}", _class_mean(fused_labels, members[signal]),
                          _class_mean(base_labels, members[signal]), y[:, members[signal]]) for signal in classes])
        for family, tested in zip(families, (False, True, True)):
            p_values = np.array([float(bootstrap_p_value(f - b)) for _, f, b, _ in family])
            q_values = benjamini_hochberg(p_values) if tested else np.full(len(family), np.nan)
            for (label, fused_values, base_values, y_label), p, q in zip(family, p_values, q_values):
                gain, fused_ci, base_ci = (summarise_resamples(v, ci)
                                           for v in (fused_values - base_values, fused_values, base_values))
                signal = label.removeprefix("class:") if label.startswith("class:") else signals.get(label, "")
                rows.append(dict(
                    task=fusion.task, missing=fusion.missing, eval_set=eval_set, model=fusion.model, reference=kind,
                    reference_model=reference.model, metric=metric, label=label, signal=signal,
                    gain=gain[0], ci_low=gain[1], ci_high=gain[2], p_value=p, q_value=q,
                    fusion_estimate=fused_ci[0], reference_estimate=base_ci[0],
                    n_stays=int(y_label.shape[0]), n_positive=int(y_label.sum()), n_seeds=len(fusion.runs)))
    return rows


def fusion_gain_table(cells: dict, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, threads: int = 1,
                      signals: dict[str, str] | None = None, baseline: str | None = None) -> pd.DataFrame:
    """Long table of gains: task, missing, eval_set, model, reference, reference_model, metric, label
    ('macro', a label, or 'class:<signal>' = the mean over the labels of a planted signal class), signal, gain,
    ci_low, ci_high, p_value, q_value (BH over the labels of one model, reference, metric, eval set and setting;
    empty for the macro row), fusion_estimate, reference_estimate, n_stays, n_positive, n_seeds. ``threads``:
    cores, spread over the (task, missing) slices (:func:`~ehrcxr.analysis.core.slice_table`). ``baseline``: the
    fusion model every other fusion model is also compared with (reference ``baseline``)."""
    return slice_table(_slice_rows, cells, threads, n_boot=n_boot, ci=ci, seed=seed, signals=signals or {},
                       baseline=baseline)


def _slice_rows(cells: dict, key: tuple[str, str], threads: int, *, n_boot: int, ci: float, seed: int,
                signals: dict[str, str], baseline: str | None) -> list[dict]:
    """The rows of one (task, missing) slice."""
    cache, rows = ResampleCache(n_boot, seed, threads), []
    members = cells_of(cells, *key)
    chosen = references(members, baseline)
    for kind, reference in chosen.items():
        log.info("%s/%s: %s = %s (validation macro AUPRC %.3f)", *key, kind, reference.model, reference.val_score())
    for fusion in (cell for cell in members if cell.is_fusion):
        for eval_set in eval_sets_of(fusion):
            for kind, reference in chosen.items():
                if reference.model != fusion.model and eval_set in eval_sets_of(reference):
                    rows += _difference_rows(fusion, reference, kind, eval_set, cache, ci, signals)
    return rows


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The readable table: natural setting, paired test set, gains against the best unimodal model."""
    shown = table[(table["missing"] == "natural") & (table["eval_set"] == "paired_test")
                  & (table["reference"] == "best_unimodal")]
    return pd.DataFrame({
        "task": shown["task"], "model": shown["model"], "vs": shown["reference_model"],
        "metric": shown["metric"].str.upper(), "label": shown["label"], "signal": shown["signal"],
        "gain [95% CI]": [format_ci(r.gain, r.ci_low, r.ci_high) for r in shown.itertuples()],
        "p": shown["p_value"].map(format_p), "q (BH)": shown["q_value"].map(format_p)})


def forest_figure(table: pd.DataFrame, metric: str = "auroc"):
    """Per task and fusion model, the AUROC gain over the best unimodal model per label (sorted by gain) with its
    CI, natural setting, paired test set; labels coloured by their planted signal class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table[(table["missing"] == "natural") & (table["eval_set"] == "paired_test")
                  & (table["reference"] == "best_unimodal") & (table["metric"] == metric)
                  & ~table["label"].str.startswith("class:")]
    if shown.empty:
        return empty_figure("no fusion model with a paired test set: nothing to compare")
    tasks, models = sorted(shown["task"].unique()), sorted(shown["model"].unique())
    heights = [shown[shown["task"] == task].groupby("model").size().max() * 0.2 + 0.8 for task in tasks]
    figure, axes = plt.subplots(len(tasks), len(models), figsize=(3.8 * len(models), sum(heights) + 0.6),
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, task in enumerate(tasks):
        for column, model in enumerate(models):
            axis, part = axes[row][column], shown[(shown["task"] == task) & (shown["model"] == model)]
            if part.empty:
                axis.axis("off")
                continue
            part = part.sort_values("gain")
            positions = np.arange(len(part))
            colours = [SIGNAL_COLOURS.get(signal, "black") for signal in part["signal"]]
            gain, low, high = (part[name].to_numpy() for name in ("gain", "ci_low", "ci_high"))
            axis.errorbar(gain, positions, xerr=[gain - low, high - gain], fmt="none", ecolor="lightgray", zorder=1)
            axis.scatter(gain, positions, c=colours, s=14, zorder=2)
            axis.axvline(0, color="black", lw=0.8)
            axis.set_yticks(positions, [label.removeprefix("ph_") for label in part["label"]], fontsize=7)
            axis.set_title(f"{task}: {model} vs {part['reference_model'].iloc[0]}", fontsize=8)
            axis.set_xlabel(f"{metric.upper()} gain", fontsize=8)
    present = sorted(set(shown["signal"]) - {""})
    if present:
        handles = [plt.Line2D([], [], marker="o", ls="", color=SIGNAL_COLOURS[s], label=f"planted: {s}")
                   for s in present]
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04 if present else 0, 1, 1))
    return figure


def run_fusion_gain(run_dirs, modalities: dict[str, list[str]], table_stem, figure_stem, *, signal_map=None,
                    ehr_only_models=(), grid_missing=(), baseline: str | None = None, n_boot: int = 1000,
                    ci: float = 0.95, seed: int = 0, threads: int = 1) -> pd.DataFrame:
    """Workflow entry point: write ``fusion_gain`` (CSV/MD/TeX) and its forest figure (PNG/SVG)."""
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing)
    table = fusion_gain_table(cells, n_boot=n_boot, ci=ci, seed=seed, threads=threads,
                              signals=read_signal_map(signal_map), baseline=baseline)
    notes = [f"Paired difference fusion model − reference on the same {n_boot} stay resamples (seeds pooled); "
             f"{ci:.0%} percentile CI; two-sided bootstrap p = min(1, 2 min((1 + #{{d* ≤ 0}}), (1 + #{{d* ≥ 0}})) "
             "/ (B + 1)); q: Benjamini–Hochberg across the labels of a task, and apart across its planted signal "
             "classes (rows `class:<signal>`: the mean gain over the class's labels, synthetic data). References "
             "are chosen on validation macro AUPRC: best_unimodal (EHR-only or X-ray-only) and best_ehr_only; "
             f"baseline is the fusion model {baseline} (config analysis.fusion_baseline). The CSV holds all three, "
             "every missing setting and both test sets. Shown: `natural`, paired test set, against the best unimodal model.",
             "Signal: the planted signal class of the label (synthetic data, signal_map.json); empty on real data."]
    write_table(table, table_stem, title="Fusion gain over the best unimodal model", display=_display(table)
                if not table.empty else table, notes=notes)
    save_figure(forest_figure(table) if not table.empty else empty_figure("no fusion models in the grid"),
                figure_stem)
    return table
