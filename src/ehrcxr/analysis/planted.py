"""Does the report find what the synthetic generator planted? Checks read the analysis tables of a finished
synthetic run and return one row per effect: the statistic that should show it, its value and whether it does.

Planted (``signal_map.json``): labels whose signal is in the X-ray only (``cxr``), in both modalities (``both``) or
in the EHR only (``ehr``); a pulse-oximetry bias (SpO2 reads 2.5 points high in BLACK patients and oxygen therapy
follows the reading, masking respiratory failure); missing-aware methods (MedFuse, DrFuse) built for an absent
X-ray. ``benchmarks/planted_effects.py`` prints the rows for any run; ``tests/test_planted_effects.py`` asserts them
on a small run.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

RESPIRATORY_FAILURE = "ph_respiratory_failure"
LARGE_DROP = 0.1  # AUROC lost with the X-ray withheld that counts as "large" on X-ray-signal labels
NEGLIGIBLE_DROP = 0.02  # ... and as "~0" on EHR-signal labels (the CI half-width of a macro AUROC on ~300 stays)


def _fmt(row, estimate="gain", low="ci_low", high="ci_high") -> str:
    return f"{row[estimate]:+.3f} [{row[low]:+.3f}, {row[high]:+.3f}]"


def fusion_gain_rows(tables: Path) -> list[dict]:
    """Per fusion model and signal class (and mortality): gain over the best EHR-only model on the paired test
    set; expected q < 0.05 and > 0 on ``cxr`` and ``both``, not significant on ``ehr`` and ``weak``."""
    gain = pd.read_csv(tables / "fusion_gain.csv")
    shown = gain[(gain["reference"] == "best_ehr_only") & (gain["missing"] == "natural")
                 & (gain["eval_set"] == "paired_test") & (gain["metric"] == "auroc")
                 & (gain["label"].str.startswith("class:") | (gain["label"] == "mortality"))]
    rows = []
    for r in shown.itertuples():
        expects_gain = r.signal in ("cxr", "both")
        q = r.q_value if pd.notna(r.q_value) else r.p_value  # a single-label task: one test, q = p
        significant = q < 0.05 and r.gain > 0
        what = "mortality" if r.label == "mortality" else f"`{r.signal}` labels"
        rows.append({"effect": "fusion gain", "task": r.task, "model": r.model, "signal": r.signal,
                     "description": f"fusion gain over the EHR-only model, {what}",
                     "expected": "q < 0.05, gain > 0" if expects_gain else "no significant gain",
                     "measured": f"{_fmt(r._asdict())}, q {q:.3g}",
                     "found": bool(significant if expects_gain else not significant)})
    return rows


def imbalance_rows(tables: Path) -> list[dict]:
    """Per fusion model: mean AUROC drop with the X-ray withheld over the ``cxr`` labels (expected > LARGE_DROP)
    and over the ``ehr`` labels (expected within ±NEGLIGIBLE_DROP)."""
    table = pd.read_csv(tables / "modality_imbalance.csv")
    shown = table[(table["missing"] == "natural") & (table["metric"] == "auroc") & (table["withheld"] == "cxr")
                  & table["signal"].isin(["cxr", "ehr"])]
    rows = []
    for (task, model), part in shown.groupby(["task", "model"]):
        drops = part.groupby("signal")["drop"].mean()
        if {"cxr", "ehr"} <= set(drops.index):
            rows.append({"effect": "modality imbalance", "task": task, "model": model, "signal": "cxr, ehr",
                         "description": "AUROC drop with the X-ray withheld",
                         "expected": f"> {LARGE_DROP} on `cxr` labels, within ±{NEGLIGIBLE_DROP} on `ehr` labels",
                         "measured": f"cxr {drops['cxr']:+.3f}, ehr {drops['ehr']:+.3f} (mean over labels)",
                         "found": bool(drops["cxr"] > LARGE_DROP and abs(drops["ehr"]) < NEGLIGIBLE_DROP)})
    return rows


def pulse_oximetry_rows(tables: Path, eval_set: str = "partial_test") -> list[dict]:
    """Per model: respiratory-failure TPR of BLACK minus that of the reference race group (WHITE), on the same
    resamples; expected < 0 with the CI excluding 0."""
    groups = pd.read_csv(tables / "fairness_groups.csv")
    shown = groups[(groups["label"] == RESPIRATORY_FAILURE) & (groups["attribute"] == "race")
                   & (groups["metric"] == "tpr") & (groups["eval_set"] == eval_set) & (groups["group"] == "BLACK")]
    rows = []
    for r in shown.itertuples():
        found = bool(pd.notna(r.difference) and r.difference_high < 0)
        measured = ("suppressed (under the small-cell limit)" if r.suppressed else
                    f"{_fmt(r._asdict(), 'difference', 'difference_low', 'difference_high')}, "
                    f"p {r.difference_p:.3g} (BLACK {r.estimate:.3f})")
        rows.append({"effect": "pulse-oximetry bias", "task": r.task, "model": r.model, "signal": "both",
                     "description": f"respiratory-failure TPR, BLACK − {r.reference_group} ({eval_set})",
                     "expected": "< 0, CI excluding 0", "measured": measured, "found": found})
    return rows


def missing_aware_rows(tables: Path) -> list[dict]:
    """Per task: AUROC drop from test-time X-ray removal r = 0 to 1 on the paired test set; expected larger for
    every missing-unaware fusion model than for every missing-aware one. The drop mixes robustness with reliance:
    a model that draws less on the X-ray also loses less when it is gone, so read it with the r = 0 level."""
    summary = pd.read_csv(tables / "robustness_test_summary.csv")
    fusion_models = set(pd.read_csv(tables / "fusion_gain.csv")["model"])
    shown = summary[(summary["missing"] == "natural") & (summary["metric"] == "auroc")
                    & (summary["eval_set"] == "paired_test")]
    rows = []
    for task, part in shown.groupby("task"):
        fusion = part[part["model"].isin(fusion_models)]
        aware, unaware = fusion[fusion["missing_aware"]], fusion[~fusion["missing_aware"]]
        if aware.empty or unaware.empty:
            continue
        rows.append({"effect": "missing-aware robustness", "task": task, "model": ", ".join(fusion["model"]),
                     "signal": "", "description": "test-time X-ray removal, AUROC drop r 0 → 1",
                     "expected": "drop(unaware) > drop(aware)",
                     "measured": "; ".join(f"{r.model} {r.drop:+.3f} [{r.drop_low:+.3f}, {r.drop_high:+.3f}]"
                                           for r in fusion.itertuples()),
                     "found": bool(unaware["drop"].min() > aware["drop"].max())})
    return rows


def planted_effects(tables: Path) -> pd.DataFrame:
    """Every check's rows for the analysis tables in ``tables``."""
    tables = Path(tables)
    rows = (fusion_gain_rows(tables) + imbalance_rows(tables) + pulse_oximetry_rows(tables)
            + missing_aware_rows(tables))
    return pd.DataFrame(rows, columns=["effect", "task", "model", "signal", "description", "expected", "measured",
                                       "found"])
