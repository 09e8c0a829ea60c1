"""Readers for the raw MIMIC-IV (v1.0, v2.x, v3.x) and MIMIC-CXR-JPG (v2.0.0, v2.1.0) files, with up-front
schema checks.

The MIMIC-IV layout is detected from what is on disk: v1.0 keeps patients/admissions in ``core/`` and names
the race column ``ethnicity``; v2.0+ uses ``hosp/`` and ``race``. Either may be ``.csv`` or ``.csv.gz``, and
columns ehrcxr does not read (e.g. v2.2+ ``*_provider_id``, ``caregiver_id``) are ignored. Readers always
return the canonical (v2+) column names. Every reader names the file and column at fault instead of failing
deep inside pandas.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ehrcxr.resources import CHEXPERT_LABELS

log = logging.getLogger("ehrcxr.raw")


# Only an empty field is missing: MIMIC text values such as GCS eye opening 'None' or 'NA' are data.
NA_ONLY_EMPTY = {"keep_default_na": False, "na_values": [""]}


class RawDataError(ValueError):
    """A raw input file is missing, lacks a column or holds a value that cannot be parsed."""


@dataclass(frozen=True)
class TableSpec:
    """Where a table lives (relative to its root, without .csv/.csv.gz) and the columns ehrcxr reads.

    ``relpath`` is the current location; ``old_relpaths`` are tried after it (older releases).
    ``column_aliases`` maps a canonical column to the names older releases give it in the header.
    """

    relpath: str
    columns: tuple[str, ...]
    dtypes: dict
    timestamps: tuple[str, ...] = ()
    old_relpaths: tuple[str, ...] = ()
    column_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    allowed_values: dict[str, tuple] = field(default_factory=dict)
    non_negative: tuple[str, ...] = ()

    @property
    def relpaths(self) -> tuple[str, ...]:
        """Every location of the table, tried in this order."""
        return (self.relpath, *self.old_relpaths)


_STR = "string"
MIMIC_IV_TABLES: dict[str, TableSpec] = {
    "patients": TableSpec("hosp/patients", ("subject_id", "gender", "anchor_age", "anchor_year", "dod"),
                          {"subject_id": "int64", "gender": _STR, "anchor_age": "int64", "anchor_year": "int64",
                           "dod": _STR},
                          old_relpaths=("core/patients",), non_negative=("anchor_age",)),  # MIMIC-IV v1.0
    "admissions": TableSpec(
        "hosp/admissions",
        ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "insurance", "race",
         "hospital_expire_flag"),
        {"subject_id": "int64", "hadm_id": "int64", "admission_type": _STR, "insurance": _STR, "race": _STR,
         "hospital_expire_flag": "Int64"},
        ("admittime", "dischtime", "deathtime"),
        old_relpaths=("core/admissions",), column_aliases={"race": ("ethnicity",)}),  # MIMIC-IV v1.0
    "diagnoses_icd": TableSpec("hosp/diagnoses_icd", ("subject_id", "hadm_id", "icd_code", "icd_version"),
                               {"subject_id": "int64", "hadm_id": "int64", "icd_code": _STR, "icd_version": "int64"},
                               allowed_values={"icd_version": (9, 10)}),
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

# MIMIC-CXR-JPG v2.1.0 ships the same mimic-cxr-2.0.0-*.csv.gz tables as v2.0.0.
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

# Where the JPEGs lie under the image root: the official tree, or one flat folder of <dicom_id>.jpg.
CXR_IMAGE_LAYOUTS = ("official", "flat")


def table_path(root: str | Path, spec: TableSpec) -> Path:
    """The existing ``.csv.gz`` or ``.csv`` file of a table, trying each of its locations in turn; a clear
    error naming every candidate when none exists."""
    root = Path(root)
    for relpath in spec.relpaths:
        for suffix in (".csv.gz", ".csv"):
            candidate = root / f"{relpath}{suffix}"
            if candidate.exists():
                return candidate
    candidates = [f"{root / relpath}.csv.gz (or .csv)" for relpath in spec.relpaths]
    raise RawDataError("missing raw file: " + "; nor ".join(candidates))


def _renames(spec: TableSpec, header: list[str]) -> dict[str, str]:
    """Header name -> canonical name for each column this file names the older way (e.g. ethnicity -> race)."""
    renames = {}
    for canonical, aliases in spec.column_aliases.items():
        if canonical not in header:
            alias = next((a for a in aliases if a in header), None)
            if alias is not None:
                renames[alias] = canonical
    return renames


def read_header(path: Path, spec: TableSpec | None = None) -> list[str]:
    """Column names of a CSV file (compressed or not); with ``spec``, older names become canonical ones."""
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error
    except Exception as error:  # truncated gzip, empty file, not a CSV
        raise RawDataError(f"cannot read the header of {path}: {error}") from error
    if spec is None:
        return header
    renames = _renames(spec, header)
    return [renames.get(column, column) for column in header]


def _missing_columns(spec: TableSpec, header: list[str], columns: Iterable[str]) -> list[str]:
    """The requested canonical columns a (canonical) header lacks, each with its accepted older names."""
    missing = [c for c in columns if c not in header]
    return [f"{c} (or {' or '.join(spec.column_aliases[c])})" if c in spec.column_aliases else c for c in missing]


def _missing_message(path: Path, header: list[str], missing: list[str]) -> str:
    """'<file>: missing column(s) …', saying so when the header is one field holding another delimiter."""
    message = f"{path}: missing column(s) {', '.join(missing)}"
    delimiters = [name for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"))
                  if len(header) == 1 and sep in header[0]]
    if delimiters:
        message += f" (the header is one field holding {delimiters[0]}s: MIMIC files are comma-separated)"
    return message


def check_tables(root: str | Path, specs: dict[str, TableSpec]) -> None:
    """Check that every table exists and has its columns; one error lists every problem found."""
    problems = []
    for spec in specs.values():
        try:
            path = table_path(root, spec)
            header = read_header(path, spec)
            missing = _missing_columns(spec, header, spec.columns)
            if missing:
                problems.append(_missing_message(path, header, missing))
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


def _locate(root: str | Path, spec: TableSpec, columns: Iterable[str]) -> tuple[Path, dict[str, str]]:
    """The table's file and, for each requested canonical column, the name its header gives it; errors for a
    missing file or column."""
    path = table_path(root, spec)
    header = read_header(path)
    renames = _renames(spec, header)
    columns = list(columns)
    missing = _missing_columns(spec, [renames.get(h, h) for h in header], columns)
    if missing:
        raise RawDataError(_missing_message(path, header, missing))
    in_file = {canonical: name for name, canonical in renames.items()}
    return path, {c: in_file.get(c, c) for c in columns}


def _convert(frame: pd.DataFrame, spec: TableSpec, path: Path, names: dict[str, str]) -> pd.DataFrame:
    frame = frame.rename(columns={name: c for c, name in names.items() if name != c})
    for column in spec.timestamps:
        if column in frame.columns:
            frame[column] = parse_timestamps(frame[column], path, names[column])
    return frame


def _dtypes(spec: TableSpec, names: dict[str, str]) -> dict:
    """pandas dtypes keyed by the file's column names (timestamps are parsed afterwards)."""
    return {name: spec.dtypes[c] for c, name in names.items() if c in spec.dtypes and c not in spec.timestamps}


def read_table(root: str | Path, name: str, columns: Iterable[str] | None = None,
               specs: dict[str, TableSpec] = MIMIC_IV_TABLES) -> pd.DataFrame:
    """Read one table's columns (all spec columns by default), under their canonical names, with ids as
    int64, codes as strings and timestamps parsed (ISO 8601 only); errors name file, column, row and value.
    A table without data rows, a value outside a column's allowed set and a negative age are errors too."""
    spec = specs[name]
    path, names = _locate(root, spec, columns if columns is not None else spec.columns)
    try:
        frame = pd.read_csv(path, usecols=list(names.values()), dtype=_dtypes(spec, names), **NA_ONLY_EMPTY)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from error
    except (ValueError, TypeError) as error:
        where = _which_column(path, names, spec) or f"values that cannot be parsed ({error})"
        raise RawDataError(f"{path}: {where}") from error
    except Exception as error:  # EOFError/zlib.error/BadGzipFile from a truncated file
        raise RawDataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    if frame.empty:
        raise RawDataError(f"{path}: has a header but no data rows")
    _check_values(frame, spec, path, names)
    return _convert(frame, spec, path, names)


def _check_values(frame: pd.DataFrame, spec: TableSpec, path: Path, names: dict[str, str]) -> None:
    """Values outside a column's allowed set, or negative where only ages >= 0 make sense, are errors."""
    for canonical, allowed in spec.allowed_values.items():
        if canonical in names:
            column = frame[names[canonical]]
            _raise_at(path, names[canonical], column, ~column.isin(allowed),
                      f"is not one of {', '.join(map(str, allowed))}")
    for canonical in spec.non_negative:
        if canonical in names:
            column = frame[names[canonical]]
            _raise_at(path, names[canonical], column, column < 0, "is negative")


def _raise_at(path: Path, column: str, values: pd.Series, bad: pd.Series, problem: str) -> None:
    """Raise for the first row flagged in ``bad``, naming file, column, data row and value."""
    bad = bad.fillna(False).to_numpy(dtype=bool)
    if bad.any():
        row = int(bad.argmax())
        value = values.iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise RawDataError(f"{path}: column {column!r}, data row {row + 1}: value {value!r} {problem}")


def _not_utf8(path: Path, error: UnicodeDecodeError) -> RawDataError:
    """The error for a file that is not UTF-8, naming its first undecodable line (reads the file again)."""
    where = "a line"
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, line in enumerate(lines):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.rstrip(b"\r\n").decode("utf-8", "replace")
                where = f"{'the header' if number == 0 else f'data row {number}'}: line {text!r}"
                break
    return RawDataError(f"{path}: {where} is not UTF-8 text ({error.reason}); MIMIC files are UTF-8")


def _which_column(path: Path, names: dict[str, str], spec: TableSpec) -> str | None:
    """Name the column, data row and value that do not fit the expected dtype (re-reads as text; only on
    error). Integers must be whole numbers and, for non-nullable ids, present."""
    text = pd.read_csv(path, usecols=list(names.values()), dtype=str, **NA_ONLY_EMPTY)
    for canonical, column in names.items():
        dtype = spec.dtypes.get(canonical)
        if dtype in ("int64", "Int64", "float64"):
            numbers = pd.to_numeric(text[column], errors="coerce")
            bad = numbers.isna() & text[column].notna()
            if dtype in ("int64", "Int64"):
                bad |= numbers.notna() & (numbers != numbers.round())
            if dtype == "int64":
                bad |= text[column].isna()
            if bad.any():
                row = int(bad.to_numpy().argmax())
                value = text[column].iloc[row]
                shown = "empty" if pd.isna(value) else repr(value)
                kind = {"int64": "an integer", "Int64": "an integer", "float64": "a number"}[dtype]
                return f"column {column!r}, data row {row + 1}: value {shown} is not {kind}"
    return None


def parse_timestamps(values: pd.Series, path: Path | str, column: str) -> pd.Series:
    """Parse MIMIC's ISO 8601 timestamps ('YYYY-MM-DD HH:MM:SS', a 'T' separator, or a date alone); empty stays
    NaT. Anything else is an error naming file, column, row and value: day- or month-first dates such as
    '31/01/2150' are never guessed."""
    parsed = pd.to_datetime(values, format="ISO8601", errors="coerce")
    bad = parsed.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise RawDataError(
            f"{path}: column {column!r}, data row {row + 1}: cannot parse timestamp {values.iloc[row]!r} "
            "(MIMIC timestamps are ISO 8601, 'YYYY-MM-DD HH:MM:SS')")
    return parsed


def cxr_study_datetime(study_date: pd.Series, study_time: pd.Series) -> pd.Series:
    """MIMIC-CXR StudyDate (int YYYYMMDD) + StudyTime (float HHMMSS.fff, leading zero dropped) -> datetime."""
    seconds_of_day = study_time.astype("float64")
    whole = seconds_of_day.floordiv(1)
    hours, rest = whole.floordiv(10000), whole.mod(10000)
    minutes, seconds = rest.floordiv(100), rest.mod(100) + (seconds_of_day - whole)
    dates = pd.to_datetime(study_date.astype("int64").astype(str), format="%Y%m%d", errors="coerce")
    return dates + pd.to_timedelta(hours * 3600 + minutes * 60 + seconds, unit="s")


def cxr_image_relpath(subject_id: pd.Series, study_id: pd.Series, dicom_id: pd.Series,
                      layout: str = "official") -> pd.Series:
    """Image path relative to the image root: ``official`` MIMIC-CXR-JPG
    files/p<first 2 digits>/p<subject>/s<study>/<dicom>.jpg, or ``flat`` <dicom>.jpg (one folder)."""
    check_cxr_image_layout(layout)
    dicom = dicom_id.astype(str) + ".jpg"
    if layout == "flat":
        return dicom
    subject = subject_id.astype("int64").astype(str)
    return "files/p" + subject.str[:2] + "/p" + subject + "/s" + study_id.astype("int64").astype(str) + "/" + dicom


def check_cxr_image_layout(layout: str) -> None:
    """Reject an unknown CXR image layout (config ``raw.cxr_image_layout``)."""
    if layout not in CXR_IMAGE_LAYOUTS:
        raise ValueError(f"cxr_image_layout must be one of {', '.join(CXR_IMAGE_LAYOUTS)}, got {layout!r}")
