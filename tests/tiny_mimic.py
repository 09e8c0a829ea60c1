"""A tiny hand-written MIMIC-IV v2.2 + MIMIC-CXR-JPG v2.0.0 dataset that exercises every cohort rule.

Official file names and column order, gzip-compressed CSVs, 8×8 grayscale JPEGs. Every value is typed
by hand; the expected cohort outcome of each row is written next to it (default cohort parameters:
min_age 18, mortality_min_hours 48, pairing window [0, 48] h, candidate lookback 24 h).

Subjects (S), admissions (H) and ICU stays (T):

| subject  | hadm     | stay     | what it tests                                    | kept |
|----------|----------|----------|--------------------------------------------------|------|
| 10000001 | 20000001 | 30000001 | 96 h, WHITE, ICD-9 '0389' (leading zero), CXR mix | yes  |
| 10000002 | 20000002 | 30000002 | a minor: anchor_age 16 in 2160, stay 2161 → 17   | no (age) |
| 10000003 | 20000003 | 30000003 | 24 h stay, anchor_age 17 in 2140, stay 2141 → 18; death via deathtime | yes |
| 10000004 | 20000004 | 30000004 | death via dod only (dod = discharge date)        | yes  |
| 10000005 | 20000051 | 30000051 | two admissions of one subject (first: 72 h)       | yes  |
| 10000005 | 20000052 | 30000052 | second admission, 30 h, dod after discharge → 0  | yes  |
| 10000006 | 20000006 | 30000006 | careunit changes (MICU → SICU)                   | no (careunit) |
| 10000007 | 20000007 | 30000071, 30000072 | two ICU stays in one admission         | no (one stay) |
| 10000008 | 20000008 | 30000008 | exactly 48 h, only PA/LATERAL/blank CXR          | yes  |
| 10000009 | 20000009 | 30000009 | 120 h, death via deathtime after ICU discharge, blank race | yes |

Expected stays (age, race group, mortality, in_mortality_task, positive phenotypes):
  30000001: 60, WHITE,    0, True,  septicemia + essential_hypertension + acute_renal_failure
  30000003: 18, HISPANIC, 1, False, septicemia + respiratory_failure   ('4019' under ICD-10 does not count)
  30000004: 71, BLACK,    1, True,  cardiac_dysrhythmias                ('I10' under ICD-9 does not count)
  30000051: 50, ASIAN,    0, True,  essential_hypertension + diabetes_uncomplicated
  30000052: 51, OTHER,    0, False, chf + other_lower_respiratory + respiratory_failure ('J99' is in both)
  30000008: 65, HISPANIC, 0, True,  none                                ('SOUTH AMERICAN' → HISPANIC)
  30000009: 47, OTHER,    1, True,  pneumonia + shock + septicemia      (blank race → OTHER)

Expected CXR pairing: 30000001 → 's1-ap-plus22h-b' (study 50000104, 22 + 5/60 + 56.875/3600 h; the tie
with 's1-ap-plus22h-a' at the same time goes to the larger dicom_id), 30000003 → 's3-ap-plus10h' (10 h),
30000052 → 's5-ap-at-intime' (0 h), all others unpaired. The 15 candidate images are listed in CXR_METADATA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

MICU = "Medical Intensive Care Unit (MICU)"
SICU = "Surgical Intensive Care Unit (SICU)"
CCU = "Coronary Care Unit (CCU)"
MICU_SICU = "Medical/Surgical Intensive Care Unit (MICU/SICU)"

PATIENTS = pd.DataFrame(
    [  # subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod
        (10000001, "F", 60, 2150, "2011 - 2013", None),
        (10000002, "M", 16, 2160, "2014 - 2016", None),
        (10000003, "F", 17, 2140, "2008 - 2010", "2141-03-04"),
        (10000004, "M", 70, 2170, "2017 - 2019", "2171-06-20"),  # dies on the discharge date
        (10000005, "F", 50, 2180, "2011 - 2013", "2181-02-15"),  # dies a month after the last discharge
        (10000006, "M", 40, 2130, "2008 - 2010", None),
        (10000007, "F", 80, 2145, "2014 - 2016", None),
        (10000008, "M", 65, 2190, "2017 - 2019", None),
        (10000009, "M", 45, 2120, "2008 - 2010", "2122-04-06"),
    ], columns=["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"])

_ADMISSION_COLUMNS = [
    "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admit_provider_id",
    "admission_location", "discharge_location", "insurance", "language", "marital_status", "race", "edregtime",
    "edouttime", "hospital_expire_flag"]
ADMISSIONS = pd.DataFrame(
    [
        (10000001, 20000001, "2150-01-01 08:00:00", "2150-01-10 12:00:00", None, "EW EMER.", "P10001",
         "EMERGENCY ROOM", "HOME", "Medicare", "ENGLISH", "MARRIED", "WHITE", "2150-01-01 06:30:00",
         "2150-01-01 08:30:00", 0),
        (10000002, 20000002, "2161-05-01 10:00:00", "2161-05-05 10:00:00", None, "URGENT", "P10002",
         "PHYSICIAN REFERRAL", "HOME", "Other", "ENGLISH", "SINGLE", "WHITE", None, None, 0),
        (10000003, 20000003, "2141-03-01 09:00:00", "2141-03-04 10:00:00", "2141-03-04 10:00:00", "EW EMER.",
         "P10003", "EMERGENCY ROOM", "DIED", "Medicaid", "SPANISH", "SINGLE", "HISPANIC/LATINO - PUERTO RICAN",
         "2141-03-01 07:00:00", "2141-03-01 09:30:00", 1),
        (10000004, 20000004, "2171-06-10 09:00:00", "2171-06-20 14:00:00", None, "URGENT", "P10004",
         "TRANSFER FROM HOSPITAL", "HOSPICE", "Medicare", "ENGLISH", "WIDOWED", "BLACK/AFRICAN AMERICAN", None,
         None, 0),
        (10000005, 20000051, "2180-05-01 10:00:00", "2180-05-08 12:00:00", None, "ELECTIVE", "P10005",
         "PHYSICIAN REFERRAL", "HOME", "Other", "?", "MARRIED", "ASIAN - CHINESE", None, None, 0),
        (10000005, 20000052, "2181-01-01 20:00:00", "2181-01-10 11:00:00", None, "EW EMER.", "P10005",
         "EMERGENCY ROOM", "HOME HEALTH CARE", "Other", "?", "MARRIED", "UNKNOWN", "2181-01-01 18:00:00",
         "2181-01-01 20:30:00", 0),
        (10000006, 20000006, "2131-02-01 08:00:00", "2131-02-08 12:00:00", None, "URGENT", "P10006",
         "TRANSFER FROM HOSPITAL", "HOME", "Medicaid", "ENGLISH", "SINGLE", "WHITE", None, None, 0),
        (10000007, 20000007, "2146-08-01 08:00:00", "2146-08-20 12:00:00", None, "EW EMER.", "P10007",
         "EMERGENCY ROOM", "SKILLED NURSING FACILITY", "Medicare", "ENGLISH", "WIDOWED", "WHITE",
         "2146-08-01 06:00:00", "2146-08-01 08:30:00", 0),
        (10000008, 20000008, "2190-07-01 02:00:00", "2190-07-06 10:00:00", None, "OBSERVATION ADMIT", "P10008",
         "WALK-IN/SELF REFERRAL", "HOME", "Medicaid", "ENGLISH", "SINGLE", "SOUTH AMERICAN", None, None, 0),
        (10000009, 20000009, "2122-03-30 07:00:00", "2122-04-06 18:30:00", "2122-04-06 18:30:00", "EW EMER.",
         "P10009", "EMERGENCY ROOM", "DIED", "Medicare", "ENGLISH", "MARRIED", None, "2122-03-30 05:00:00",
         "2122-03-30 07:30:00", 1),
    ], columns=_ADMISSION_COLUMNS)

ICUSTAYS = pd.DataFrame(
    [  # subject_id, hadm_id, stay_id, first_careunit, last_careunit, intime, outtime, los (days)
        (10000001, 20000001, 30000001, MICU, MICU, "2150-01-01 10:00:00", "2150-01-05 10:00:00", 4.0),
        (10000002, 20000002, 30000002, MICU, MICU, "2161-05-01 12:00:00", "2161-05-04 12:00:00", 3.0),
        (10000003, 20000003, 30000003, SICU, SICU, "2141-03-01 12:00:00", "2141-03-02 12:00:00", 1.0),
        (10000004, 20000004, 30000004, CCU, CCU, "2171-06-10 12:00:00", "2171-06-14 12:00:00", 4.0),
        (10000005, 20000051, 30000051, MICU, MICU, "2180-05-01 12:00:00", "2180-05-04 12:00:00", 3.0),
        (10000005, 20000052, 30000052, CCU, CCU, "2181-01-02 08:00:00", "2181-01-03 14:00:00", 1.25),
        (10000006, 20000006, 30000006, MICU, SICU, "2131-02-01 12:00:00", "2131-02-04 12:00:00", 3.0),
        (10000007, 20000007, 30000071, MICU, MICU, "2146-08-01 12:00:00", "2146-08-04 12:00:00", 3.0),
        (10000007, 20000007, 30000072, MICU, MICU, "2146-08-10 12:00:00", "2146-08-13 12:00:00", 3.0),
        (10000008, 20000008, 30000008, MICU_SICU, MICU_SICU, "2190-07-01 06:00:00", "2190-07-03 06:00:00", 2.0),
        (10000009, 20000009, 30000009, MICU, MICU, "2122-03-30 10:00:00", "2122-04-04 10:00:00", 5.0),
    ], columns=["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"])

DIAGNOSES_ICD = pd.DataFrame(
    [  # subject_id, hadm_id, seq_num, icd_code, icd_version
        (10000001, 20000001, 1, "0389", 9),    # septicemia (leading zero must survive)
        (10000001, 20000001, 2, "4019", 9),    # essential hypertension
        (10000001, 20000001, 3, "5849", 9),    # acute renal failure
        (10000001, 20000001, 4, "V707", 9),    # no phenotype
        (10000002, 20000002, 1, "0389", 9),    # minor: dropped stay
        (10000003, 20000003, 1, "A419", 10),   # septicemia
        (10000003, 20000003, 2, "J9600", 10),  # respiratory failure
        (10000003, 20000003, 3, "4019", 10),   # ICD-9 text under version 10: no phenotype
        (10000004, 20000004, 1, "42731", 9),   # cardiac dysrhythmias
        (10000004, 20000004, 2, "I10", 9),     # ICD-10 text under version 9: no phenotype
        (10000005, 20000051, 1, "I10", 10),    # essential hypertension
        (10000005, 20000051, 2, "E119", 10),   # diabetes without complication
        (10000005, 20000052, 1, "4280", 9),    # congestive heart failure
        (10000005, 20000052, 2, "J99", 10),    # other lower respiratory AND respiratory failure
        (10000007, 20000007, 1, "0389", 9),    # two-stay admission: dropped
        (10000009, 20000009, 1, "486", 9),     # pneumonia
        (10000009, 20000009, 2, "78552", 9),   # septic shock
        (10000009, 20000009, 3, "0389", 9),    # septicemia
    ], columns=["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"])

CHARTEVENTS = pd.DataFrame(
    [  # subject_id, hadm_id, stay_id, caregiver_id, charttime, storetime, itemid, value, valuenum, valueuom, warning
        # Stay 30000001 (intime 2150-01-01 10:00): heart rate 80/90/100 at hours 0.5/1.5/2.5, one reading
        # before intime (70, outside the stay), SBP 120 and GCS eye 'Spontaneously' (4) at 0.5 h,
        # temperature 98.6 °F (= 37.0 °C) at 1.5 h.
        (10000001, 20000001, 30000001, 1001, "2150-01-01 09:00:00", "2150-01-01 09:05:00", 220045, "70", 70.0,
         "bpm", 0),
        (10000001, 20000001, 30000001, 1001, "2150-01-01 10:30:00", "2150-01-01 10:35:00", 220045, "80", 80.0,
         "bpm", 0),
        (10000001, 20000001, 30000001, 1001, "2150-01-01 10:30:00", "2150-01-01 10:35:00", 220179, "120", 120.0,
         "mmHg", 0),
        (10000001, 20000001, 30000001, 1001, "2150-01-01 10:30:00", "2150-01-01 10:35:00", 220739,
         "Spontaneously", 4.0, None, 0),
        (10000001, 20000001, 30000001, 1002, "2150-01-01 11:30:00", "2150-01-01 11:35:00", 220045, "90", 90.0,
         "bpm", 0),
        (10000001, 20000001, 30000001, 1002, "2150-01-01 11:30:00", "2150-01-01 11:35:00", 223761, "98.6", 98.6,
         "°F", 0),
        (10000001, 20000001, 30000001, 1002, "2150-01-01 12:30:00", "2150-01-01 12:35:00", 220045, "100", 100.0,
         "bpm", 0),
        # Stay 30000003 (intime 2141-03-01 12:00): FiO2 50 % at 1 h.
        (10000003, 20000003, 30000003, 1003, "2141-03-01 13:00:00", "2141-03-01 13:05:00", 223835, "50", 50.0,
         None, 0),
        # Stay 30000004 (intime 2171-06-10 12:00): heart rate 110 at 1 h.
        (10000004, 20000004, 30000004, 1004, "2171-06-10 13:00:00", "2171-06-10 13:05:00", 220045, "110", 110.0,
         "bpm", 0),
    ], columns=["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
                "valuenum", "valueuom", "warning"])

_LAB_COLUMNS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
                "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag",
                "priority", "comments"]
LABEVENTS = pd.DataFrame(
    [
        # Stay 30000001 (intime 2150-01-01 10:00): blood glucose 140 at 1 h, blood pH 7.35 at 2 h,
        # blood glucose 150 at 3 h without hadm_id (assign by time), urine glucose 'NEG' at 4 h (no number).
        (1, 10000001, 20000001, 9001, 50931, "P20001", "2150-01-01 11:00:00", "2150-01-01 11:40:00", "140", 140.0,
         "mg/dL", 70.0, 100.0, "abnormal", "STAT", None),
        (2, 10000001, 20000001, 9002, 50820, "P20001", "2150-01-01 12:00:00", "2150-01-01 12:20:00", "7.35", 7.35,
         "units", 7.35, 7.45, None, "STAT", None),
        (3, 10000001, None, 9003, 50931, None, "2150-01-01 13:00:00", "2150-01-01 13:40:00", "150", 150.0,
         "mg/dL", 70.0, 100.0, "abnormal", "ROUTINE", None),
        (4, 10000001, 20000001, 9004, 51478, "P20001", "2150-01-01 14:00:00", "2150-01-01 15:00:00", "NEG", None,
         "mg/dL", None, None, None, "ROUTINE", None),
        # Stay 30000004 (intime 2171-06-10 12:00): blood pH 7.25 at 2 h.
        (5, 10000004, 20000004, 9005, 50820, "P20004", "2171-06-10 14:00:00", "2171-06-10 14:20:00", "7.25", 7.25,
         "units", 7.35, 7.45, "abnormal", "STAT", None),
    ], columns=_LAB_COLUMNS).astype({"hadm_id": "Int64", "valuenum": "float64"})

_CXR_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
_PORTABLE, _PA_LAT = "CHEST (PORTABLE AP)", "CHEST (PA AND LAT)"
_VIEW_MEANING = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", None: None}
# dicom_id, subject_id, study_id, ViewPosition, StudyDate, StudyTime   → outcome for the default cohort
_IMAGES = [
    # Stay 30000001: intime 2150-01-01 10:00, outtime 2150-01-05 10:00.
    ("s1-ap-minus30h", 10000001, 50000101, "AP", 21491231, 40000.0),     # -30 h: before the lookback
    ("s1-ap-minus14h", 10000001, 50000102, "AP", 21491231, 200000.0),    # -14 h: candidate
    ("s1-ap-plus5h", 10000001, 50000103, "AP", 21500101, 150000.0),      # +5 h: AP in window, not latest
    ("s1-ap-plus22h-a", 10000001, 50000104, "AP", 21500102, 80556.875),  # 08:05:56.875: tie, smaller id
    ("s1-ap-plus22h-b", 10000001, 50000104, "AP", 21500102, 80556.875),  # PAIRED (tie won by larger id)
    ("s1-lateral-plus22h", 10000001, 50000104, "LATERAL", 21500102, 80556.875),  # candidate
    ("s1-pa-plus34h", 10000001, 50000105, "PA", 21500102, 200000.0),     # +34 h: PA, not pairable
    ("s1-blank-plus37h", 10000001, 50000106, None, 21500102, 230000.0),  # +37 h: blank view, not AP
    ("s1-ap-plus60h", 10000001, 50000107, "AP", 21500103, 220000.0),     # +60 h: after the window
    ("s1-ap-after-outtime", 10000001, 50000108, "AP", 21500106, 100000.0),  # +120 h: after outtime
    # Stay 30000002 (minor, not in the cohort).
    ("s2-ap-plus24h", 10000002, 50000201, "AP", 21610502, 120000.0),
    # Stay 30000003: intime 2141-03-01 12:00, outtime 2141-03-02 12:00.
    ("s3-ap-plus10h", 10000003, 50000301, "AP", 21410301, 220000.0),     # PAIRED, 10 h
    ("s3-ap-after-outtime", 10000003, 50000302, "AP", 21410302, 180000.0),  # +30 h: in window but after outtime
    # Stay 30000051: 2180-05-01 12:00 to 2180-05-04 12:00; stay 30000052: 2181-01-02 08:00 to 2181-01-03 14:00.
    ("s5-ap-plus50h", 10000005, 50000501, "AP", 21800503, 140000.0),     # 30000051 +50 h: candidate
    ("s5-ap-between", 10000005, 50000502, "AP", 21800901, 120000.0),     # between admissions: no stay
    ("s5-ap-minus1h", 10000005, 50000503, "AP", 21810102, 70000.0),      # 30000052 -1 h: candidate
    ("s5-ap-at-intime", 10000005, 50000504, "AP", 21810102, 80000.0),    # 30000052 +0 h: PAIRED
    # Stay 30000008: intime 2190-07-01 06:00, outtime 2190-07-03 06:00 (study without a CheXpert row).
    ("s8-pa-plus6h", 10000008, 50000801, "PA", 21900701, 120000.0),
    ("s8-lateral-plus6h", 10000008, 50000801, "LATERAL", 21900701, 120000.0),
    ("s8-blank-plus6h", 10000008, 50000801, None, 21900701, 120000.0),
]
CXR_METADATA = pd.DataFrame(
    [(dicom, subject, study, _PORTABLE if view == "AP" else _PA_LAT, view, 8, 8, date, time,
      _PORTABLE if view == "AP" else _PA_LAT, _VIEW_MEANING[view], "Erect")
     for dicom, subject, study, view, date, time in _IMAGES], columns=_CXR_COLUMNS)

CHEXPERT_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
                    "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
_NO_FINDING = {"No Finding": 1.0}
_CHEXPERT_ROWS = {  # study_id -> labels given (all others blank); 50000801 has no row at all
    50000101: _NO_FINDING, 50000102: _NO_FINDING, 50000103: {"Edema": 1.0, "Pleural Effusion": 0.0},
    50000104: {"Atelectasis": 1.0, "Cardiomegaly": -1.0, "Edema": 0.0, "Support Devices": 1.0},
    50000105: {"Pneumonia": -1.0}, 50000106: _NO_FINDING, 50000107: {"Lung Opacity": 1.0},
    50000108: _NO_FINDING, 50000201: _NO_FINDING, 50000301: {"Pneumothorax": 1.0, "Support Devices": 1.0},
    50000302: _NO_FINDING, 50000501: {"Consolidation": 1.0}, 50000502: _NO_FINDING,
    50000503: {"Fracture": 0.0}, 50000504: {"Pleural Effusion": 1.0, "Edema": -1.0},
}
_STUDY_SUBJECT = dict(zip(CXR_METADATA["study_id"], CXR_METADATA["subject_id"]))
CHEXPERT = pd.DataFrame(
    [{"subject_id": _STUDY_SUBJECT[study], "study_id": study, **labels} for study, labels in _CHEXPERT_ROWS.items()],
    columns=CHEXPERT_COLUMNS)

CXR_SPLIT = pd.DataFrame({
    "dicom_id": CXR_METADATA["dicom_id"], "study_id": CXR_METADATA["study_id"],
    "subject_id": CXR_METADATA["subject_id"],
    "split": np.where(CXR_METADATA["subject_id"] == 10000008, "test",
                      np.where(CXR_METADATA["subject_id"] == 10000003, "validate", "train"))})


def mimic_iv_tables() -> dict[str, pd.DataFrame]:
    """Fresh copies of the MIMIC-IV tables, keyed by path relative to the MIMIC-IV root (no suffix)."""
    return {"hosp/patients": PATIENTS.copy(), "hosp/admissions": ADMISSIONS.copy(),
            "hosp/diagnoses_icd": DIAGNOSES_ICD.copy(), "icu/icustays": ICUSTAYS.copy(),
            "icu/chartevents": CHARTEVENTS.copy(), "hosp/labevents": LABEVENTS.copy()}


def mimic_cxr_tables() -> dict[str, pd.DataFrame]:
    """Fresh copies of the MIMIC-CXR-JPG tables, keyed by file name relative to the CXR root (no suffix)."""
    return {"mimic-cxr-2.0.0-metadata": CXR_METADATA.copy(), "mimic-cxr-2.0.0-chexpert": CHEXPERT.copy(),
            "mimic-cxr-2.0.0-split": CXR_SPLIT.copy()}


# MIMIC-IV columns that only v2.2 and later releases carry (ehrcxr never reads them).
_V2_2_ONLY_COLUMNS = {"hosp/admissions": ["admit_provider_id"], "icu/chartevents": ["caregiver_id"],
                      "hosp/labevents": ["order_provider_id"]}


def mimic_iv_tables_as(release: str) -> dict[str, pd.DataFrame]:
    """The tiny MIMIC-IV tables laid out as another release, keyed by path relative to the root (no suffix).

    ``v1.0``: patients and admissions under ``core/``, ``ethnicity`` instead of ``race``, no provider or
    caregiver columns. ``v2.0``: the v2.2 paths without the provider and caregiver columns.
    ``v3-style``: the v2.2 tables with their columns in reverse order plus one extra column ehrcxr does not read.
    """
    tables = mimic_iv_tables()
    if release == "v3-style":
        return {relpath: frame[frame.columns[::-1]].assign(unread_extra_column="x")
                for relpath, frame in tables.items()}
    if release not in ("v1.0", "v2.0"):
        raise ValueError(f"unknown release {release!r}")
    tables = {relpath: frame.drop(columns=_V2_2_ONLY_COLUMNS.get(relpath, [])) for relpath, frame in tables.items()}
    if release == "v1.0":
        tables["hosp/admissions"] = tables["hosp/admissions"].rename(columns={"race": "ethnicity"})
        tables = {relpath.replace("hosp/patients", "core/patients").replace("hosp/admissions", "core/admissions"):
                  frame for relpath, frame in tables.items()}
    return tables


def write_tables(root: Path, tables: dict[str, pd.DataFrame], suffix: str = ".csv.gz") -> None:
    """Write each table as ``root/<relpath><suffix>`` (gzip for .csv.gz; blank cells for missing values)."""
    for relpath, frame in tables.items():
        path = Path(root) / f"{relpath}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False, compression="gzip" if suffix.endswith(".gz") else None)


def write_images(cxr_root: Path, metadata: pd.DataFrame = CXR_METADATA, layout: str = "official") -> None:
    """Write an 8×8 grayscale JPEG for every metadata row at its official MIMIC-CXR-JPG path, or with
    ``layout="flat"`` as ``<dicom_id>.jpg`` directly in ``cxr_root``."""
    for number, (dicom, subject, study) in enumerate(
            zip(metadata["dicom_id"], metadata["subject_id"], metadata["study_id"])):
        if layout == "flat":
            path = Path(cxr_root) / f"{dicom}.jpg"
        else:
            path = Path(cxr_root) / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.add.outer(np.arange(8), np.arange(8)) * 16 + number * 7) % 256
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(path, format="JPEG")


def write_tiny_mimic(root: Path) -> tuple[Path, Path]:
    """Write the tiny dataset under ``root``; returns (MIMIC-IV root, MIMIC-CXR-JPG root)."""
    mimic_iv_root, mimic_cxr_root = Path(root) / "mimic-iv", Path(root) / "mimic-cxr-jpg"
    write_tables(mimic_iv_root, mimic_iv_tables())
    write_tables(mimic_cxr_root, mimic_cxr_tables())
    write_images(mimic_cxr_root)
    return mimic_iv_root, mimic_cxr_root
