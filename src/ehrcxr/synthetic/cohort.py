"""Synthetic subjects, admissions and ICU stays (MIMIC-IV hosp/icu core tables) around the latent state."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.synthetic import io as sio
from ehrcxr.synthetic import state as st
from ehrcxr.resources import phenotypes

HOUR = 3600
DAY = 86400
LOS_RISK_WEIGHT = 0.45
YEAR_SECONDS = 365.2425 * DAY

RACE_STRINGS: dict[str, tuple[list[str], list[float]]] = {
    "WHITE": (["WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - BRAZILIAN", "WHITE - EASTERN EUROPEAN"],
              [0.9, 0.04, 0.03, 0.015, 0.015]),
    "BLACK": (["BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN", "BLACK/CARIBBEAN ISLAND", "BLACK/AFRICAN"],
              [0.85, 0.06, 0.05, 0.04]),
    "HISPANIC": (["HISPANIC/LATINO - PUERTO RICAN", "HISPANIC OR LATINO", "HISPANIC/LATINO - DOMINICAN",
                  "HISPANIC/LATINO - SALVADORAN", "HISPANIC/LATINO - CUBAN", "HISPANIC/LATINO - GUATEMALAN"],
                 [0.3, 0.25, 0.2, 0.1, 0.1, 0.05]),
    "ASIAN": (["ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN", "ASIAN - KOREAN"],
              [0.35, 0.35, 0.12, 0.12, 0.06]),
    "OTHER": (["OTHER", "UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "AMERICAN INDIAN/ALASKA NATIVE",
               "MULTIPLE RACE/ETHNICITY", "PORTUGUESE", "SOUTH AMERICAN"],
              [0.3, 0.35, 0.1, 0.07, 0.05, 0.05, 0.05, 0.03]),
}
RACE_GROUP_SHARE = [0.66, 0.11, 0.05, 0.04, 0.14]  # order of st.RACE_GROUPS
ANCHOR_YEAR_GROUPS = ["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"]
ICD10_START = 2015.75  # ICD-10-CM from October 2015

ADMISSION_TYPES = (["EW EMER.", "URGENT", "OBSERVATION ADMIT", "EU OBSERVATION", "SURGICAL SAME DAY ADMISSION",
                    "DIRECT EMER.", "ELECTIVE", "DIRECT OBSERVATION", "AMBULATORY OBSERVATION"],
                   [0.44, 0.17, 0.09, 0.05, 0.08, 0.06, 0.07, 0.03, 0.01])
EMERGENCY_TYPES = {"EW EMER.", "EU OBSERVATION", "DIRECT EMER.", "OBSERVATION ADMIT"}
ADMISSION_LOCATIONS = ["EMERGENCY ROOM", "PHYSICIAN REFERRAL", "TRANSFER FROM HOSPITAL", "CLINIC REFERRAL",
                       "WALK-IN/SELF REFERRAL", "PROCEDURE SITE", "TRANSFER FROM SKILLED NURSING FACILITY", "PACU"]
DISCHARGE_LOCATIONS = (["HOME HEALTH CARE", "HOME", "SKILLED NURSING FACILITY", "REHAB", "CHRONIC/LONG TERM ACUTE CARE",
                        "HOSPICE", "AGAINST ADVICE", "ACUTE HOSPITAL", None],
                       [0.28, 0.27, 0.18, 0.07, 0.05, 0.03, 0.02, 0.02, 0.08])
MARITAL = (["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", None], [0.42, 0.3, 0.14, 0.09, 0.05])
CAREUNITS = (["Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
              "Cardiac Vascular Intensive Care Unit (CVICU)", "Medical/Surgical Intensive Care Unit (MICU/SICU)",
              "Trauma SICU (TSICU)", "Coronary Care Unit (CCU)", "Neuro Surgical Intensive Care Unit (Neuro SICU)",
              "Neuro Intermediate", "Neuro Stepdown"],
             [0.21, 0.15, 0.17, 0.17, 0.12, 0.11, 0.03, 0.03, 0.01])

# Diagnoses from non-benchmark HCUP CCS groups (icd_9_10_definitions.yaml), written as "other" codes.
UNRELATED_DIAGNOSES: dict[str, tuple[list[str], list[str]]] = {
    "Deficiency and other anemia": (["2800", "2801", "2808", "2809"], ["D500", "D508", "D509", "D510"]),
    "Anxiety disorders": (["29384", "30000", "30001", "30002"], ["F064", "F419", "F410", "F411"]),
    "Urinary tract infections": (["03284", "59000", "59001", "59010"], ["A3685", "N110", "N118", "N10"]),
    "Osteoarthritis": (["71500", "71504", "71509", "71510"], ["M159", "M152", "M150", "M1991"]),
    "Esophageal disorders": (["4561", "45621", "5300", "5301"], ["I8500", "I8510", "K220", "K209"]),
    "Thyroid disorders": (["2400", "2409", "2410", "2411"], ["E040", "E049", "E041", "E042"]),
    "Other nutritional; endocrine; and metabolic disorders": (["2700", "2701", "2702", "2703"],
                                                              ["E7209", "E700", "E708", "E712"]),
    "Mood disorders": (["29383", "29600", "29601", "29602"], ["F0630", "F3010", "F3011", "F3012"]),
    "Alcohol-related disorders": (["2910", "2911", "2912", "2913"], ["F10231", "F1096", "F1027", "F10951"]),
    "Other aftercare": (["V510", "V518", "V539"], ["Z421", "Z428", "Z469", "Z4689"]),
    "Spondylosis; intervertebral disc disorders; other back problems": (["7201", "7202", "72081", "72089"],
                                                                        ["M4600", "M461", "M4980", "M4680"]),
    "Nausea and vomiting": (["7870", "78701", "78702", "78703"], ["R112", "R110", "R1112", "R1114"]),
    "Abdominal pain": (["78900", "78901", "78902"], ["R109", "R1011", "R1012", "R1031"]),
    "Hyperplasia of prostate": (["6000", "60000", "60001"], ["N400", "N401", "N402", "N403"]),
    "Cataract": (["36600", "36601", "36602", "36603"], ["H26009", "H26049", "H26059", "H26019"]),
}

# Dictionary-only codes (d_icd_diagnoses lists far more codes than any admission uses).
DICTIONARY_ONLY_DIAGNOSES: dict[str, tuple[list[str], list[str]]] = {
    "Headache; including migraine": (["33900", "33901", "33902", "33903"], ["G44009", "G44019", "G44029"]),
}


@dataclass
class Cohort:
    """Every subject, admission and ICU stay with their times (int64 seconds since the epoch)."""

    subjects: pd.DataFrame    # subject_id, gender, anchor_age, anchor_year, anchor_year_group, race_group, race, dod
    admissions: pd.DataFrame  # one row per admission (row = state row): ids, times, attributes, died
    stays: pd.DataFrame       # one row per ICU stay: ids, admission row, intime/outtime, offset_hours, careunits
    state: st.LatentState


def _choice(rng: np.random.Generator, options: tuple[list, list[float]] | list, n: int) -> np.ndarray:
    values, weights = options if isinstance(options, tuple) else (options, None)
    probabilities = None if weights is None else np.asarray(weights) / np.sum(weights)
    index = rng.choice(len(values), size=n, p=probabilities)
    return np.array(values, dtype=object)[index]


def _group_cumsum_before(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over the earlier rows of the same group (rows sorted by group)."""
    total = np.cumsum(values)
    first_row = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    starts = np.repeat(first_row, np.diff(np.r_[first_row, len(groups)]))
    return total - values - (total[starts] - values[starts])


def _draw_subjects(rng: np.random.Generator, n_admissions: int) -> tuple[np.ndarray, pd.DataFrame]:
    sizes = rng.choice([1, 2, 3, 4], size=n_admissions, p=[0.74, 0.17, 0.06, 0.03])
    n_subjects = int(np.searchsorted(np.cumsum(sizes), n_admissions) + 1)
    subject_of_admission = np.repeat(np.arange(n_subjects), sizes[:n_subjects])[:n_admissions]
    group = rng.choice(len(st.RACE_GROUPS), size=n_subjects, p=RACE_GROUP_SHARE)
    race_group = np.array(st.RACE_GROUPS, dtype=object)[group]
    race = np.empty(n_subjects, dtype=object)
    for name in st.RACE_GROUPS:
        members = race_group == name
        race[members] = _choice(rng, RACE_STRINGS[name], int(members.sum()))
    minors = rng.random(n_subjects) < 0.01
    anchor_age = np.where(minors, rng.integers(15, 18, n_subjects),
                          np.clip(np.round(rng.normal(64, 16, n_subjects)), 18, 91)).astype("int64")
    subjects = pd.DataFrame({
        "gender": np.where(rng.random(n_subjects) < 0.56, "M", "F"),
        "anchor_age": anchor_age,
        "anchor_year": rng.integers(2110, 2187, n_subjects),
        "anchor_year_group": np.array(ANCHOR_YEAR_GROUPS, dtype=object)[rng.integers(0, 4, n_subjects)],
        "race_group": race_group,
        "race": race,
    })
    return subject_of_admission, subjects


def _split_extra_deaths(subject: np.ndarray, died: np.ndarray,
                        subjects: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """A subject dies at most once: every death but a subject's last becomes a new subject (same demographics)."""
    dead = np.flatnonzero(died)
    later_deaths = pd.Series(subject[dead]).groupby(subject[dead]).cumcount(ascending=False).to_numpy()
    movers = dead[later_deaths > 0]
    if len(movers) == 0:
        return subject, subjects
    subject = subject.copy()
    new_rows = subjects.iloc[subject[movers]].reset_index(drop=True)
    subject[movers] = len(subjects) + np.arange(len(movers))
    return subject, pd.concat([subjects, new_rows], ignore_index=True)


def build_cohort(rng: np.random.Generator, n_stays: int) -> Cohort:
    """Draw subjects, admissions (with their latent state and outcome) and ICU stays with consistent times."""
    if n_stays < 10:
        raise ValueError(f"n_stays must be at least 10, got {n_stays}")
    n_double = max(1, int(round(0.03 * n_stays)))
    n_admissions = n_stays - n_double
    subject, subjects = _draw_subjects(rng, n_admissions)
    two_stays = np.zeros(n_admissions, dtype=bool)
    two_stays[rng.choice(n_admissions, size=n_double, replace=False)] = True

    male = (subjects["gender"].to_numpy() == "M")[subject].astype(float)
    age = subjects["anchor_age"].to_numpy()[subject].astype(float)
    state = st.draw_state(rng, subject, subjects["race_group"].to_numpy()[subject], age, male)

    # ICU stays: the first of each admission, then the second of the two-stay admissions. The sicker stay longer
    # (log-LOS rises LOS_RISK_WEIGHT per SD of the mortality score), so mortality rises with ICU LOS as in MIMIC.
    score = st.mortality_score(state, age)
    risk = (score - score.mean()) / score.std()
    los1 = np.clip(np.exp(rng.normal(0.8 + LOS_RISK_WEIGHT * risk, 0.75)), 0.45, 21.0) * 24.0
    los2 = np.clip(np.exp(rng.normal(0.5, 0.8, n_admissions)), 0.45, 14.0) * 24.0
    gap = rng.uniform(12.0, 120.0, n_admissions)
    stay_admission = np.r_[np.arange(n_admissions), np.flatnonzero(two_stays)]
    stay_number = np.r_[np.zeros(n_admissions, int), np.ones(n_double, int)]
    stay_los = np.where(stay_number == 0, los1[stay_admission], los2[stay_admission])
    stay_offset = np.where(stay_number == 0, 0.0, (los1 + gap)[stay_admission])

    # Mortality: calibrated on stays of >= 48 h, drawn per admission.
    long_stays = stay_los >= 48.0
    intercept = st.solve_intercepts(score[stay_admission][:, None], np.array([st.MORTALITY_TARGET]),
                                    rows=long_stays if long_stays.any() else None)[0]
    state.mortality_prob = st.sigmoid(score + intercept)
    died = rng.random(n_admissions) < state.mortality_prob
    subject, subjects = _split_extra_deaths(subject, died, subjects)

    # Admission timeline in hours from admittime.
    admission_type = _choice(rng, ADMISSION_TYPES, n_admissions)
    pre_icu = np.where(rng.random(n_admissions) < 0.45, rng.uniform(0.2, 3.0, n_admissions),
                       np.clip(rng.exponential(20.0, n_admissions), 0.3, 120.0))
    icu_end = pre_icu + np.where(two_stays, los1 + gap + los2, los1)
    in_icu_death = rng.random(n_admissions) < 0.8
    after_icu = np.where(died, np.where(in_icu_death, rng.uniform(0.0, 0.5, n_admissions),
                                        rng.uniform(6.0, 120.0, n_admissions)),
                         np.clip(np.exp(rng.normal(3.8, 0.9, n_admissions)), 4.0, 400.0))
    duration = icu_end + after_icu

    # Calendar: a subject's admissions follow each other; a death is always the subject's last.
    position = np.arange(n_admissions)
    order = np.lexsort((position, died, subject))
    gap_days = 20.0 + rng.exponential(250.0, n_admissions)
    block_seconds = (np.ceil(duration / 24.0) * DAY + gap_days * DAY)[order]
    before = _group_cumsum_before(subject[order], block_seconds)
    anchor_start = (subjects["anchor_year"].to_numpy() - 1970) * YEAR_SECONDS
    start_offset = rng.uniform(0, 2.5 * YEAR_SECONDS, len(subjects))
    subject_start = anchor_start + start_offset
    admit = np.empty(n_admissions)
    admit[order] = subject_start[subject[order]] + before
    admittime = (np.floor(admit / 60.0) * 60).astype("int64")
    first_intime = admittime + (pre_icu * HOUR).astype("int64")
    dischtime = (np.ceil((first_intime + (icu_end - pre_icu + after_icu) * HOUR) / 60.0) * 60).astype("int64")
    sequence = np.empty(n_admissions, dtype="int64")
    sequence[order] = pd.Series(subject[order]).groupby(subject[order]).cumcount().to_numpy()

    # Admission attributes.
    location = np.where(np.isin(admission_type, list(EMERGENCY_TYPES)),
                        np.where(rng.random(n_admissions) < 0.85, "EMERGENCY ROOM", "TRANSFER FROM HOSPITAL"),
                        _choice(rng, ADMISSION_LOCATIONS[1:], n_admissions))
    has_ed = location == "EMERGENCY ROOM"
    edregtime = admittime - (rng.uniform(1.0, 8.0, n_admissions) * HOUR).astype("int64") // 60 * 60
    edouttime = admittime + (rng.uniform(0.0, 1.5, n_admissions) * HOUR).astype("int64") // 60 * 60
    discharge = _choice(rng, DISCHARGE_LOCATIONS, n_admissions)
    discharge[died] = "DIED"
    elderly = age >= 65
    insurance = np.where(elderly & (rng.random(n_admissions) < 0.8), "Medicare",
                         _choice(rng, (["Medicaid", "Other", "Medicare"], [0.3, 0.6, 0.1]), n_admissions))
    anchor_offset_years = rng.uniform(0.0, 3.0, len(subjects))
    group_start = subjects["anchor_year_group"].str[:4].astype(int).to_numpy()
    years_since_anchor = admittime / YEAR_SECONDS + 1970 - subjects["anchor_year"].to_numpy()[subject]
    real_year = group_start[subject] + anchor_offset_years[subject] + years_since_anchor
    provider_chars = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    provider = "P" + pd.Series(provider_chars[rng.integers(0, 36, (n_admissions, 5))].tolist()).str.join("")
    admissions = pd.DataFrame({
        "subject_row": subject, "sequence": sequence, "admittime": admittime, "dischtime": dischtime,
        "died": died, "deathtime": dischtime, "admission_type": admission_type,
        "admit_provider_id": provider.to_numpy(), "admission_location": location,
        "discharge_location": discharge, "insurance": insurance,
        "language": np.where(rng.random(n_admissions) < 0.9, "ENGLISH", "?"),
        "marital_status": _choice(rng, MARITAL, n_admissions), "has_ed": has_ed,
        "edregtime": edregtime, "edouttime": edouttime, "icd_version": np.where(real_year >= ICD10_START, 10, 9),
        "age": age, "first_intime": first_intime,
    })

    # Stays.
    intime = first_intime[stay_admission] + (stay_offset * HOUR).astype("int64")
    outtime = intime + (stay_los * HOUR).astype("int64")
    first_unit = _choice(rng, CAREUNITS, n_stays)
    moved = rng.random(n_stays) < 0.05
    last_unit = np.where(moved, _choice(rng, CAREUNITS, n_stays), first_unit)
    stays = pd.DataFrame({"admission_row": stay_admission, "stay_number": stay_number, "intime": intime,
                          "outtime": outtime, "offset_hours": stay_offset, "first_careunit": first_unit,
                          "last_careunit": last_unit})
    stays = stays.sort_values(["admission_row", "stay_number"], kind="stable").reset_index(drop=True)

    # Ids (random, so their order reveals nothing).
    subjects["subject_id"] = rng.permutation(sio.unique_ids(rng, len(subjects), 10_000_000, 20_000_000))
    admissions["hadm_id"] = rng.permutation(sio.unique_ids(rng, n_admissions, 20_000_000, 30_000_000))
    stays["stay_id"] = rng.permutation(sio.unique_ids(rng, n_stays, 30_000_000, 40_000_000))
    admissions["subject_id"] = subjects["subject_id"].to_numpy()[subject]
    stays["hadm_id"] = admissions["hadm_id"].to_numpy()[stays["admission_row"]]
    stays["subject_id"] = admissions["subject_id"].to_numpy()[stays["admission_row"]]

    # Date of death: in-hospital deaths, plus some deaths within a year after the last discharge.
    dod = np.full(len(subjects), -1, dtype="int64")
    dead_rows = np.flatnonzero(died)
    dod[subject[dead_rows]] = dischtime[dead_rows]
    last_discharge = pd.Series(dischtime).groupby(subject).max().reindex(range(len(subjects))).to_numpy()
    late_death = (dod < 0) & (rng.random(len(subjects)) < 0.06) & ~np.isnan(last_discharge)
    dod[late_death] = (np.nan_to_num(last_discharge[late_death])
                       + rng.uniform(15, 360, int(late_death.sum())) * DAY).astype("int64")
    subjects["dod"] = dod
    return Cohort(subjects=subjects, admissions=admissions, stays=stays, state=state)


def write_core_tables(cohort: Cohort, root: Path) -> dict[str, int]:
    """patients, admissions and icustays in MIMIC-IV v2.2 column order; returns row counts."""
    subjects, admissions, stays = cohort.subjects, cohort.admissions, cohort.stays
    has_subject_admission = np.isin(np.arange(len(subjects)), admissions["subject_row"])
    patients = subjects[has_subject_admission].sort_values("subject_id")
    counts = {"patients": sio.write_csv_gz(root / "hosp" / "patients.csv.gz", {
        "subject_id": patients["subject_id"], "gender": patients["gender"], "anchor_age": patients["anchor_age"],
        "anchor_year": patients["anchor_year"], "anchor_year_group": patients["anchor_year_group"],
        "dod": sio.dates(patients["dod"].to_numpy(), patients["dod"].to_numpy() >= 0)})}
    adm = admissions.assign(race=subjects["race"].to_numpy()[admissions["subject_row"]]).sort_values(
        ["subject_id", "admittime"])
    died = adm["died"].to_numpy()
    ed = adm["has_ed"].to_numpy()
    counts["admissions"] = sio.write_csv_gz(root / "hosp" / "admissions.csv.gz", {
        "subject_id": adm["subject_id"], "hadm_id": adm["hadm_id"],
        "admittime": sio.seconds_to_timestamps(adm["admittime"]),
        "dischtime": sio.seconds_to_timestamps(adm["dischtime"]),
        "deathtime": sio.masked_timestamps(adm["deathtime"].to_numpy(), died),
        "admission_type": adm["admission_type"].astype(str), "admit_provider_id": adm["admit_provider_id"],
        "admission_location": adm["admission_location"].astype(str),
        "discharge_location": adm["discharge_location"], "insurance": adm["insurance"].astype(str),
        "language": adm["language"].astype(str), "marital_status": adm["marital_status"],
        "race": adm["race"].astype(str),
        "edregtime": sio.masked_timestamps(adm["edregtime"].to_numpy(), ed),
        "edouttime": sio.masked_timestamps(adm["edouttime"].to_numpy(), ed),
        "hospital_expire_flag": died.astype("int64")})
    icu = stays.sort_values(["subject_id", "intime"])
    counts["icustays"] = sio.write_csv_gz(root / "icu" / "icustays.csv.gz", {
        "subject_id": icu["subject_id"], "hadm_id": icu["hadm_id"], "stay_id": icu["stay_id"],
        "first_careunit": icu["first_careunit"].astype(str), "last_careunit": icu["last_careunit"].astype(str),
        "intime": sio.seconds_to_timestamps(icu["intime"]), "outtime": sio.seconds_to_timestamps(icu["outtime"]),
        "los": (icu["outtime"] - icu["intime"]).to_numpy() / DAY})
    return counts


def benchmark_codes() -> list[dict[int, list[str]]]:
    """Per phenotype, its ICD-9 and ICD-10 codes that belong to no other benchmark phenotype."""
    groups = phenotypes()
    owners: dict[str, int] = {}
    for group in groups:
        for code in set(map(str, group["icd9"])) | set(map(str, group["icd10"])):
            owners[code] = owners.get(code, 0) + 1
    return [{9: [c for c in map(str, g["icd9"]) if owners[c] == 1],
             10: [c for c in dict.fromkeys(map(str, g["icd10"])) if owners[c] == 1]} for g in groups]


def write_diagnoses(cohort: Cohort, rng: np.random.Generator, root: Path) -> dict[str, int]:
    """diagnoses_icd (phenotype codes + unrelated codes per admission) and d_icd_diagnoses."""
    admissions = cohort.admissions
    version = admissions["icd_version"].to_numpy()
    candidates = benchmark_codes()
    rows_adm, rows_code, rows_version, titles = [], [], [], {}
    for k, group in enumerate(phenotypes()):
        for v in (9, 10):
            codes = np.array(candidates[k][v], dtype=object)
            if len(codes) == 0:
                raise ValueError(f"phenotype {group['label']} has no ICD-{v} code of its own")
            positive = np.flatnonzero((cohort.state.phenotypes[:, k] == 1) & (version == v))
            rows_adm.append(positive)
            rows_code.append(codes[rng.integers(0, len(codes), len(positive))])
            rows_version.append(np.full(len(positive), v))
            titles.update({(c, v): group["name"] for c in codes})
    benchmark = {c for per_label in candidates for codes in per_label.values() for c in codes}
    for v, column in ((9, 0), (10, 1)):
        pool = np.array([c for lists in UNRELATED_DIAGNOSES.values() for c in lists[column]], dtype=object)
        extra = {c for lists in DICTIONARY_ONLY_DIAGNOSES.values() for c in lists[column]}
        if benchmark & (set(pool) | extra):
            raise ValueError("an unrelated ICD code is also a benchmark phenotype code")
        members = np.flatnonzero(version == v)
        n_extra = 2 + rng.poisson(3.0, len(members))
        rows_adm.append(np.repeat(members, n_extra))
        rows_code.append(pool[rng.integers(0, len(pool), int(n_extra.sum()))])
        rows_version.append(np.full(int(n_extra.sum()), v))
        for name, lists in UNRELATED_DIAGNOSES.items():
            titles.update({(c, v): name for c in lists[column]})
    diagnoses = pd.DataFrame({"admission_row": np.concatenate(rows_adm), "icd_code": np.concatenate(rows_code),
                              "icd_version": np.concatenate(rows_version)})
    diagnoses = diagnoses.drop_duplicates(["admission_row", "icd_code"]).reset_index(drop=True)
    diagnoses["key"] = rng.random(len(diagnoses))
    diagnoses = diagnoses.sort_values(["admission_row", "key"], kind="stable")
    diagnoses["seq_num"] = diagnoses.groupby("admission_row").cumcount() + 1
    diagnoses["subject_id"] = admissions["subject_id"].to_numpy()[diagnoses["admission_row"]]
    diagnoses["hadm_id"] = admissions["hadm_id"].to_numpy()[diagnoses["admission_row"]]
    diagnoses = diagnoses.sort_values(["subject_id", "hadm_id", "seq_num"])
    counts = {"diagnoses_icd": sio.write_csv_gz(root / "hosp" / "diagnoses_icd.csv.gz", {
        "subject_id": diagnoses["subject_id"], "hadm_id": diagnoses["hadm_id"], "seq_num": diagnoses["seq_num"],
        "icd_code": diagnoses["icd_code"].astype(str), "icd_version": diagnoses["icd_version"].astype("int64")})}
    # Dictionary: every code used plus codes no admission uses.
    for name, lists in DICTIONARY_ONLY_DIAGNOSES.items():
        titles.update({(c, v): name for v, column in ((9, 0), (10, 1)) for c in lists[column]})
    used = set(zip(diagnoses["icd_code"], diagnoses["icd_version"]))
    keys = sorted({key for key in titles if key in used or titles[key] in DICTIONARY_ONLY_DIAGNOSES})
    counts["d_icd_diagnoses"] = sio.write_csv_gz(root / "hosp" / "d_icd_diagnoses.csv.gz", {
        "icd_code": [c for c, _ in keys], "icd_version": np.array([v for _, v in keys], dtype="int64"),
        "long_title": [titles[key] for key in keys]})
    return counts
