"""Probe how much signal each modality of the synthetic dataset carries, without the project pipeline.

Generates a dataset (or reuses one), builds simple per-stay features straight from the raw files
(EHR: summary statistics of the 17 variables over the first 48 h; CXR: the latest AP image of the
first 48 h downsampled to 32x32 and PCA-reduced), fits standardised logistic regressions on the
paired training stays and reports AUROC on the paired test stays per label, per signal group of
``signal_map.json`` and for in-hospital mortality (stays >= 48 h).

Usage: PYTHONPATH=src python benchmarks/probe_synthetic_signal.py [--n-stays 6000] [--seed 0] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ehrcxr.data import raw
from ehrcxr.synthetic import generate
from ehrcxr.resources import itemids, phenotype_labels, phenotypes, variable_ranges

WINDOW_HOURS = 48.0
IMAGE_PIXELS = 32
CXR_COMPONENTS = 150
TEXTURE_BLOCKS = 8
INTERACTION_EHR = 3
INTERACTION_CXR = 50
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
# Unit conversions to the variable's reference unit (valuenum * factor + shift).
CONVERSIONS = {223761: (5 / 9, -32 * 5 / 9), 226531: (1 / 2.20462, 0.0), 226707: (2.54, 0.0)}


def stay_table(root: Path) -> pd.DataFrame:
    """ICU stays with hospital_expire_flag and length of stay in hours."""
    stays = pd.read_csv(root / "mimic-iv/icu/icustays.csv.gz", parse_dates=["intime", "outtime"])
    admissions = pd.read_csv(root / "mimic-iv/hosp/admissions.csv.gz", usecols=["hadm_id", "hospital_expire_flag"])
    stays = stays.merge(admissions, on="hadm_id", how="left")
    stays["los_hours"] = (stays["outtime"] - stays["intime"]).dt.total_seconds() / 3600
    return stays.set_index("stay_id")


def phenotype_table(root: Path, stays: pd.DataFrame) -> pd.DataFrame:
    """0/1 phenotype labels per stay from diagnoses_icd and the benchmark ICD lists."""
    diagnoses = pd.read_csv(root / "mimic-iv/hosp/diagnoses_icd.csv.gz", dtype={"icd_code": str})
    key = diagnoses["icd_code"] + "/" + diagnoses["icd_version"].astype(str)
    labels = pd.DataFrame(index=stays.index)
    for group in phenotypes():
        codes = {f"{c}/9" for c in map(str, group["icd9"])} | {f"{c}/10" for c in map(str, group["icd10"])}
        positive = set(diagnoses.loc[key.isin(codes), "hadm_id"])
        labels[group["label"]] = stays["hadm_id"].isin(positive).astype(int).to_numpy()
    return labels


def ehr_features(root: Path, stays: pd.DataFrame) -> pd.DataFrame:
    """Per stay and variable: mean, std, min, max, last, slope (per day) and count over the first 48 h."""
    items = itemids()
    variable_of = items.drop_duplicates("itemid").set_index("itemid")["variable"]
    chart = pd.read_csv(root / "mimic-iv/icu/chartevents.csv.gz",
                        usecols=["stay_id", "charttime", "itemid", "valuenum"], parse_dates=["charttime"])
    chart = chart[chart["itemid"].isin(variable_of.index)]
    labs = pd.read_csv(root / "mimic-iv/hosp/labevents.csv.gz", usecols=["hadm_id", "charttime", "itemid", "valuenum"],
                       parse_dates=["charttime"])
    labs = labs[labs["itemid"].isin(variable_of.index)].dropna(subset=["hadm_id"])
    labs = labs.merge(stays.reset_index()[["stay_id", "hadm_id"]], on="hadm_id").drop(columns="hadm_id")
    events = pd.concat([chart, labs], ignore_index=True).dropna(subset=["valuenum"])
    factor = events["itemid"].map({k: v[0] for k, v in CONVERSIONS.items()}).fillna(1.0)
    shift = events["itemid"].map({k: v[1] for k, v in CONVERSIONS.items()}).fillna(0.0)
    events["value"] = events["valuenum"] * factor + shift
    events["variable"] = events["itemid"].map(variable_of)
    ranges = variable_ranges()
    low = events["variable"].map(ranges["outlier_low"])
    high = events["variable"].map(ranges["outlier_high"])
    fio2 = events["variable"] == "Fraction inspired oxygen"
    events.loc[fio2, "value"] = events.loc[fio2, "value"] / 100.0
    events = events[(events["value"] >= low) & (events["value"] <= high)]
    events["hours"] = (events["charttime"] - events["stay_id"].map(stays["intime"])).dt.total_seconds() / 3600
    events = events[(events["hours"] >= 0) & (events["hours"] <= WINDOW_HOURS)].sort_values(["stay_id", "hours"])
    grouped = events.groupby(["stay_id", "variable"])
    stats = grouped["value"].agg(["mean", "std", "min", "max", "last", "count"])
    # Least-squares slope per day: cov(t, v) / var(t).
    events["t"] = events["hours"] / 24.0
    events["tv"] = events["t"] * events["value"]
    events["tt"] = events["t"] ** 2
    sums = grouped[["t", "value", "tv", "tt"]].mean()
    variance = sums["tt"] - sums["t"] ** 2
    stats["slope"] = np.where(variance > 1e-3, (sums["tv"] - sums["t"] * sums["value"]) / variance.clip(lower=1e-3), 0)
    wide = stats.unstack("variable")
    wide.columns = [f"{variable}:{stat}" for stat, variable in wide.columns]
    return wide.reindex(stays.index)


def paired_images(root: Path, stays: pd.DataFrame) -> pd.Series:
    """Relative path of the latest AP image in [intime, intime + 48 h] per stay (paired stays only)."""
    meta = raw.read_table(root / "mimic-cxr-jpg", "metadata", specs=raw.CXR_TABLES)
    meta = meta[meta["ViewPosition"] == "AP"].copy()
    meta["time"] = raw.cxr_study_datetime(meta["StudyDate"], meta["StudyTime"])
    pairs = meta.merge(stays.reset_index()[["stay_id", "subject_id", "intime"]], on="subject_id")
    hours = (pairs["time"] - pairs["intime"]).dt.total_seconds() / 3600
    pairs = pairs[(hours >= 0) & (hours <= WINDOW_HOURS)].sort_values(["stay_id", "time"])
    latest = pairs.groupby("stay_id").tail(1)
    paths = raw.cxr_image_relpath(latest["subject_id"], latest["study_id"], latest["dicom_id"])
    return pd.Series(paths.to_numpy(), index=latest["stay_id"].to_numpy())


def image_features(root: Path, paths: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per image: the 32x32 box-downsampled pixels in [0, 1], and the pixel standard deviation of each block of
    an 8x8 grid plus the sorted block standard deviations and sorted block means; unreadable images are dropped."""
    pixels, texture, index = [], [], []
    for stay_id, relpath in paths.items():
        try:
            with Image.open(root / "mimic-cxr-jpg" / relpath) as image:
                full = image.convert("L")
                small = full.resize((IMAGE_PIXELS, IMAGE_PIXELS), Image.Resampling.BOX)
                array = np.asarray(full, dtype=np.float32) / 255.0
        except OSError:
            continue
        side = array.shape[0] // TEXTURE_BLOCKS
        blocks = array[:side * TEXTURE_BLOCKS, :side * TEXTURE_BLOCKS].reshape(TEXTURE_BLOCKS, side,
                                                                                TEXTURE_BLOCKS, side)
        pixels.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
        block_std = blocks.std(axis=(1, 3)).ravel()
        block_mean = blocks.mean(axis=(1, 3)).ravel()
        # Position-free order statistics of the blocks (focal lesions appear anywhere).
        texture.append(np.r_[block_std, np.sort(block_std), np.sort(block_mean - np.median(block_mean))])
        index.append(stay_id)
    return pd.DataFrame(np.vstack(pixels), index=index), pd.DataFrame(np.vstack(texture), index=index)


def fill_missing(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Train-median imputation plus a missingness indicator per column with any gap."""
    median = train.median().fillna(0.0)
    gaps = [c for c in train.columns if train[c].isna().any() or test[c].isna().any()]
    def build(frame):
        return np.hstack([frame.fillna(median).to_numpy(), frame[gaps].isna().to_numpy(float)])
    return build(train), build(test)


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardised L2 logistic regression, C picked by 3-fold CV AUROC on the training rows.

    Returns the out-of-fold logits of the training rows (at the chosen C) and the test logits.
    """
    folds = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(x_train, y_train))
    best_auc, best_oof, best_c = -1.0, None, C_GRID[0]
    for c in C_GRID:
        oof = np.zeros(len(y_train))
        for fit_rows, val_rows in folds:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300))
            model.fit(x_train[fit_rows], y_train[fit_rows])
            oof[val_rows] = model.decision_function(x_train[val_rows])
        auc = np.mean([roc_auc_score(y_train[v], oof[v]) for _, v in folds])
        if auc > best_auc:
            best_auc, best_oof, best_c = auc, oof, c
    model = make_pipeline(StandardScaler(), LogisticRegression(C=best_c, max_iter=500))
    model.fit(x_train, y_train)
    return best_oof, model.decision_function(x_test)


def interaction_features(ehr, cxr, y_train) -> tuple[np.ndarray, np.ndarray]:
    """Products of the INTERACTION_EHR EHR columns that separate the training labels best (AUROC) with the
    leading INTERACTION_CXR CXR principal components, all standardised on the training rows."""
    ehr_train, ehr_test = ehr
    strength = [abs(roc_auc_score(y_train, column) - 0.5) for column in ehr_train.T]
    keep = np.argsort(strength)[::-1][:INTERACTION_EHR]
    e_scaler = StandardScaler().fit(ehr_train[:, keep])
    c_scaler = StandardScaler().fit(cxr[0][:, :INTERACTION_CXR])
    def products(e, c):
        e, c = e_scaler.transform(e[:, keep]), c_scaler.transform(c[:, :INTERACTION_CXR])
        return (e[:, :, None] * c[:, None, :]).reshape(len(e), -1)
    return products(ehr_train, cxr[0]), products(ehr_test, cxr[1])


def evaluate(name, y, train, test, ehr, cxr, oracle, seed, with_interaction=False) -> dict:
    """AUROC on the test rows of EHR, CXR, both and the oracle for one binary label.

    "both" stacks the two modalities: a logistic regression on the out-of-fold EHR and CXR logits
    and, when ``with_interaction``, the out-of-fold logit of a logistic regression on EHR x CXR products
    (see ``interaction_features``): late fusion that can weigh each modality and their interaction.
    """
    y_train, y_test = y[train], y[test]
    result = {"label": name, "n_test": int(test.sum()), "positives": int(y_test.sum())}
    if y_train.min() == y_train.max() or y_test.min() == y_test.max():
        return result
    ehr_oof, ehr_test = fit_predict(ehr[0], y_train, ehr[1], seed)
    cxr_oof, cxr_test = fit_predict(cxr[0], y_train, cxr[1], seed)
    stacked_train, stacked_test = np.c_[ehr_oof, cxr_oof], np.c_[ehr_test, cxr_test]
    if with_interaction:
        products_train, products_test = interaction_features(ehr, cxr, y_train)
        product_oof, product_test = fit_predict(products_train, y_train, products_test, seed)
        stacked_train = np.c_[stacked_train, product_oof]
        stacked_test = np.c_[stacked_test, product_test]
    fusion = LogisticRegression(max_iter=500).fit(stacked_train, y_train)
    result["ehr"] = roc_auc_score(y_test, ehr_test)
    result["cxr"] = roc_auc_score(y_test, cxr_test)
    result["both"] = roc_auc_score(y_test, fusion.decision_function(stacked_test))
    result["oracle"] = roc_auc_score(y_test, oracle[test])
    return result


def cxr_matrix(pixels_train: np.ndarray, pixels_test: np.ndarray, texture_train: np.ndarray,
               texture_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the 32x32 pixels fitted on the training images, next to the block textures."""
    pca = PCA(CXR_COMPONENTS, random_state=0).fit(pixels_train)
    return (np.hstack([pca.transform(pixels_train), texture_train]),
            np.hstack([pca.transform(pixels_test), texture_test]))


def probe(root: Path, seed: int, test_share: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label results for phenotypes (paired stays) and mortality (paired stays of >= 48 h)."""
    stays = stay_table(root)
    labels = phenotype_table(root, stays)
    oracle = pd.read_parquet(root / "oracle.parquet").set_index("stay_id").reindex(stays.index)
    signal = json.loads((root / "signal_map.json").read_text())
    features = ehr_features(root, stays)
    pixels, texture = image_features(root, paired_images(root, stays))
    paired = stays.index[stays.index.isin(pixels.index) & features.notna().any(axis=1).to_numpy()]
    subjects = stays["subject_id"].unique()
    test_subjects = set(np.random.default_rng(seed).choice(subjects, int(test_share * len(subjects)), replace=False))
    is_test = stays.loc[paired, "subject_id"].isin(test_subjects).to_numpy()

    def matrices(rows: pd.Index, test: np.ndarray):
        ehr = fill_missing(features.loc[rows[~test]], features.loc[rows[test]])
        cxr = cxr_matrix(pixels.loc[rows[~test]].to_numpy(), pixels.loc[rows[test]].to_numpy(),
                         texture.loc[rows[~test]].to_numpy(), texture.loc[rows[test]].to_numpy())
        return ehr, cxr

    ehr, cxr = matrices(paired, is_test)
    order = np.r_[np.flatnonzero(~is_test), np.flatnonzero(is_test)]
    rows, test = paired[order], is_test[order]
    results = []
    for label in phenotype_labels():
        result = evaluate(label, labels.loc[rows, label].to_numpy(), ~test, test, ehr, cxr,
                          oracle.loc[rows, label].to_numpy(), seed)
        results.append({**result, "signal": signal[label]})
    phenotype_results = pd.DataFrame(results)

    long_stay = (stays.loc[paired, "los_hours"] >= WINDOW_HOURS).to_numpy()
    mortality_rows, mortality_test = paired[long_stay], is_test[long_stay]
    order = np.r_[np.flatnonzero(~mortality_test), np.flatnonzero(mortality_test)]
    mortality_rows, mortality_test = mortality_rows[order], mortality_test[order]
    ehr_m, cxr_m = matrices(mortality_rows, mortality_test)
    died = stays.loc[mortality_rows, "hospital_expire_flag"].to_numpy()
    mortality = evaluate("mortality", died, ~mortality_test, mortality_test, ehr_m, cxr_m,
                         oracle.loc[mortality_rows, "mortality"].to_numpy(), seed, with_interaction=True)
    mortality["death_share"] = float(died.mean())
    return phenotype_results, pd.DataFrame([{**mortality, "signal": signal["mortality"]}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stays", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="dataset folder (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="probe an existing dataset in --out")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ehrcxr-probe-"))
    started = time.perf_counter()
    if not args.reuse:
        generate(out, n_stays=args.n_stays, seed=args.seed)
        print(f"generated {args.n_stays} stays in {time.perf_counter() - started:.1f} s -> {out}")
    phenotype_results, mortality = probe(out, args.seed)
    pd.set_option("display.width", 160)
    columns = ["ehr", "cxr", "both", "oracle"]
    print(phenotype_results.sort_values(["signal", "label"]).to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nmean AUROC per signal group (paired test):")
    print(phenotype_results.groupby("signal")[columns].mean().round(3).to_string())
    print(f"\nmacro AUROC over {len(phenotype_results)} labels: "
          + ", ".join(f"{c} {phenotype_results[c].mean():.3f}" for c in columns))
    print(f"weak labels: {(phenotype_results['signal'] == 'weak').sum()}")
    print("\nmortality (paired test, stays >= 48 h; both stacks EHR, CXR and an EHR x CXR interaction model):")
    print(mortality.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"probe finished in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
