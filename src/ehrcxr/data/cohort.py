"""Cohort stage: ICU stays, their labels, subject-level splits and their chest X-ray pairing.

The same code runs on the synthetic files and on real MIMIC-IV (v1.0, v2.x, v3.x; layout detected by
``ehrcxr.data.raw``) + MIMIC-CXR-JPG (v2.0.0, v2.1.0; images in the official tree or one flat folder).
Output contracts (column names and dtypes) are documented in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.data import raw
from ehrcxr.data.tasks import LOS_LABELS, length_of_stay_classes
from ehrcxr.resources import CHEXPERT_LABELS, phenotype_labels, phenotypes

log = logging.getLogger("ehrcxr.cohort")

SPLITS = ("train", "val", "test")
STAY_ID_COLUMNS = ["subject_id", "hadm_id", "stay_id"]
STAY_TIME_COLUMNS = ["intime", "outtime", "admittime", "dischtime"]
CXR_STUDY_DTYPES: dict[str, str] = {
    "stay_id": "int64", "subject_id": "int64", "study_id": "int64", "dicom_id": "object",
    "view_position": "object", "study_time": "datetime64[ns]", "hours_from_intime": "float64",
    "path": "object", "paired": "bool", **{label: "float64" for label in CHEXPERT_LABELS},
}
_REQUIRED_MIMIC_IV = ["patients", "admissions", "diagnoses_icd", "icustays"]


class EmptyCohortError(ValueError):
    """A cohort rule removed every remaining ICU stay."""


def build_cohort(mimic_iv_root: str | Path, mimic_cxr_root: str | Path | None = None, *, min_age: int = 18,
                 mortality_min_hours: float = 48, cxr_window_hours: tuple[float, float] = (0, 48),
                 cxr_lookback_hours: float = 24, split: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 split_seed: int = 0, cxr_image_layout: str = "official") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build ``(stays, cxr_studies)`` from raw MIMIC-IV (and optionally MIMIC-CXR-JPG) files.

    ``stays`` carries one row per kept ICU stay with demographics, labels, split and paired CXR;
    ``cxr_studies`` every image of a kept stay's subject taken in [intime − lookback, outtime], with its
    ``path`` in ``cxr_image_layout`` (see :func:`ehrcxr.data.raw.cxr_image_relpath`).
    ``stays.attrs["cohort_counts"]`` holds the number of stays left after each rule.
    """
    window_start, window_end = (float(h) for h in cxr_window_hours)
    if window_start > window_end:
        raise ValueError(f"cxr_window_hours must be (start, end) with start <= end, got {cxr_window_hours}")
    if window_start < -cxr_lookback_hours:
        raise ValueError(f"cxr_window_hours start ({window_start} h) lies before the candidate lookback "
                         f"(-{cxr_lookback_hours} h); the paired image must be a cxr_studies candidate")
    fractions = _check_fractions(split)
    raw.check_cxr_image_layout(cxr_image_layout)
    raw.check_mimic_iv(mimic_iv_root, tables=_REQUIRED_MIMIC_IV)
    if mimic_cxr_root is not None:
        raw.check_mimic_cxr(mimic_cxr_root)

    stays, counts = _select_stays(mimic_iv_root, min_age)
    stays["los_hours"] = (stays["outtime"] - stays["intime"]) / pd.Timedelta(hours=1)
    stays["in_mortality_task"] = (stays["los_hours"] >= mortality_min_hours).astype(bool)
    stays["mortality"] = _in_hospital_death(stays).astype("int8")
    stays[LOS_LABELS] = length_of_stay_classes(stays["los_hours"])
    stays["race"] = race_group(stays["race"])
    phenotype_table = admission_phenotypes(mimic_iv_root, stays["hadm_id"])
    stays = stays.merge(phenotype_table, left_on="hadm_id", right_index=True, how="left", validate="m:1")
    split_of_subject = assign_splits(stays["subject_id"], fractions, split_seed)
    stays["split"] = stays["subject_id"].map(split_of_subject).astype(object)

    if mimic_cxr_root is None:
        cxr_studies = empty_cxr_studies()
    else:
        cxr_studies = cxr_candidates(mimic_cxr_root, stays, cxr_lookback_hours, (window_start, window_end),
                                     cxr_image_layout)
    chosen = cxr_studies.loc[cxr_studies["paired"], ["stay_id", "dicom_id", "study_id", "hours_from_intime"]]
    chosen = chosen.rename(columns={"dicom_id": "cxr_dicom_id", "study_id": "cxr_study_id",
                                    "hours_from_intime": "cxr_hours"})
    stays = stays.merge(chosen, on="stay_id", how="left", validate="1:1")
    stays["cxr_dicom_id"] = stays["cxr_dicom_id"].astype(object).where(stays["cxr_dicom_id"].notna(), None)
    stays["cxr_study_id"] = stays["cxr_study_id"].astype("Int64")
    stays["cxr_hours"] = stays["cxr_hours"].astype("float64")

    columns = (STAY_ID_COLUMNS + STAY_TIME_COLUMNS
               + ["los_hours", "age", "gender", "race", "insurance", "admission_type", "mortality",
                  "in_mortality_task"] + phenotype_labels() + LOS_LABELS
               + ["split", "cxr_dicom_id", "cxr_study_id", "cxr_hours"])
    stays = stays[columns].sort_values("stay_id").reset_index(drop=True)
    stays.attrs["cohort_counts"] = counts
    log.info("cohort: %d stays of %d subjects (%d with mortality task), %d candidate images, %d paired stays",
             len(stays), stays["subject_id"].nunique(), int(stays["in_mortality_task"].sum()), len(cxr_studies),
             int(stays["cxr_dicom_id"].notna().sum()))
    return stays, cxr_studies


def _check_fractions(split) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions (train, val, test) summing to 1, got {split}")
    return fractions


def _keep(stays: pd.DataFrame, keep: pd.Series, rule: str, counts: dict[str, int]) -> pd.DataFrame:
    """Apply one cohort rule, log how many stays are left and fail loudly when none are."""
    kept = stays[keep.to_numpy(dtype=bool)]
    counts[rule] = len(kept)
    log.info("cohort rule %-45s %7d stays (%d removed)", rule + ":", len(kept), len(stays) - len(kept))
    if kept.empty:
        raise EmptyCohortError(f"the cohort is empty after the rule '{rule}' ({len(stays)} stays before it)")
    return kept


def _select_stays(mimic_iv_root: str | Path, min_age: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """icustays ⨝ admissions ⨝ patients and the MedFuse/mimic3-benchmarks stay rules."""
    icustays = raw.read_table(mimic_iv_root, "icustays",
                              ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime",
                               "outtime"])
    admissions = raw.read_table(mimic_iv_root, "admissions",
                                ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                                 "insurance", "race"])
    patients = raw.read_table(mimic_iv_root, "patients", ["subject_id", "gender", "anchor_age", "anchor_year", "dod"])
    patients_path = raw.table_path(mimic_iv_root, raw.MIMIC_IV_TABLES["patients"])
    patients["dod"] = raw.parse_timestamps(patients["dod"], patients_path, "dod")
    for frame, name, key in ((admissions, "admissions", "hadm_id"), (patients, "patients", "subject_id"),
                             (icustays, "icustays", "stay_id")):
        duplicated = frame[key].duplicated()
        if duplicated.any():
            path = raw.table_path(mimic_iv_root, raw.MIMIC_IV_TABLES[name])
            row = int(duplicated.to_numpy().argmax())
            raise raw.RawDataError(f"{path}: column {key!r}, data row {row + 1}: duplicate id {frame[key].iloc[row]}")

    counts: dict[str, int] = {}
    stays = icustays
    stays = _keep(stays, pd.Series(True, index=stays.index), "ICU stays in icustays", counts)
    stays = stays.merge(admissions, on=["subject_id", "hadm_id"], how="left", indicator="_admission")
    stays = stays.merge(patients, on="subject_id", how="left", indicator="_patient")
    joined = (stays["_admission"] == "both") & (stays["_patient"] == "both")
    stays = _keep(stays, joined, "with an admission and a patient row", counts).drop(columns=["_admission", "_patient"])
    valid_times = stays["intime"].notna() & stays["outtime"].notna() & (stays["outtime"] >= stays["intime"])
    stays = _keep(stays, valid_times, "with intime <= outtime", counts)
    same_unit = stays["first_careunit"].fillna("") == stays["last_careunit"].fillna("")
    stays = _keep(stays, same_unit, "first_careunit == last_careunit", counts)
    # Counted after the careunit rule, as in mimic3-benchmarks/MedFuse (transfers removed first).
    stays_per_admission = stays.groupby("hadm_id")["stay_id"].transform("size")
    stays = _keep(stays, stays_per_admission == 1, "only ICU stay of its admission", counts)
    # Age at ICU admission. MIMIC-IV gives anchor_age in anchor_year, so the age in the year of intime is
    # anchor_age + (year(intime) - anchor_year). MedFuse used anchor_age alone, which under-states age by
    # up to the span between anchor_year and the stay.
    stays = stays.assign(age=(stays["anchor_age"] + stays["intime"].dt.year - stays["anchor_year"]).astype("int64"))
    stays = _keep(stays, stays["age"] >= min_age, f"age >= {min_age}", counts)
    for column in ("gender", "insurance", "admission_type"):
        stays[column] = stays[column].astype(object).where(stays[column].notna(), None)
    return stays.reset_index(drop=True), counts


def _in_hospital_death(stays: pd.DataFrame) -> pd.Series:
    """Death within the admission: deathtime in [admittime, dischtime] or dod in [admit date, discharge date]."""
    by_deathtime = (stays["deathtime"].notna() & (stays["deathtime"] >= stays["admittime"])
                    & (stays["deathtime"] <= stays["dischtime"]))
    dod = stays["dod"].dt.normalize()
    by_dod = (dod.notna() & (dod >= stays["admittime"].dt.normalize()) & (dod <= stays["dischtime"].dt.normalize()))
    return by_deathtime | by_dod


# MIMIC-IV race strings that mean OTHER (not a group of their own, unknown or not given); any other string
# outside the four groups is counted as unrecognised in the log.
OTHER_RACE_STRINGS = frozenset({
    "", "OTHER", "UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "MULTIPLE RACE/ETHNICITY",
    "AMERICAN INDIAN/ALASKA NATIVE", "AMERICAN INDIAN/ALASKA NATIVE FEDERALLY RECOGNIZED TRIBE",
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", "PORTUGUESE", "UNKNOWN/NOT SPECIFIED"})


def race_group(race: pd.Series) -> pd.Series:
    """Map MIMIC-IV race strings to WHITE/BLACK/HISPANIC/ASIAN/OTHER (unknown and blank count as OTHER);
    strings MIMIC-IV does not use are counted as OTHER and logged with examples."""
    text = race.astype("string").fillna("").str.strip().str.upper()
    groups = np.select(
        [text.str.startswith("WHITE"), text.str.startswith("BLACK"),
         text.str.startswith("HISPANIC") | text.str.startswith("LATINO") | (text == "SOUTH AMERICAN"),
         text.str.startswith("ASIAN")],
        ["WHITE", "BLACK", "HISPANIC", "ASIAN"], default="OTHER")
    unrecognised = (groups == "OTHER") & ~text.isin(OTHER_RACE_STRINGS).to_numpy(dtype=bool)
    if unrecognised.any():
        examples = sorted(set(race[unrecognised].astype(str)))[:5]
        log.warning("race: %d stays with a value MIMIC-IV does not use, counted as OTHER (e.g. %s)",
                    int(unrecognised.sum()), ", ".join(map(repr, examples)))
    return pd.Series(groups, index=race.index, dtype=object)


def normalise_icd_codes(codes: pd.Series) -> pd.Series:
    """ICD codes as MIMIC-IV writes them: surrounding spaces and dots removed, upper case ('428.0' → '4280',
    ' i50.9' → 'I509')."""
    return codes.astype("string").str.strip().str.replace(".", "", regex=False).str.upper().astype(object)


def phenotype_code_table() -> pd.DataFrame:
    """ICD code → phenotype label lookup with columns icd_version (9/10), icd_code (normalised), label."""
    rows = [(version, code, group["label"])
            for group in phenotypes() for version, key in ((9, "icd9"), (10, "icd10")) for code in group[key]]
    table = pd.DataFrame(rows, columns=["icd_version", "icd_code", "label"])
    table["icd_code"] = normalise_icd_codes(table["icd_code"])
    return table.astype({"icd_version": "int64", "icd_code": object, "label": object}).drop_duplicates()


def admission_phenotypes(mimic_iv_root: str | Path, hadm_ids: pd.Series) -> pd.DataFrame:
    """The 25 phenotype labels (int8, index hadm_id) of each admission: 1 if any of its diagnoses maps.

    ICD-9 codes are looked up only in the ``icd9`` lists and ICD-10 codes only in the ``icd10`` lists
    (MedFuse matched codes regardless of ``icd_version``). Codes are normalised first
    (:func:`normalise_icd_codes`); how many normalisation changed is logged.
    """
    diagnoses = raw.read_table(mimic_iv_root, "diagnoses_icd", ["hadm_id", "icd_code", "icd_version"])
    diagnoses = diagnoses[diagnoses["hadm_id"].isin(hadm_ids)]
    normalised = normalise_icd_codes(diagnoses["icd_code"])
    changed = int((normalised != diagnoses["icd_code"].astype(object)).fillna(False).sum())
    log.info("diagnoses_icd: %d of %d cohort codes normalised (dots, spaces or case)", changed, len(diagnoses))
    diagnoses = diagnoses.assign(icd_code=normalised)
    matched = diagnoses.merge(phenotype_code_table(), on=["icd_version", "icd_code"], how="inner")
    matched = matched[["hadm_id", "label"]].drop_duplicates()
    labels = phenotype_labels()
    table = pd.crosstab(matched["hadm_id"], matched["label"]).clip(upper=1)
    table = table.reindex(index=pd.Index(hadm_ids.unique(), name="hadm_id"), columns=labels, fill_value=0)
    return table.fillna(0).astype("int8")


def assign_splits(subject_ids: pd.Series | np.ndarray, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> pd.Series:
    """Seeded subject-level split: shuffle the sorted unique subject ids with ``np.random.default_rng(seed)``
    and cut them by the (train, val, test) fractions. Returns split names indexed by subject_id."""
    fractions = _check_fractions(fractions)
    subjects = np.sort(pd.unique(np.asarray(subject_ids, dtype="int64")))
    shuffled = np.random.default_rng(seed).permutation(subjects)
    n_train, n_train_val = np.round(np.cumsum(fractions[:2]) * len(shuffled)).astype(int)
    names = np.empty(len(shuffled), dtype=object)
    names[:n_train], names[n_train:n_train_val], names[n_train_val:] = SPLITS
    return pd.Series(names, index=pd.Index(shuffled, name="subject_id"), name="split")


def empty_cxr_studies() -> pd.DataFrame:
    """A cxr_studies table with no rows and the contract's columns and dtypes."""
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in CXR_STUDY_DTYPES.items()})


def read_cxr_images(mimic_cxr_root: str | Path, image_layout: str = "official") -> pd.DataFrame:
    """MIMIC-CXR-JPG metadata ⨝ CheXpert labels: one row per image with study_time and its path relative to
    the image root in ``image_layout``."""
    metadata = raw.read_table(mimic_cxr_root, "metadata", specs=raw.CXR_TABLES)
    chexpert = raw.read_table(mimic_cxr_root, "chexpert", specs=raw.CXR_TABLES)
    metadata["study_time"] = raw.cxr_study_datetime(metadata["StudyDate"], metadata["StudyTime"])
    if metadata["study_time"].isna().any():
        row = int(metadata["study_time"].isna().to_numpy().argmax())
        path = raw.table_path(mimic_cxr_root, raw.CXR_TABLES["metadata"])
        raise raw.RawDataError(
            f"{path}: columns 'StudyDate'/'StudyTime', data row {row + 1}: cannot parse study time "
            f"{metadata['StudyDate'].iloc[row]} {metadata['StudyTime'].iloc[row]}")
    duplicated = chexpert.duplicated(["subject_id", "study_id"])
    if duplicated.any():
        row = int(duplicated.to_numpy().argmax())
        path = raw.table_path(mimic_cxr_root, raw.CXR_TABLES["chexpert"])
        raise raw.RawDataError(f"{path}: column 'study_id', data row {row + 1}: value "
                               f"{chexpert['study_id'].iloc[row]} repeats a study (one CheXpert row per study)")
    # Left join: an image whose study has no CheXpert row keeps NaN labels ("not mentioned").
    images = metadata.merge(chexpert, on=["subject_id", "study_id"], how="left", validate="m:1")
    images["path"] = raw.cxr_image_relpath(images["subject_id"], images["study_id"], images["dicom_id"],
                                           image_layout)
    return images


def cxr_candidates(mimic_cxr_root: str | Path, stays: pd.DataFrame, lookback_hours: float,
                   window_hours: tuple[float, float], image_layout: str = "official") -> pd.DataFrame:
    """Every image of a stay's subject in [intime − lookback, outtime] and the stay's paired image.

    Paired = the latest AP image (blank/NaN ViewPosition is not AP) with study_time in
    [intime + window start, intime + window end] that is also a candidate (so not after outtime);
    ties in time go to the lexicographically last dicom_id.
    """
    images = read_cxr_images(mimic_cxr_root, image_layout)
    images = images[images["subject_id"].isin(stays["subject_id"])]
    pairs = stays[["stay_id", "subject_id", "intime", "outtime"]].merge(images, on="subject_id", how="inner")
    in_stay = ((pairs["study_time"] >= pairs["intime"] - pd.Timedelta(hours=lookback_hours))
               & (pairs["study_time"] <= pairs["outtime"]))
    pairs = pairs[in_stay.to_numpy(dtype=bool)]
    pairs = pairs.sort_values(["stay_id", "study_time", "dicom_id"]).reset_index(drop=True)
    pairs["hours_from_intime"] = (pairs["study_time"] - pairs["intime"]) / pd.Timedelta(hours=1)
    is_ap = (pairs["ViewPosition"].astype("string").str.strip() == "AP").fillna(False).astype(bool)
    in_window = ((pairs["study_time"] >= pairs["intime"] + pd.Timedelta(hours=window_hours[0]))
                 & (pairs["study_time"] <= pairs["intime"] + pd.Timedelta(hours=window_hours[1])))
    pairable = pairs.index[is_ap & in_window]
    # Rows are sorted by (stay, time, dicom_id), so the last pairable row of a stay is its paired image.
    chosen = pairs.loc[pairable, "stay_id"].drop_duplicates(keep="last").index
    pairs["paired"] = False
    pairs.loc[chosen, "paired"] = True
    pairs = pairs.rename(columns={"ViewPosition": "view_position"})
    pairs["view_position"] = pairs["view_position"].astype(object).where(pairs["view_position"].notna(), None)
    for column in ("dicom_id", "path"):
        pairs[column] = pairs[column].astype(object)
    return pairs[list(CXR_STUDY_DTYPES)].astype(CXR_STUDY_DTYPES)


def write_cohort(stays: pd.DataFrame, cxr_studies: pd.DataFrame, stays_path: str | Path,
                 cxr_studies_path: str | Path) -> None:
    """Write both cohort tables as parquet (pyarrow), creating parent folders."""
    for frame, path in ((stays, stays_path), (cxr_studies, cxr_studies_path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, engine="pyarrow", index=False)


def run_cohort(mimic_iv_root: str | Path, mimic_cxr_root: str | Path | None, out_stays: str | Path,
               out_cxr_studies: str | Path, params: dict,
               cxr_image_layout: str = "official") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build and write the cohort from the ``cohort:`` section of config.yaml (and ``raw.cxr_image_layout``);
    logs counts per rule and split.

    As the workflow's first stage on the raw files it checks every MIMIC-IV table the workflow reads
    (events included), so a missing file or column fails in seconds, not after hours of work.
    """
    raw.check_mimic_iv(mimic_iv_root)
    split = params.get("split", {})
    stays, cxr_studies = build_cohort(
        mimic_iv_root, mimic_cxr_root or None,
        min_age=int(params.get("min_age", 18)),
        mortality_min_hours=float(params.get("mortality_min_hours", 48)),
        cxr_window_hours=tuple(params.get("cxr_window_hours", (0, 48))),
        cxr_lookback_hours=float(params.get("cxr_lookback_hours", 24)),
        split=(split.get("train", 0.7), split.get("val", 0.1), split.get("test", 0.2)),
        split_seed=int(split.get("seed", 0)), cxr_image_layout=cxr_image_layout)
    for name in SPLITS:
        part = stays[stays["split"] == name]
        log.info("split %-5s: %6d subjects, %6d stays, %6d mortality-task stays, %6d paired stays", name,
                 part["subject_id"].nunique(), len(part), int(part["in_mortality_task"].sum()),
                 int(part["cxr_dicom_id"].notna().sum()))
    write_cohort(stays, cxr_studies, out_stays, out_cxr_studies)
    log.info("wrote %s and %s", out_stays, out_cxr_studies)
    return stays, cxr_studies
