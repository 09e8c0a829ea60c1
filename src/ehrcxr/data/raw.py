"""Readers for the raw MIMIC-IV (v2.x) and MIMIC-CXR-JPG (v2.0.0) files, with up-front schema checks.

Every reader names the file and column at fault instead of failing deep inside pandas.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from ehrcxr.resources import CHEXPERT_LABELS

log = logging.getLogger("ehrcxr.raw")


# Only an empty field is missing: MIMIC text values such as GCS eye opening 'None' or 'NA' are data.
NA_ONLY_EMPTY = {"keep_default_na": False, "na_values": [""]}


class RawDataError(ValueError):
    """A raw input file is missing, lacks a column or holds a value that cannot be parsed."""


@dataclass(frozen=True)
class TableSpec:
    """Where a table lives (relative to its root, without .csv/.csv.gz) and the columns ehrcxr reads."""

    relpath: str
    columns: tuple[str, ...]
    dtypes: dict
    timestamps: tuple[str, ...] = ()


_STR = "string"
MIMIC_IV_TABLES: dict[str, TableSpec] = {
    "patients": TableSpec("hosp/patients", ("subject_id", "gender", "anchor_age", "anchor_year", "dod"),
                          {"subject_id": "int64", "gender": _STR, "anchor_age": "int64", "anchor_year": "int64",
                           "dod": _STR}),
    "admissions": TableSpec(
        "hosp/admissions",
        ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "insurance", "race",
         "hospital_expire_flag"),
        {"subject_id": "int64", "hadm_id": "int64", "admission_type": _STR, "insurance": _STR, "race": _STR,
         "hospital_expire_flag": "Int64"},
        ("admittime", "dischtime", "deathtime")),
    "diagnoses_icd": TableSpec("hosp/diagnoses_icd", ("subject_id", "hadm_id", "icd_code", "icd_version"),
                               {"subject_id": "int64", "hadm_id": "int64", "icd_code": _STR, "icd_version": "int64"}),
    "icustays": TableSpec(
        "icu/icustays",
        ("subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"),
        {"subject_id": "int64", "hadm_id": "int64", "stay_id": "int64", "first_careunit": _STR,
         "last_careunit": _STR, "los": "float64"},
        ("intime", "outtime")),
    "chartevents": TableSpec(
        "icu/chartevents", ("subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value", "valuenum", "valueuom"),
        {"subject_id": "int64", "hadm_id": "Int64", "stay_id": "Int64", "itemid": "int64", "value": _STR,
         "valuenum": "float64", "valueuom": _STR},
        ("charttime",)),
    "labevents": TableSpec(
        "hosp/labevents", ("subject_id", "hadm_id", "charttime", "itemid", "value", "valuenum", "valueuom"),
        {"subject_id": "int64", "hadm_id": "Int64", "itemid": "int64", "value": _STR, "valuenum": "float64",
         "valueuom": _STR},
        ("charttime",)),
}

CXR_TABLES: dict[str, TableSpec] = {
    "metadata": TableSpec("mimic-cxr-2.0.0-metadata",
                          ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"),
                          {"dicom_id": _STR, "subject_id": "int64", "study_id": "int64", "ViewPosition": _STR,
                           "StudyDate": "int64", "StudyTime": "float64"}),
    "chexpert": TableSpec("mimic-cxr-2.0.0-chexpert", ("subject_id", "study_id", *CHEXPERT_LABELS),
                          {"subject_id": "int64", "study_id": "int64",
                           **{label: "float64" for label in CHEXPERT_LABELS}}),
    "split": TableSpec("mimic-cxr-2.0.0-split", ("dicom_id", "study_id", "subject_id", "split"),
                       {"dicom_id": _STR, "study_id": "int64", "subject_id": "int64", "split": _STR}),
}


def table_path(root: str | Path, spec: TableSpec) -> Path:
    """The existing ``.csv.gz`` or ``.csv`` file of a table; a clear error when neither exists."""
    root = Path(root)
    for suffix in (".csv.gz", ".csv"):
        candidate = root / f"{spec.relpath}{suffix}"
        if candidate.exists():
            return candidate
    raise RawDataError(f"missing raw file: {root / spec.relpath}.csv.gz (or .csv)")


def read_header(path: Path) -> list[str]:
    """Column names of a CSV file (compressed or not)."""
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception as error:  # truncated gzip, empty file, not a CSV
        raise RawDataError(f"cannot read the header of {path}: {error}") from error


def check_tables(root: str | Path, specs: dict[str, TableSpec]) -> None:
    """Check that every table exists and has its columns; one error lists every problem found."""
    problems = []
    for spec in specs.values():
        try:
            path = table_path(root, spec)
            missing = [c for c in spec.columns if c not in read_header(path)]
            if missing:
                problems.append(f"{path}: missing column(s) {', '.join(missing)}")
        except RawDataError as error:
            problems.append(str(error))
    if problems:
        raise RawDataError("raw data check failed:\n  " + "\n  ".join(problems))


def check_mimic_iv(root: str | Path, tables: Iterable[str] | None = None) -> None:
    """Schema check of the MIMIC-IV tables ehrcxr reads (all of them by default)."""
    names = list(tables) if tables is not None else list(MIMIC_IV_TABLES)
    check_tables(root, {n: MIMIC_IV_TABLES[n] for n in names})


def check_mimic_cxr(root: str | Path) -> None:
    """Schema check of the MIMIC-CXR-JPG metadata, CheXpert and split tables."""
    check_tables(root, CXR_TABLES)


def _convert(frame: pd.DataFrame, spec: TableSpec, path: Path, row_offset: int = 0) -> pd.DataFrame:
    for column in spec.timestamps:
        if column in frame.columns:
            frame[column] = parse_timestamps(frame[column], path, column, row_offset)
    return frame


def _dtypes(spec: TableSpec, columns: Iterable[str]) -> dict:
    return {c: spec.dtypes[c] for c in columns if c in spec.dtypes and c not in spec.timestamps}


def read_table(root: str | Path, name: str, columns: Iterable[str] | None = None,
               specs: dict[str, TableSpec] = MIMIC_IV_TABLES) -> pd.DataFrame:
    """Read one table's columns (all spec columns by default) with ids as int64, codes as strings and
    timestamps parsed; errors name file, column and row."""
    spec = specs[name]
    path = table_path(root, spec)
    columns = list(columns) if columns is not None else list(spec.columns)
    missing = [c for c in columns if c not in read_header(path)]
    if missing:
        raise RawDataError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        frame = pd.read_csv(path, usecols=columns, dtype=_dtypes(spec, columns), **NA_ONLY_EMPTY)
    except (ValueError, TypeError) as error:
        raise RawDataError(f"{path}: {_which_column(path, columns, spec)}: {error}") from error
    except Exception as error:  # EOFError/zlib.error/BadGzipFile from a truncated file
        raise RawDataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    return _convert(frame, spec, path)


def iter_table(root: str | Path, name: str, columns: Iterable[str], chunksize: int = 1_000_000,
               specs: dict[str, TableSpec] = MIMIC_IV_TABLES) -> Iterator[pd.DataFrame]:
    """Stream a (large) table in chunks of ``chunksize`` rows, converted like :func:`read_table`."""
    spec = specs[name]
    path = table_path(root, spec)
    columns = list(columns)
    missing = [c for c in columns if c not in read_header(path)]
    if missing:
        raise RawDataError(f"{path}: missing column(s) {', '.join(missing)}")
    offset = 0
    try:
        for chunk in pd.read_csv(path, usecols=columns, dtype=_dtypes(spec, columns), chunksize=chunksize,
                                 **NA_ONLY_EMPTY):
            yield _convert(chunk, spec, path, offset)
            offset += len(chunk)
    except RawDataError:
        raise
    except (ValueError, TypeError) as error:
        raise RawDataError(f"{path} (after row {offset}): {_which_column(path, columns, spec)}: {error}") from error
    except Exception as error:
        raise RawDataError(f"{path}: cannot be read after row {offset} ({type(error).__name__}: {error})") from error


def _which_column(path: Path, columns: list[str], spec: TableSpec) -> str:
    """Find the column whose values do not fit the expected dtype (re-reads as text; only on error)."""
    text = pd.read_csv(path, usecols=columns, dtype=str, **NA_ONLY_EMPTY)
    for column in columns:
        dtype = spec.dtypes.get(column)
        if dtype in ("int64", "Int64", "float64"):
            numbers = pd.to_numeric(text[column], errors="coerce")
            bad = numbers.isna() & text[column].notna()
            if dtype == "int64":
                bad |= text[column].isna()
            if bad.any():
                row = int(bad.idxmax())
                return f"column {column!r}, data row {row + 1}: value {text[column].iloc[row]!r} is not a valid {dtype}"
    return "unexpected values"


def parse_timestamps(values: pd.Series, path: Path | str, column: str, row_offset: int = 0) -> pd.Series:
    """Parse MIMIC 'YYYY-MM-DD HH:MM:SS' timestamps; empty stays NaT, anything else unparsable is an error."""
    parsed = pd.to_datetime(values, format="mixed", errors="coerce")
    bad = parsed.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise RawDataError(
            f"{path}: column {column!r}, data row {row_offset + row + 1}: cannot parse timestamp {values.iloc[row]!r}")
    return parsed


def cxr_study_datetime(study_date: pd.Series, study_time: pd.Series) -> pd.Series:
    """MIMIC-CXR StudyDate (int YYYYMMDD) + StudyTime (float HHMMSS.fff, leading zero dropped) -> datetime."""
    seconds_of_day = study_time.astype("float64")
    whole = seconds_of_day.floordiv(1)
    hours, rest = whole.floordiv(10000), whole.mod(10000)
    minutes, seconds = rest.floordiv(100), rest.mod(100) + (seconds_of_day - whole)
    dates = pd.to_datetime(study_date.astype("int64").astype(str), format="%Y%m%d", errors="coerce")
    return dates + pd.to_timedelta(hours * 3600 + minutes * 60 + seconds, unit="s")


def cxr_image_relpath(subject_id: pd.Series, study_id: pd.Series, dicom_id: pd.Series) -> pd.Series:
    """Official MIMIC-CXR-JPG image path: files/p<first 2 digits>/p<subject>/s<study>/<dicom>.jpg."""
    subject = subject_id.astype("int64").astype(str)
    return ("files/p" + subject.str[:2] + "/p" + subject + "/s" + study_id.astype("int64").astype(str) + "/"
            + dicom_id.astype(str) + ".jpg")
