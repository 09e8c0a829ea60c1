"""Cohort stage on the hand-written tiny MIMIC dataset (expected values worked out in tests/tiny_mimic.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ehrcxr.data import raw
from ehrcxr.data.cohort import (CXR_STUDY_DTYPES, EmptyCohortError, assign_splits, build_cohort, race_group,
                                run_cohort, write_cohort)
from ehrcxr.data.tasks import LOS_LABELS
from ehrcxr.resources import CHEXPERT_LABELS, phenotype_labels
from tiny_mimic import mimic_cxr_tables, mimic_iv_tables, mimic_iv_tables_as, write_tables, write_tiny_mimic

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "mimic-iv-demo"  # ../shared beside the checkout, as in CI
KEPT = [30000001, 30000003, 30000004, 30000008, 30000009, 30000051, 30000052]
PAIRED_T1_HOURS = 22 + 5 / 60 + 56.875 / 3600  # 2150-01-02 08:05:56.875 − intime 2150-01-01 10:00


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_mimic(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cohort(tiny) -> tuple[pd.DataFrame, pd.DataFrame]:
    return build_cohort(*tiny)


@pytest.fixture()
def editable(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the tiny dataset (without images) that a test may break."""
    iv_root, cxr_root = tmp_path / "mimic-iv", tmp_path / "mimic-cxr-jpg"
    write_tables(iv_root, mimic_iv_tables())
    write_tables(cxr_root, mimic_cxr_tables())
    return iv_root, cxr_root


def by_stay(stays: pd.DataFrame, column: str) -> dict:
    return dict(zip(stays["stay_id"], stays[column]))


def test_kept_stays_and_counts_per_rule(cohort) -> None:
    stays, _ = cohort
    assert stays["stay_id"].tolist() == KEPT
    assert stays.attrs["cohort_counts"] == {
        "ICU stays in icustays": 11, "with an admission and a patient row": 11, "with intime <= outtime": 11,
        "first_careunit == last_careunit": 10,  # 30000006 moves MICU -> SICU
        "only ICU stay of its admission": 8,    # 30000071 and 30000072 share admission 20000007
        "age >= 18": 7}                         # 30000002 is 17


def test_column_contract_and_dtypes(cohort) -> None:
    stays, cxr_studies = cohort
    assert list(stays.columns) == (
        ["subject_id", "hadm_id", "stay_id", "intime", "outtime", "admittime", "dischtime", "los_hours", "age",
         "gender", "race", "insurance", "admission_type", "mortality", "in_mortality_task"]
        + phenotype_labels() + LOS_LABELS + ["split", "cxr_dicom_id", "cxr_study_id", "cxr_hours"])
    dtypes = stays.dtypes.astype(str)
    assert {dtypes[c] for c in ["subject_id", "hadm_id", "stay_id", "age"]} == {"int64"}
    assert {dtypes[c] for c in ["intime", "outtime", "admittime", "dischtime"]} == {"datetime64[ns]"}
    assert {dtypes[c] for c in ["mortality", *phenotype_labels(), *LOS_LABELS]} == {"int8"}
    # one length-of-stay class per stay of at least 2 days, none for shorter stays
    classes = stays[LOS_LABELS].sum(axis=1)
    assert (classes == (stays["los_hours"] >= 48).astype(int)).all()
    assert (dtypes["in_mortality_task"], dtypes["cxr_study_id"], dtypes["cxr_hours"]) == ("bool", "Int64", "float64")
    assert list(cxr_studies.columns) == list(CXR_STUDY_DTYPES)
    assert cxr_studies.dtypes.astype(str).to_dict() == {c: str(np.dtype(d)) for c, d in CXR_STUDY_DTYPES.items()}


def test_demographics_ages_and_races(cohort) -> None:
    stays, _ = cohort
    # age = anchor_age + year(intime) - anchor_year; 30000003 is 18 although its anchor_age is 17.
    assert by_stay(stays, "age") == {30000001: 60, 30000003: 18, 30000004: 71, 30000008: 65, 30000009: 47,
                                     30000051: 50, 30000052: 51}
    assert by_stay(stays, "race") == {30000001: "WHITE", 30000003: "HISPANIC", 30000004: "BLACK",
                                      30000008: "HISPANIC", 30000009: "OTHER", 30000051: "ASIAN", 30000052: "OTHER"}
    assert by_stay(stays, "gender") == {30000001: "F", 30000003: "F", 30000004: "M", 30000008: "M", 30000009: "M",
                                        30000051: "F", 30000052: "F"}
    assert by_stay(stays, "insurance")[30000003] == "Medicaid"
    assert by_stay(stays, "admission_type")[30000008] == "OBSERVATION ADMIT"
    assert stays.loc[stays["stay_id"] == 30000001, "intime"].item() == pd.Timestamp("2150-01-01 10:00:00")


def test_race_groups_cover_the_mimic_vocabulary() -> None:
    race = pd.Series(["WHITE - RUSSIAN", "BLACK/CAPE VERDEAN", "HISPANIC OR LATINO", "LATINO", "SOUTH AMERICAN",
                      "ASIAN - SOUTH EAST ASIAN", "UNKNOWN", "UNABLE TO OBTAIN", "OTHER", "", None,
                      "AMERICAN INDIAN/ALASKA NATIVE", "PATIENT DECLINED TO ANSWER", "PORTUGUESE"])
    assert race_group(race).tolist() == ["WHITE", "BLACK", "HISPANIC", "HISPANIC", "HISPANIC", "ASIAN"] + ["OTHER"] * 8


def test_mortality_length_and_task_membership(cohort) -> None:
    stays, _ = cohort
    # 30000003 and 30000009 die via deathtime, 30000004 via dod on its discharge date; 30000052's dod
    # (2181-02-15) is after its discharge (2181-01-10), so it is not an in-hospital death.
    assert by_stay(stays, "mortality") == {30000001: 0, 30000003: 1, 30000004: 1, 30000008: 0, 30000009: 1,
                                           30000051: 0, 30000052: 0}
    assert by_stay(stays, "los_hours") == {30000001: 96.0, 30000003: 24.0, 30000004: 96.0, 30000008: 48.0,
                                           30000009: 120.0, 30000051: 72.0, 30000052: 30.0}
    assert by_stay(stays, "in_mortality_task") == {30000001: True, 30000003: False, 30000004: True,
                                                   30000008: True, 30000009: True, 30000051: True, 30000052: False}


def test_phenotypes_respect_icd_version(cohort) -> None:
    stays, _ = cohort
    expected = {
        30000001: {"ph_septicemia", "ph_essential_hypertension", "ph_acute_renal_failure"},  # '0389' ICD-9
        30000003: {"ph_septicemia", "ph_respiratory_failure"},  # not hypertension: '4019' given as ICD-10
        30000004: {"ph_cardiac_dysrhythmias"},                  # not hypertension: 'I10' given as ICD-9
        30000008: set(),
        30000009: {"ph_pneumonia", "ph_shock", "ph_septicemia"},
        30000051: {"ph_essential_hypertension", "ph_diabetes_uncomplicated"},
        30000052: {"ph_chf", "ph_other_lower_respiratory", "ph_respiratory_failure"},  # 'J99' is in two groups
    }
    labels = phenotype_labels()
    assert len(labels) == 25
    for stay_id, positives in expected.items():
        row = stays.loc[stays["stay_id"] == stay_id, labels].iloc[0]
        assert set(row.index[row == 1]) == positives, stay_id
        assert set(row.unique()) <= {0, 1}


def test_pairing_picks_latest_ap_image_in_window(cohort) -> None:
    stays, _ = cohort
    assert by_stay(stays, "cxr_dicom_id") == {
        30000001: "s1-ap-plus22h-b", 30000003: "s3-ap-plus10h", 30000004: None, 30000008: None, 30000009: None,
        30000051: None, 30000052: "s5-ap-at-intime"}
    assert by_stay(stays, "cxr_study_id") == {30000001: 50000104, 30000003: 50000301, 30000004: pd.NA,
                                              30000008: pd.NA, 30000009: pd.NA, 30000051: pd.NA, 30000052: 50000504}
    hours = by_stay(stays, "cxr_hours")
    assert hours[30000001] == pytest.approx(PAIRED_T1_HOURS, abs=1e-9)
    assert (hours[30000003], hours[30000052]) == (10.0, 0.0)
    assert all(np.isnan(hours[s]) for s in (30000004, 30000008, 30000009, 30000051))


def test_cxr_studies_candidate_rows(cohort) -> None:
    _, cxr_studies = cohort
    rows = {(s, d): (h, p) for s, d, h, p in cxr_studies[["stay_id", "dicom_id", "hours_from_intime", "paired"]]
            .itertuples(index=False)}
    expected = {
        (30000001, "s1-ap-minus14h"): (-14.0, False), (30000001, "s1-ap-plus5h"): (5.0, False),
        (30000001, "s1-ap-plus22h-a"): (PAIRED_T1_HOURS, False), (30000001, "s1-ap-plus22h-b"): (PAIRED_T1_HOURS, True),
        (30000001, "s1-lateral-plus22h"): (PAIRED_T1_HOURS, False), (30000001, "s1-pa-plus34h"): (34.0, False),
        (30000001, "s1-blank-plus37h"): (37.0, False), (30000001, "s1-ap-plus60h"): (60.0, False),
        (30000003, "s3-ap-plus10h"): (10.0, True), (30000051, "s5-ap-plus50h"): (50.0, False),
        (30000052, "s5-ap-minus1h"): (-1.0, False), (30000052, "s5-ap-at-intime"): (0.0, True),
        (30000008, "s8-pa-plus6h"): (6.0, False), (30000008, "s8-lateral-plus6h"): (6.0, False),
        (30000008, "s8-blank-plus6h"): (6.0, False),
    }
    assert set(rows) == set(expected)
    for key, (hours, paired) in expected.items():
        assert rows[key][0] == pytest.approx(hours, abs=1e-9), key
        assert rows[key][1] is paired, key
    image = cxr_studies.set_index("dicom_id").loc["s1-ap-plus22h-b"]
    assert image["path"] == "files/p10/p10000001/s50000104/s1-ap-plus22h-b.jpg"
    assert (image["subject_id"], image["study_id"], image["view_position"]) == (10000001, 50000104, "AP")
    assert image["study_time"] == pd.Timestamp("2150-01-02 08:05:56.875")
    assert [image[c] for c in ("Atelectasis", "Cardiomegaly", "Edema", "Support Devices")] == [1.0, -1.0, 0.0, 1.0]
    assert np.isnan(image["Pneumonia"])
    blank = cxr_studies.set_index("dicom_id").loc["s8-blank-plus6h"]
    assert blank["view_position"] is None
    assert blank[CHEXPERT_LABELS].isna().all()  # study 50000801 has no CheXpert row


def test_window_and_task_length_parameters(tiny) -> None:
    stays, cxr_studies = build_cohort(*tiny, cxr_window_hours=(0, 12), mortality_min_hours=96)
    # In [0, 12] h: 30000001's latest AP is 's1-ap-plus5h'; 30000003 (10 h) and 30000052 (0 h) are unchanged.
    assert by_stay(stays, "cxr_dicom_id") == {
        30000001: "s1-ap-plus5h", 30000003: "s3-ap-plus10h", 30000004: None, 30000008: None, 30000009: None,
        30000051: None, 30000052: "s5-ap-at-intime"}
    assert set(stays.loc[stays["in_mortality_task"], "stay_id"]) == {30000001, 30000004, 30000009}
    assert len(cxr_studies) == 15 and cxr_studies["paired"].sum() == 3


def test_without_cxr_root_everything_is_unpaired(tiny, cohort) -> None:
    stays, cxr_studies = build_cohort(tiny[0])
    assert stays["cxr_dicom_id"].isna().all() and stays["cxr_study_id"].isna().all()
    assert stays["cxr_hours"].isna().all()
    assert cxr_studies.empty
    assert cxr_studies.dtypes.to_dict() == cohort[1].dtypes.to_dict()
    labelled = cohort[0].drop(columns=["cxr_dicom_id", "cxr_study_id", "cxr_hours"])
    pd.testing.assert_frame_equal(stays.drop(columns=["cxr_dicom_id", "cxr_study_id", "cxr_hours"]), labelled)


def test_splits_by_subject_and_seeded(tiny, cohort) -> None:
    stays, _ = cohort
    assert stays.groupby("subject_id")["split"].nunique().max() == 1  # 30000051/30000052 share a split
    # 6 subjects: round(0.7·6) = 4 train, round(0.8·6) − 4 = 1 val, 1 test.
    assert stays.groupby("split")["subject_id"].nunique().to_dict() == {"train": 4, "val": 1, "test": 1}
    again, _ = build_cohort(tiny[0], split_seed=0)
    assert again["split"].tolist() == stays["split"].tolist()
    other = [build_cohort(tiny[0], split_seed=seed)[0]["split"].tolist() for seed in (1, 2, 3)]
    assert any(o != stays["split"].tolist() for o in other)


def test_assign_splits_proportions_and_determinism() -> None:
    subjects = np.random.default_rng(42).choice(np.arange(10_000_000, 20_000_000), size=1000, replace=False)
    splits = assign_splits(pd.Series(np.concatenate([subjects, subjects[:50]])), (0.7, 0.1, 0.2), seed=7)
    assert splits.index.is_unique and len(splits) == 1000
    assert splits.value_counts().to_dict() == {"train": 700, "test": 200, "val": 100}
    shuffled = np.random.default_rng(7).permutation(np.sort(subjects))
    assert set(splits[splits == "train"].index) == set(shuffled[:700])
    assert set(splits[splits == "val"].index) == set(shuffled[700:800])
    assert assign_splits(subjects[::-1], (0.7, 0.1, 0.2), seed=7).sort_index().equals(splits.sort_index())
    assert not assign_splits(subjects, (0.7, 0.1, 0.2), seed=8).sort_index().equals(splits.sort_index())
    assert assign_splits(subjects, (0.8, 0.0, 0.2), seed=7).value_counts().to_dict() == {"train": 800, "test": 200}
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(subjects, (0.7, 0.2, 0.2))


def test_run_cohort_writes_parquet_and_logs_counts(tiny, cohort, tmp_path, caplog) -> None:
    params = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["cohort"]
    out_stays, out_cxr = tmp_path / "cohort" / "stays.parquet", tmp_path / "cohort" / "cxr_studies.parquet"
    with caplog.at_level(logging.INFO, logger="ehrcxr.cohort"):
        run_cohort(*tiny, out_stays, out_cxr, params)
    assert "first_careunit == last_careunit:" in caplog.text and "age >= 18:" in caplog.text
    assert "split train:      4 subjects" in caplog.text
    stays, cxr_studies = pd.read_parquet(out_stays), pd.read_parquet(out_cxr)
    pd.testing.assert_frame_equal(stays, cohort[0], check_like=False)
    pd.testing.assert_frame_equal(cxr_studies, cohort[1])
    empty_path = tmp_path / "empty.parquet"
    write_cohort(stays, cohort[1].iloc[:0], tmp_path / "s.parquet", empty_path)
    assert pd.read_parquet(empty_path).dtypes.to_dict() == cohort[1].dtypes.to_dict()


def test_missing_files_and_columns_are_reported_together(editable) -> None:
    iv_root, cxr_root = editable
    (iv_root / "hosp" / "patients.csv.gz").unlink()
    write_tables(iv_root, {"hosp/admissions": mimic_iv_tables()["hosp/admissions"].drop(columns=["race"])})
    with pytest.raises(raw.RawDataError) as error:
        build_cohort(iv_root, cxr_root)
    assert "hosp/patients.csv.gz" in str(error.value)
    assert "admissions.csv.gz: missing column(s) race" in str(error.value)


@pytest.mark.parametrize("release,suffix", [("v1.0", ".csv"), ("v2.0", ".csv.gz"), ("v3-style", ".csv.gz")])
def test_other_release_layouts_give_the_same_cohort(cohort, tmp_path, release, suffix) -> None:
    # v1.0: core/patients + core/admissions, 'ethnicity', plain .csv, CXR tables uncompressed too;
    # v3-style: extra columns and another column order. The workflow entry checks every table first.
    iv_root, cxr_root = tmp_path / "mimic-iv", tmp_path / "mimic-cxr-jpg"
    write_tables(iv_root, mimic_iv_tables_as(release), suffix)
    write_tables(cxr_root, mimic_cxr_tables(), suffix)
    out_stays, out_cxr = tmp_path / "stays.parquet", tmp_path / "cxr_studies.parquet"
    stays, cxr_studies = run_cohort(iv_root, cxr_root, out_stays, out_cxr, {})
    pd.testing.assert_frame_equal(stays, cohort[0])
    pd.testing.assert_frame_equal(cxr_studies, cohort[1])
    assert by_stay(stays, "race")[30000003] == "HISPANIC"  # read from 'ethnicity' in v1.0
    assert stays.loc[stays["stay_id"] == 30000001, "ph_septicemia"].item() == 1  # ICD-9 '0389' kept its zero


def test_v1_layout_check_names_both_locations_and_renamed_column(editable, tmp_path) -> None:
    iv_root, cxr_root = tmp_path / "v1", editable[1]
    tables = mimic_iv_tables_as("v1.0")
    tables["icu/icustays"] = tables["icu/icustays"].rename(columns={"subject_id": "subjectid"})
    del tables["core/admissions"]
    write_tables(iv_root, tables, ".csv")
    out_stays = tmp_path / "out" / "stays.parquet"
    with pytest.raises(raw.RawDataError) as error:
        run_cohort(iv_root, cxr_root, out_stays, tmp_path / "out" / "cxr_studies.parquet", {})
    message = str(error.value)
    assert f"{iv_root}/hosp/admissions.csv.gz (or .csv); nor {iv_root}/core/admissions.csv.gz (or .csv)" in message
    assert f"{iv_root}/icu/icustays.csv: missing column(s) subject_id" in message
    assert not out_stays.exists()


def test_flat_image_layout_changes_only_the_path(cohort, tiny) -> None:
    _, flat = build_cohort(*tiny, cxr_image_layout="flat")
    assert flat["path"].tolist() == [f"{dicom}.jpg" for dicom in cohort[1]["dicom_id"]]
    assert flat.set_index("dicom_id").loc["s1-ap-plus22h-b", "path"] == "s1-ap-plus22h-b.jpg"
    pd.testing.assert_frame_equal(flat.drop(columns="path"), cohort[1].drop(columns="path"))


def test_unknown_image_layout_fails_before_reading(tmp_path) -> None:
    with pytest.raises(ValueError, match="cxr_image_layout must be one of official, flat, got 'p10'"):
        build_cohort(tmp_path / "nothing-here", tmp_path / "nor-here", cxr_image_layout="p10")


def test_workflow_entry_checks_event_tables_before_any_work(editable, tmp_path) -> None:
    iv_root, cxr_root = editable
    write_tables(iv_root, {"icu/chartevents": mimic_iv_tables()["icu/chartevents"].drop(columns=["valuenum"])})
    out_stays = tmp_path / "out" / "stays.parquet"
    with pytest.raises(raw.RawDataError, match=r"chartevents.csv.gz: missing column\(s\) valuenum"):
        run_cohort(iv_root, cxr_root, out_stays, tmp_path / "out" / "cxr_studies.parquet", {})
    assert not out_stays.exists()


def test_missing_cxr_file_and_column(editable) -> None:
    iv_root, cxr_root = editable
    (cxr_root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    write_tables(cxr_root, {"mimic-cxr-2.0.0-metadata": mimic_cxr_tables()["mimic-cxr-2.0.0-metadata"]
                            .drop(columns=["StudyTime"])})
    with pytest.raises(raw.RawDataError) as error:
        build_cohort(iv_root, cxr_root)
    assert "mimic-cxr-2.0.0-chexpert.csv.gz" in str(error.value)
    assert "metadata.csv.gz: missing column(s) StudyTime" in str(error.value)


def test_unparsable_timestamps_name_file_column_and_row(editable) -> None:
    iv_root, cxr_root = editable
    icustays = mimic_iv_tables()["icu/icustays"]
    icustays.loc[2, "intime"] = "2141-03-01 25:00:00"
    write_tables(iv_root, {"icu/icustays": icustays})
    with pytest.raises(raw.RawDataError, match=r"icustays.csv.gz: column 'intime', data row 3: cannot parse"):
        build_cohort(iv_root, cxr_root)
    write_tables(iv_root, {"icu/icustays": mimic_iv_tables()["icu/icustays"]})
    patients = mimic_iv_tables()["hosp/patients"]
    patients.loc[3, "dod"] = "20-06-2171x"
    write_tables(iv_root, {"hosp/patients": patients})
    with pytest.raises(raw.RawDataError, match=r"patients.csv.gz: column 'dod', data row 4"):
        build_cohort(iv_root, cxr_root)
    write_tables(iv_root, {"hosp/patients": mimic_iv_tables()["hosp/patients"]})
    metadata = mimic_cxr_tables()["mimic-cxr-2.0.0-metadata"]
    metadata.loc[5, "StudyDate"] = 21501345  # month 13
    write_tables(cxr_root, {"mimic-cxr-2.0.0-metadata": metadata})
    with pytest.raises(raw.RawDataError, match=r"metadata.csv.gz: columns 'StudyDate'/'StudyTime', data row 6"):
        build_cohort(iv_root, cxr_root)


def test_non_numeric_id_surfaces_with_column_and_row(editable) -> None:
    iv_root, cxr_root = editable
    admissions = mimic_iv_tables()["hosp/admissions"].astype({"hadm_id": str})
    admissions.loc[1, "hadm_id"] = "H2"
    write_tables(iv_root, {"hosp/admissions": admissions})
    with pytest.raises(raw.RawDataError, match=r"admissions.csv.gz: column 'hadm_id', data row 2: value 'H2'"):
        build_cohort(iv_root, cxr_root)


def test_empty_cohort_names_the_rule(editable) -> None:
    iv_root, cxr_root = editable
    with pytest.raises(EmptyCohortError, match="after the rule 'age >= 200'"):
        build_cohort(iv_root, cxr_root, min_age=200)
    icustays = mimic_iv_tables()["icu/icustays"]
    icustays["last_careunit"] = "Trauma SICU (TSICU)"
    write_tables(iv_root, {"icu/icustays": icustays})
    with pytest.raises(EmptyCohortError, match="after the rule 'first_careunit == last_careunit'"):
        build_cohort(iv_root, cxr_root)


def test_bad_parameters_are_rejected(tiny) -> None:
    with pytest.raises(ValueError, match="lookback"):
        build_cohort(*tiny, cxr_window_hours=(-48, 48), cxr_lookback_hours=24)
    with pytest.raises(ValueError, match="start <= end"):
        build_cohort(*tiny, cxr_window_hours=(48, 0))
    with pytest.raises(ValueError, match="summing to 1"):
        build_cohort(*tiny, split=(0.5, 0.1, 0.1))


@pytest.mark.skipif(not (DEMO / "icu" / "icustays.csv.gz").exists(), reason="MIMIC-IV demo not available")
def test_real_mimic_iv_demo() -> None:
    stays, cxr_studies = build_cohort(DEMO)
    # Independent re-derivation of the stay rules with plain pandas on the raw files.
    icu = pd.read_csv(DEMO / "icu" / "icustays.csv.gz", parse_dates=["intime"])
    adm = pd.read_csv(DEMO / "hosp" / "admissions.csv.gz")
    pat = pd.read_csv(DEMO / "hosp" / "patients.csv.gz")
    icu = icu[icu["first_careunit"] == icu["last_careunit"]]
    icu = icu[icu["hadm_id"].map(icu["hadm_id"].value_counts()) == 1].merge(pat, on="subject_id")
    icu["age"] = icu["anchor_age"] + icu["intime"].dt.year - icu["anchor_year"]
    icu = icu[icu["age"] >= 18].merge(adm[["hadm_id", "hospital_expire_flag"]], on="hadm_id")
    assert sorted(stays["stay_id"]) == sorted(icu["stay_id"])
    merged = stays.merge(icu[["stay_id", "age", "hospital_expire_flag"]], on="stay_id")
    assert (merged["age_x"] == merged["age_y"]).all()
    assert (merged["mortality"] == merged["hospital_expire_flag"]).all()  # v2+: an equivalent death flag
    assert stays.groupby("subject_id")["split"].nunique().max() == 1
    assert cxr_studies.empty and stays["cxr_dicom_id"].isna().all()
