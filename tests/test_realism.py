"""Realism measurements on hand-made cohort/EHR inputs (expected values worked out in the comments) and the ok
logic of compare()."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from ehrcxr import realism
from ehrcxr.realism import (compare, cxr_measures, ddl_cxr_measures, hanley_mcneil_interval, mortality_measures,
                            phenotype_measures, profile_dataset, signal_aurocs, stay_summaries, variable_measures,
                            wilson_interval)
from ehrcxr.resources import CHEXPERT_LABELS
from ehrcxr.resources import phenotype_labels
from ehrcxr.synthetic import generate
from ehrcxr.synthetic.state import SIGNAL_MAP

NAN = np.nan
VERBAL = "Glascow coma scale verbal response"
VERBAL_CATEGORIES = ["5 Oriented", "No Response-ETT", "1 No Response"]
SCALE = {"Heart Rate": (80.0, 10.0), "Glucose": (120.0, 40.0)}


@pytest.fixture()
def stays() -> pd.DataFrame:
    """Six stays. mortality task (≥ 48 h): 3-6; deaths: 4, 6; paired X-ray: 1, 3, 4, 6; respiratory failure: 3, 4;
    pneumonia: 2; no phenotype: 1, 5, 6."""
    frame = pd.DataFrame({
        "stay_id": [1, 2, 3, 4, 5, 6], "subject_id": [10, 20, 30, 40, 50, 60], "hadm_id": [11, 21, 31, 41, 51, 61],
        "los_hours": [24.0, 40.0, 60.0, 72.0, 100.0, 120.0],
        "mortality": np.array([0, 0, 0, 1, 0, 1], dtype="int8"),
        "race": ["WHITE", "BLACK", "WHITE", "WHITE", "BLACK", "WHITE"], "gender": ["F", "M", "M", "F", "F", "M"],
        "cxr_dicom_id": ["a", None, "b", "c", None, "d"]})
    frame["in_mortality_task"] = frame["los_hours"] >= 48
    frame["split"] = "train"
    for label in phenotype_labels():
        frame[label] = np.int8(0)
    frame.loc[frame["stay_id"].isin([3, 4]), "ph_respiratory_failure"] = 1
    frame.loc[frame["stay_id"] == 2, "ph_pneumonia"] = 1
    return frame


def make_tensor(stay_ids, lengths, continuous: dict[str, np.ndarray], verbal: np.ndarray | None = None,
                verbal_mask: np.ndarray | None = None) -> xr.Dataset:
    """An EHR tensor as the pipeline writes it: ``continuous`` (stay, hour) arrays in physical units (NaN =
    unobserved) are z-scored with SCALE; ``verbal`` holds GCS verbal category indices (-1 = unobserved).
    Unobserved hours hold junk (z = 7 / the first category) that the measurements must ignore. ``verbal_mask``
    overrides the verbal mask."""
    n_stays, n_hours = next(iter(continuous.values())).shape
    verbal = np.full((n_stays, n_hours), -1) if verbal is None else np.asarray(verbal)
    variables = [*continuous, VERBAL]
    features = [*continuous, *(f"{VERBAL}->{category}" for category in VERBAL_CATEGORIES)]
    values = np.zeros((n_stays, n_hours, len(features)), dtype=np.float32)
    mask = np.zeros((n_stays, n_hours, len(variables)), dtype=np.uint8)
    for position, (variable, physical) in enumerate(continuous.items()):
        mean, std = SCALE[variable]
        values[:, :, position] = np.where(np.isnan(physical), 7.0, (physical - mean) / std)
        mask[:, :, position] = ~np.isnan(physical)
    values[:, :, len(continuous):] = np.eye(len(VERBAL_CATEGORIES))[np.where(verbal >= 0, verbal, 0)]
    mask[:, :, -1] = verbal >= 0 if verbal_mask is None else verbal_mask
    normaliser = {variable: {"mean": SCALE[variable][0], "std": SCALE[variable][1]} for variable in continuous}
    return xr.Dataset(
        {"values": (("stay", "hour", "feature"), values), "mask": (("stay", "hour", "variable"), mask),
         "length": (("stay",), np.asarray(lengths, dtype=np.int32))},
        coords={"stay_id": ("stay", np.asarray(stay_ids)), "hour": np.arange(n_hours), "feature": features,
                "variable": variables},
        attrs={"normaliser": json.dumps(normaliser), "hours": n_hours})


@pytest.fixture()
def tensor() -> xr.Dataset:
    """Stay 1: 4 valid hours, stay 2: 2 (its hours 2-3 are invalid, one of them wrongly masked as observed).
    Heart rate observed: 30, 90, 110 (stay 1, hours 0, 1, 3) and 70, 80 (stay 2); glucose: 90 (stay 1, hour 0)
    and 150 (stay 2, hour 1); GCS verbal: '5 Oriented' (stay 1, hour 0), 'No Response-ETT' (stay 1, hour 2)."""
    heart_rate = np.array([[30, 90, NAN, 110], [70, 80, NAN, 500]])
    glucose = np.array([[90, NAN, NAN, NAN], [NAN, 150, NAN, NAN]])
    verbal = np.array([[0, -1, 1, -1], [-1, -1, -1, -1]])
    return make_tensor([1, 2], [4, 2], {"Heart Rate": heart_rate, "Glucose": glucose}, verbal)


def values(profile: pd.DataFrame, family: str) -> dict[str, float]:
    rows = profile[profile["family"] == family]
    return dict(zip(rows["item"], rows["value"]))


def test_wilson_and_hanley_mcneil_intervals_match_worked_examples():
    # Newcombe (1998), example 81/263: Wilson 95% interval 0.2553-0.3662
    low, high = wilson_interval(81, 263)
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    # 0 of 2: [0, z^2 / (n + z^2)]
    assert wilson_interval(0, 2) == (pytest.approx(0.0, abs=1e-12), pytest.approx(3.8415 / 5.8415, abs=1e-4))
    assert np.isnan(wilson_interval(0, 0)[0])
    # Hanley & McNeil (1982), CT example: A = 0.893, 51 abnormal, 58 normal. Q1 = A/(2-A) = 0.80669,
    # Q2 = 2A^2/(1+A) = 0.84253, SE^2 = (0.095551 + 50 * 0.009241 + 57 * 0.045081) / (51 * 58) -> SE = 0.03251
    low, high = hanley_mcneil_interval(0.893, 51, 58)
    assert (high - low) / 2 == pytest.approx(1.96 * 0.03251, abs=2e-4)


def test_cxr_measures(stays):
    profile = cxr_measures(stays)
    assert values(profile, "cxr_paired_share") == {"": pytest.approx(4 / 6)}
    assert values(profile, "cxr_rate_by_outcome") == {"died": 1.0, "survived": 0.5}  # task stays 4, 6 | 3, 5
    assert values(profile, "cxr_rate_by_los") == {"≤48 h": 0.5, "48–96 h": 1.0, ">96 h": 0.5}
    assert values(profile, "cxr_rate_by_race") == {"BLACK": 0.0, "WHITE": 1.0}
    assert values(profile, "cxr_rate_by_sex") == {"F": pytest.approx(2 / 3), "M": pytest.approx(2 / 3)}
    # respiratory failure: positives 3, 4 both paired (1.0), negatives 1, 2, 5, 6 half paired (0.5)
    assert values(profile, "cxr_rate_gap") == {"died − survived": 0.5,
                                               "ph_respiratory_failure: positive − negative": 0.5}
    # pneumonia: its one positive (stay 2) unpaired, 4 of 5 negatives paired: -0.8, the largest |gap|
    largest = profile[profile["family"] == "cxr_rate_gap_largest"].iloc[0]
    assert (largest["value"], largest["detail"]) == (pytest.approx(-0.8), "ph_pneumonia")
    paired = profile[profile["family"] == "cxr_paired_share"].iloc[0]
    assert (paired["count"], paired["n"]) == (4, 6)
    assert (paired["ci_low"], paired["ci_high"]) == tuple(pytest.approx(x) for x in wilson_interval(4, 6))


def test_mortality_and_phenotype_measures(stays):
    mortality = mortality_measures(stays)
    assert values(mortality, "mortality_by_los") == {"≤48 h": 0.0, "48–96 h": 0.5, ">96 h": 0.5}
    assert values(mortality, "mortality_rise") == {">96 h − ≤48 h": 0.5}
    phenotypes = phenotype_measures(stays)
    prevalence = values(phenotypes, "phenotype_prevalence")
    assert len(prevalence) == 25 and prevalence["ph_respiratory_failure"] == pytest.approx(2 / 6)
    assert prevalence["ph_pneumonia"] == pytest.approx(1 / 6) and prevalence["ph_shock"] == 0.0
    assert values(phenotypes, "no_phenotype_share") == {"": pytest.approx(3 / 6)}
    shock = phenotypes[phenotypes["item"] == "ph_shock"].iloc[0]
    assert (shock["ci_low"], shock["ci_high"]) == (pytest.approx(0.0, abs=1e-12),
                                                   pytest.approx(3.8415 / (6 + 3.8415), abs=1e-4))


def test_variable_measures_use_observed_valid_hours_in_physical_units(tensor):
    profile = variable_measures(tensor)
    # 6 valid hours; heart rate observed in 5, glucose in 2, verbal in 2 (stay 2's hour 3 is invalid)
    assert values(profile, "observed_share") == {"Heart Rate": pytest.approx(5 / 6), "Glucose": pytest.approx(2 / 6),
                                                 VERBAL: pytest.approx(2 / 6)}
    assert values(profile, "observed_variables_per_hour") == {"": pytest.approx(9 / 6)}
    # heart rate 30, 70, 80, 90, 110 (linear interpolation: p1 = 30 + 0.04 * 40, p99 = 90 + 0.96 * 20);
    # glucose 90, 150; verbal scores 5 and 1 ('No Response-ETT')
    assert values(profile, "median") == pytest.approx({"Heart Rate": 80, "Glucose": 120, VERBAL: 3}, abs=1e-4)
    assert values(profile, "iqr") == pytest.approx({"Heart Rate": 20, "Glucose": 30, VERBAL: 2}, abs=1e-4)
    assert values(profile, "p01") == pytest.approx({"Heart Rate": 31.6, "Glucose": 90.6, VERBAL: 1.04}, abs=1e-4)
    assert values(profile, "p99") == pytest.approx({"Heart Rate": 109.2, "Glucose": 149.4, VERBAL: 4.96}, abs=1e-4)
    assert values(profile, "tail_share") == {"Glucose < 100": 0.5, "Heart Rate < 40": 0.2}


def test_stay_summaries_and_signal_aurocs(monkeypatch, tensor):
    summaries = stay_summaries(tensor, [("Heart Rate", "mean"), ("Heart Rate", "std"), ("Glucose", "min")])
    assert summaries.loc[1].to_dict() == pytest.approx({"mean Heart Rate": 230 / 3, "std Heart Rate": 33.993,
                                                        "min Glucose": 90}, abs=1e-3)
    assert summaries.loc[2].to_dict() == pytest.approx({"mean Heart Rate": 75, "std Heart Rate": 5,
                                                        "min Glucose": 150}, abs=1e-3)
    # five stays, mean heart rate 60, 70, 80, 90 and none (stay 5, left out); chf positives 2 and 4: of the
    # positive-negative pairs (70, 60) (70, 80) (90, 60) (90, 80), 3 of 4 ordered -> 0.75; shock: one class -> NaN
    heart_rate = np.array([[60.0, NAN], [70, NAN], [80, NAN], [90, NAN], [NAN, NAN]])
    phenotyping = make_tensor([1, 2, 3, 4, 5], [2] * 5, {"Heart Rate": heart_rate})
    mortality = make_tensor([1, 2, 3, 4], [2] * 4, {"Heart Rate": heart_rate[:4]})
    labels = pd.DataFrame({"stay_id": [1, 2, 3, 4, 5], "ph_chf": [0, 1, 0, 1, 1], "ph_shock": 0,
                           "mortality": [1, 0, 0, 0, 0]})
    monkeypatch.setattr(realism, "SIGNAL_SUMMARIES", {"ph_chf": ("Heart Rate", "mean"),
                                                      "ph_shock": ("Heart Rate", "min"),
                                                      "mortality": ("Heart Rate", "max")})
    profile = signal_aurocs(labels, phenotyping, mortality)
    assert list(profile["item"]) == ["ph_chf ~ mean Heart Rate", "ph_shock ~ min Heart Rate",
                                     "mortality ~ max Heart Rate"]
    chf, shock, death = profile.itertuples()
    assert (chf.value, chf.count, chf.n) == (0.75, 2, 4) and np.isnan(shock.value)
    assert (chf.ci_low, chf.ci_high) == tuple(pytest.approx(x) for x in hanley_mcneil_interval(0.75, 2, 2))
    assert (death.value, death.n) == (0.0, 4)  # the one death has the lowest maximum


def test_every_planted_ehr_signal_has_a_summary():
    ehr_carried = {label for label, kind in SIGNAL_MAP.items() if kind in ("ehr", "both")}
    assert ehr_carried <= set(realism.SIGNAL_SUMMARIES)


def test_profile_dataset_reads_the_pipeline_outputs(monkeypatch, tmp_path, stays, tensor):
    monkeypatch.setattr(realism, "SIGNAL_SUMMARIES", {"ph_respiratory_failure": ("Heart Rate", "mean"),
                                                      "mortality": ("Heart Rate", "mean")})
    (tmp_path / "cohort").mkdir(), (tmp_path / "ehr").mkdir()
    stays.to_parquet(tmp_path / "cohort" / "stays.parquet")
    phenotyping = make_tensor(stays["stay_id"], [4] * 6, {"Heart Rate": np.tile([[80.0, NAN]], (6, 2))})
    phenotyping.to_netcdf(tmp_path / "ehr" / "phenotyping.nc", engine="h5netcdf")
    tensor.assign_coords(stay_id=("stay", [3, 4])).to_netcdf(tmp_path / "ehr" / "mortality.nc", engine="h5netcdf")
    pd.DataFrame({"dicom_id": pd.Series([], dtype=object)}).to_parquet(tmp_path / "cohort" / "cxr_studies.parquet")
    without_images = profile_dataset(tmp_path / "cohort", tmp_path / "ehr")
    assert not without_images["family"].str.startswith("cxr_").any()
    assert values(without_images, "observed_share")["Heart Rate"] == pytest.approx(5 / 6)  # the mortality tensor
    aurocs = values(without_images, "signal_auroc")
    assert aurocs["ph_respiratory_failure ~ mean Heart Rate"] == 0.5  # every stay's mean is 80
    assert aurocs["mortality ~ mean Heart Rate"] == 0.0  # stay 4 (died): mean 75 vs stay 3: 230 / 3
    cxr_studies([(3, "AP", -10.0), (3, "AP", 20.0), (4, "AP", 30.0)]).to_parquet(
        tmp_path / "cohort" / "cxr_studies.parquet")
    with_images = profile_dataset(tmp_path / "cohort", tmp_path / "ehr")
    assert values(with_images, "cxr_paired_share") == {"": pytest.approx(4 / 6)}
    # stay 3's films are 30 h apart, but its EHR has 2 observed hours in between (6 needed): no pair
    assert values(with_images, "ddl_pairs_per_stay") == {"": 0.0}
    assert values(with_images, "xray_age_median") == {"": 23.0}  # ages 28 (stay 3) and 18 (stay 4)
    assert list(with_images.columns) == realism.PROFILE_COLUMNS


def cxr_studies(films: list[tuple[int, str, float]]) -> pd.DataFrame:
    """cxr_studies.parquet rows of (stay_id, view, hours from intime) films, one study each."""
    frame = pd.DataFrame(films, columns=["stay_id", "view_position", "hours_from_intime"])
    frame["subject_id"] = frame["stay_id"] * 10
    frame["study_id"] = np.arange(len(frame)) + 100
    frame["dicom_id"] = "d" + frame["study_id"].astype(str)
    frame["path"] = frame["dicom_id"] + ".jpg"
    for label in CHEXPERT_LABELS:
        frame[label] = 0.0
    return frame


def test_ddl_cxr_measures_count_pairs_and_ages_over_prediction_stays(stays):
    films = cxr_studies([(3, "AP", -10.0), (3, "AP", 5.0), (3, "AP", 30.0), (4, "AP", 10.0),
                         (1, "AP", 0.0), (1, "AP", 20.0),  # stay 1 is outside the mortality task
                         (5, "PA", 10.0)])  # not AP: stay 5 is no prediction stay
    phenotyping = make_tensor(stays["stay_id"], [48] * 6, {"Heart Rate": np.full((6, 48), 80.0)})
    profile = ddl_cxr_measures(stays, films, phenotyping)
    # prediction stays 3 and 4; stay 3's pairs: (-10, 5) 15 h apart with bins 0-5 observed, (-10, 30), (5, 30)
    assert values(profile, "ddl_pairs_per_stay") == {"": 1.5}
    assert values(profile, "ddl_stays_with_pairs") == {"": 0.5}
    assert values(profile, "xray_age_median") == {"": 28.0}  # ages 18 (stay 3) and 38 (stay 4)
    assert profile.loc[profile["family"] == "xray_age_median", "detail"].item() == "IQR 23.0-33.0 h"


def profile_rows(*rows) -> pd.DataFrame:
    """Profile rows (family, item, value, ci_low, ci_high)."""
    frame = pd.DataFrame(rows, columns=["family", "item", "value", "ci_low", "ci_high"])
    return frame.assign(count=NAN, n=100.0, detail="")[realism.PROFILE_COLUMNS]


def test_compare_holds_each_family_to_its_target():
    real = profile_rows(
        ("observed_share", "Heart Rate", 0.5, NAN, NAN), ("observed_share", "pH", 0.5, NAN, NAN),
        ("median", "Heart Rate", 100, NAN, NAN), ("iqr", "Heart Rate", 20, NAN, NAN),
        ("median", "pH", 7.4, NAN, NAN), ("iqr", "pH", 0.1, NAN, NAN),
        ("p01", "Heart Rate", 10, NAN, NAN), ("p99", "Heart Rate", 110, NAN, NAN),
        ("tail_share", "Heart Rate < 40", 0.04, NAN, NAN), ("tail_share", "Glucose < 100", 0.04, NAN, NAN),
        ("phenotype_prevalence", "ph_chf", 0.1, 0.06, 0.17), ("phenotype_prevalence", "ph_shock", 0.1, 0.09, 0.11),
        ("phenotype_prevalence", "ph_copd", 0.1, 0.06, 0.17),
        ("mortality_rise", ">96 h − ≤48 h", 0.1, NAN, NAN),
        ("signal_auroc", "a", 0.7, 0.6, 0.8), ("signal_auroc", "b", 0.3, 0.2, 0.4),
        ("signal_auroc", "c", 0.52, 0.4, 0.64), ("signal_auroc", "d", 0.6, 0.45, 0.75),
        ("signal_auroc", "e", NAN, NAN, NAN), ("observed_share", "Weight", 0.1, NAN, NAN))
    synthetic = profile_rows(
        ("cxr_paired_share", "", 0.30, NAN, NAN), ("cxr_rate_gap", "died − survived", 0.0, NAN, NAN),
        ("cxr_rate_gap", "ph_respiratory_failure: positive − negative", 0.02, NAN, NAN),
        ("cxr_rate_by_los", "≤48 h", 0.4, NAN, NAN),
        ("observed_share", "Heart Rate", 0.58, NAN, NAN), ("observed_share", "pH", 0.61, NAN, NAN),
        ("median", "Heart Rate", 109, NAN, NAN), ("median", "pH", 7.46, NAN, NAN),
        ("iqr", "Heart Rate", 29, NAN, NAN), ("iqr", "pH", 0.14, NAN, NAN),
        ("p01", "Heart Rate", 29, NAN, NAN), ("p99", "Heart Rate", 135, NAN, NAN),
        ("tail_share", "Heart Rate < 40", 0.085, NAN, NAN), ("tail_share", "Glucose < 100", 0.005, NAN, NAN),
        ("phenotype_prevalence", "ph_chf", 0.16, NAN, NAN), ("phenotype_prevalence", "ph_shock", 0.149, NAN, NAN),
        ("phenotype_prevalence", "ph_copd", 0.04, NAN, NAN),
        ("mortality_rise", ">96 h − ≤48 h", -0.01, NAN, NAN),
        ("signal_auroc", "a", 0.6, NAN, NAN), ("signal_auroc", "b", 0.6, NAN, NAN),
        ("signal_auroc", "c", 0.9, NAN, NAN), ("signal_auroc", "d", 0.1, NAN, NAN),
        ("signal_auroc", "e", 0.7, NAN, NAN))
    table = compare(synthetic, real).set_index("aspect")
    expected = {
        "cxr_paired_share": True,                                   # 26.5% ± 4 pp
        "cxr_rate_gap: died − survived": False,                     # must be > 0
        "cxr_rate_gap: ph_respiratory_failure: positive − negative": True,
        "cxr_rate_by_los: ≤48 h": None,                             # informational
        "observed_share: Heart Rate": True, "observed_share: pH": False,  # ± 10 pp
        "median: Heart Rate": True, "median: pH": False,            # ± half the real IQR: 10 and 0.05
        "iqr: Heart Rate": True, "iqr: pH": True,                   # ± 50%
        "p01: Heart Rate": True, "p99: Heart Rate": False,          # ± 20% of the width 100
        "tail_share: Heart Rate < 40": True, "tail_share: Glucose < 100": False,  # [0.01, 0.09]
        "phenotype_prevalence: ph_chf": True,                       # CI [0.06, 0.17] ∪ [0.05, 0.15]
        "phenotype_prevalence: ph_shock": True,                     # narrow CI: ± 5 pp
        "phenotype_prevalence: ph_copd": False,
        "mortality_rise: >96 h − ≤48 h": False,
        "signal_auroc: a": True, "signal_auroc: b": False,          # same side of 0.5 as the real one
        "signal_auroc: c": None, "signal_auroc: d": None,           # real within 0.5 ± 0.05 / its CI holds 0.5
        "signal_auroc: e": None,                                    # real undefined
        "observed_share: Weight": None,                             # only in the real profile
    }
    assert {aspect: (None if pd.isna(ok) else bool(ok)) for aspect, ok in table["ok"].items()} == expected
    assert list(table.index) == list(expected)  # synthetic rows first, in order, then real-only ones
    assert table.loc["cxr_paired_share", "real"] == 0.265
    assert table.loc["cxr_paired_share", "reference"].startswith("cited")
    assert table.loc["cxr_paired_share", "target"] == "26.5% ± 4 pp: [0.225, 0.305]"
    assert table.loc["cxr_rate_by_los: ≤48 h", "reference"] == "—"
    assert table.loc["signal_auroc: a", "target"] == "same side of 0.5 as real: > 0.5"
    assert table.loc["phenotype_prevalence: ph_chf", ["real_ci_low", "real_ci_high"]].tolist() == [0.06, 0.17]


REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "mimic-iv-demo"


@pytest.mark.skipif(not DEMO.exists(), reason=f"the MIMIC-IV demo v2.2 is not at {DEMO} (see ../shared/README)")
def test_default_synthetic_data_meets_every_realism_target(tmp_path):
    """The generator at its defaults against the real MIMIC-IV demo: every target of realism.TARGETS (X-ray
    availability, charting density, value distributions and tails, mortality by LOS, prevalences, directions of
    the planted effects) holds, so a generator change that drifts from reality fails here."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    demo_config = yaml.safe_load((REPO / "config" / "mimic_demo.yaml").read_text())
    defaults = {key: config["synthetic"][key] for key in ("cxr_paired_share", "signal_strength")}
    generate(tmp_path / "raw", n_stays=4000, seed=0, image_size=32, n_corrupt_images=0, **defaults)
    synthetic = realism.build_outputs(tmp_path / "raw" / "mimic-iv", tmp_path / "raw" / "mimic-cxr-jpg",
                                      tmp_path / "synthetic", config)
    real = realism.build_outputs(DEMO, None, tmp_path / "demo", demo_config)
    table = compare(profile_dataset(synthetic / "cohort", synthetic / "ehr"),
                    profile_dataset(real / "cohort", real / "ehr"))
    checked = table[table["ok"].notna()]
    assert len(checked) >= 120
    missed = checked[~checked["ok"].astype(bool)]
    assert missed.empty, missed[["aspect", "synthetic", "real", "target"]].to_string()
