"""Modality imbalance: every fusion model scored again on its paired test set with the X-ray withheld and with the
EHR withheld, without retraining (the ``p_nocxr`` / ``p_noehr`` columns the train cell writes), and the drop of
each metric per modality with a CI on the shared resamples. A model that ignores a modality shows ~0 drop for it.

Withheld X-ray: the model's own missing-X-ray input (has_cxr 0, zero image), as a stay without an X-ray.
Withheld EHR: every EHR channel 0 — normalised values at their training mean, every observation mask
'unobserved' — with the stay's length kept (no model here has a missing-EHR convention of its own).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ehrcxr.analysis.core import (
    MACRO, METRICS, ResampleCache, bootstrap_p_value, cells_of, headline, load_cells, slice_table,
)
from ehrcxr.analysis.fusion_gain import read_signal_map
from ehrcxr.analysis.publish import empty_figure, format_ci, format_p, save_figure, write_table
from ehrcxr.evaluate.bootstrap import summarise_resamples

EVAL_SET = "paired_test"  # every stay has both modalities, so withholding either is defined
WITHHELD = {"cxr": "p_nocxr", "ehr": "p_noehr"}


def imbalance_table(cells: dict, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, threads: int = 1,
                    signals: dict[str, str] | None = None) -> pd.DataFrame:
    """Long table: task, missing, model, withheld ('cxr'/'ehr'), metric, label ('macro' or a label; a single-label
    task's label), signal, full (metric as trained), withheld_estimate, drop (full − withheld), ci_low, ci_high,
    p_value, n_stays, n_seeds. ``threads``: cores, spread over the (task, missing) slices."""
    return slice_table(_slice_rows, cells, threads, n_boot=n_boot, ci=ci, seed=seed, signals=signals or {})


def _slice_rows(cells: dict, key: tuple[str, str], threads: int, *, n_boot: int, ci: float, seed: int,
                signals: dict[str, str]) -> list[dict]:
    """The rows of the fusion cells of one (task, missing) slice."""
    cache, rows = ResampleCache(n_boot, seed, threads), []
    for cell in cells_of(cells, *key):
        if not cell.is_fusion or cell.stays(EVAL_SET).size == 0:
            continue
        full = cache.stats(cell, EVAL_SET)
        for modality, score in WITHHELD.items():
            without = cache.stats(cell, EVAL_SET, score)
            for metric in METRICS:
                series = [(MACRO if len(cell.labels) > 1 else cell.labels[0], full[metric][0], without[metric][0])]
                if len(cell.labels) > 1:
                    series += [(label, full[metric][1][:, j], without[metric][1][:, j])
                               for j, label in enumerate(cell.labels)]
                for label, as_trained, withheld in series:
                    drop = summarise_resamples(as_trained - withheld, ci)
                    rows.append(dict(task=cell.task, missing=cell.missing, model=cell.model, withheld=modality,
                                     metric=metric, label=label, signal=signals.get(label, ""),
                                     full=as_trained[0], withheld_estimate=withheld[0], drop=drop[0],
                                     ci_low=drop[1], ci_high=drop[2],
                                     p_value=float(bootstrap_p_value(as_trained - withheld)),
                                     n_stays=int(cell.stays(EVAL_SET).size), n_seeds=len(cell.runs)))
    return rows


def _display(table: pd.DataFrame) -> pd.DataFrame:
    shown = headline(table[table["metric"] == "auroc"])
    frame = shown.assign(cell=[f"{format_ci(r.drop, r.ci_low, r.ci_high)} (p {format_p(r.p_value)})"
                               for r in shown.itertuples()])
    wide = frame.pivot_table(index=["task", "missing", "model", "full"], columns="withheld", values="cell",
                             aggfunc="first").reset_index()
    wide.columns.name = None
    return wide.rename(columns={"full": "AUROC as trained", "cxr": "drop without X-ray",
                                "ehr": "drop without EHR"}).round(3)


def imbalance_figure(table: pd.DataFrame):
    """Macro AUROC drop per fusion model when the X-ray or the EHR is withheld (natural setting), per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = headline(table[(table["metric"] == "auroc") & (table["missing"] == "natural")])
    tasks = sorted(shown["task"].unique())
    if not tasks:
        return empty_figure("no fusion model with a paired test set")
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        part = shown[shown["task"] == task]
        models = sorted(part["model"].unique())
        for offset, (modality, colour) in zip((-0.18, 0.18), (("cxr", "tab:orange"), ("ehr", "tab:blue"))):
            rows = part[part["withheld"] == modality].set_index("model").reindex(models)
            drop, low, high = (rows[column].to_numpy() for column in ("drop", "ci_low", "ci_high"))
            axis.bar(np.arange(len(models)) + offset, drop, width=0.36, color=colour,
                     label=f"{modality.upper()} withheld", yerr=[drop - low, high - drop], capsize=2)
        axis.axhline(0, color="black", lw=0.8)
        axis.set_xticks(np.arange(len(models)), models, rotation=30, ha="right")
        axis.set_ylabel("AUROC drop")
        axis.set_title(f"{task} (paired test, natural)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def run_imbalance(run_dirs, modalities: dict[str, list[str]], table_stem, figure_stem, *, signal_map=None,
                  ehr_only_models=(), grid_missing=(), n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                  threads: int = 1) -> pd.DataFrame:
    """Workflow entry point: write ``modality_imbalance`` (CSV/MD/TeX) and its figure (PNG/SVG)."""
    cells = load_cells(run_dirs, modalities, ehr_only_models, grid_missing)
    table = imbalance_table(cells, n_boot=n_boot, ci=ci, seed=seed, threads=threads,
                            signals=read_signal_map(signal_map))
    notes = ["Drop = metric as trained − metric with one modality withheld at test time (no retraining), paired "
             f"test set, {n_boot} shared stay resamples, seeds pooled. Withheld X-ray: the model's missing-X-ray "
             "input (has_cxr 0, zero image). Withheld EHR: every EHR channel 0 (normalised values at their "
             "training mean, every observation mask 'unobserved'), lengths kept. Shown: macro AUROC (a single-label "
             "task's label); the CSV holds every label, AUPRC and p-values."]
    write_table(table, table_stem, title="Modality imbalance: drop when one modality is withheld",
                display=_display(table) if not table.empty else table, notes=notes)
    save_figure(imbalance_figure(table) if not table.empty else empty_figure("no fusion models in the grid"),
                figure_stem)
    return table
