"""Bad input, kind by kind: every malformed copy of the tiny MIMIC dataset gives either a clear error that
names the file, the column, the data row and the value, or a cohort equal to the clean input's (minus the
stays a cohort rule drops). Images: every input mode is decoded by a documented rule or counted as
missing/corrupt, never saturated.

Expected outcomes are written per case from the hand-typed tables in ``tiny_mimic`` (row numbers are
1-based data rows of the file, the header not counted).
"""
from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ehrcxr.data import ehr, raw
from ehrcxr.data.cohort import build_cohort
from ehrcxr.data.cxr import build_cxr_cache, load_cxr_cache
from ehrcxr.data.tasks import task_stays
from tiny_mimic import mimic_cxr_tables, mimic_iv_tables, mimic_iv_tables_as, write_tables

IV, CXR = "mimic-iv", "mimic-cxr-jpg"
Tables = dict[str, pd.DataFrame]
STAYS, ADMS = f"{IV}/icu/icustays", f"{IV}/hosp/admissions"
PATS, DIAG = f"{IV}/hosp/patients", f"{IV}/hosp/diagnoses_icd"
META, CHEX = f"{CXR}/mimic-cxr-2.0.0-metadata", f"{CXR}/mimic-cxr-2.0.0-chexpert"
STAY_TIMES = ("intime", "outtime")


def tiny_tables() -> Tables:
    """Both datasets' tables keyed by path relative to one root: ``mimic-iv/…`` and ``mimic-cxr-jpg/…``."""
    return {**{f"{IV}/{k}": v for k, v in mimic_iv_tables().items()},
            **{f"{CXR}/{k}": v for k, v in mimic_cxr_tables().items()}}


def run_cohort_stage(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the workflow's cohort stage does: check every MIMIC-IV table, then build the cohort."""
    raw.check_mimic_iv(root / IV)
    return build_cohort(root / IV, root / CXR)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("clean")
    write_tables(root, tiny_tables())
    return run_cohort_stage(root)


# --- editing helpers -------------------------------------------------------------------------------------

def set_cell(tables: Tables, table: str, row: int, column: str, value) -> None:
    frame = tables[table]
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value


def set_cells(table: str, row: int, column: str, value) -> Callable[[Tables], None]:
    return lambda tables: set_cell(tables, table, row, column, value)


def append_row(table: str, row: dict) -> Callable[[Tables], None]:
    def edit(tables: Tables) -> None:
        frame = tables[table]
        tables[table] = pd.concat([frame, pd.DataFrame([{**frame.iloc[0].to_dict(), **row}])], ignore_index=True)
    return edit


def reformat_times(table: str, columns: tuple[str, ...], fmt: str) -> Callable[[Tables], None]:
    def edit(tables: Tables) -> None:
        frame = tables[table]
        for column in columns:
            times = pd.to_datetime(frame[column], format="ISO8601")
            frame[column] = times.dt.strftime(fmt).where(times.notna(), None)
    return edit


def dotted_icd(code: str, version: int) -> str:
    """The dotted spelling of an ICD code (ICD-9 E codes: dot after 4 characters, others after 3)."""
    at = 4 if version == 9 and code.startswith("E") else 3
    return code if len(code) <= at else f"{code[:at]}.{code[at:]}"


def respell_icd(spell: Callable[[str, int], str]) -> Callable[[Tables], None]:
    def edit(tables: Tables) -> None:
        frame = tables[DIAG]
        frame["icd_code"] = [spell(code, version) for code, version in zip(frame["icd_code"], frame["icd_version"])]
    return edit


def rewrite_csv(relpath: str, transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Rewrite one written .csv.gz file's decompressed bytes."""
    def edit(root: Path) -> None:
        path = root / f"{relpath}.csv.gz"
        path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))
    return edit


def rewrite_with(relpath: str, **to_csv) -> Callable[[Path], None]:
    """Write one table again with other ``DataFrame.to_csv`` options (delimiter, encoding, line ends)."""
    def edit(root: Path) -> None:
        path = root / f"{relpath}.csv.gz"
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        encoding = to_csv.pop("encoding", "utf-8")
        path.write_bytes(gzip.compress(frame.to_csv(index=False, **to_csv).encode(encoding)))
    return edit


def every_file(transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for path in root.rglob("*.csv.gz"):
            path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))
    return edit


def replace_iv_tables(release: str) -> Callable[[Tables], None]:
    def edit(tables: Tables) -> None:
        for key in [k for k in tables if k.startswith(f"{IV}/")]:
            del tables[key]
        tables.update({f"{IV}/{k}": v for k, v in mimic_iv_tables_as(release).items()})
    return edit


def truncate(relpath: str, keep: float) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / f"{relpath}.csv.gz"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return edit


def _latin1_french(tables: Tables) -> None:
    set_cell(tables, f"{IV}/hosp/admissions", 4, "language", "FRANÇAIS")


@dataclass
class Case:
    """One malformed input: edits to the tables before writing, edits to the files after, and the outcome
    (``error``: a regex the RawDataError must match; otherwise the clean cohort minus ``dropped`` stays, with
    ``race`` changes)."""
    edit: Callable[[Tables], None] = lambda tables: None
    on_disk: Callable[[Path], None] = lambda root: None
    error: str | None = None
    dropped: tuple[int, ...] = ()
    race: dict[int, str] = field(default_factory=dict)
    suffix: str = ".csv.gz"


CASES: dict[str, Case] = {
    # --- files and columns
    "missing column": Case(lambda t: t[STAYS].drop(columns="outtime", inplace=True),
                           error=r"icu/icustays.csv.gz: missing column\(s\) outtime"),
    "renamed column": Case(lambda t: t[ADMS].rename(columns={"hadm_id": "HADM_ID"}, inplace=True),
                           error=r"hosp/admissions.csv.gz: missing column\(s\) hadm_id"),
    "extra column": Case(lambda t: t[PATS].insert(2, "note", "free text, with a comma")),
    "missing file": Case(lambda t: t.pop(ADMS),
                         error=r"missing raw file: \S+/hosp/admissions.csv.gz \(or .csv\); nor \S+/core/admissions"),
    "empty file": Case(on_disk=lambda root: (root / f"{DIAG}.csv.gz").write_bytes(b""),
                       error=r"cannot read the header of \S+/diagnoses_icd.csv.gz"),
    "header-only diagnoses": Case(lambda t: t.update({DIAG: t[DIAG].iloc[:0]}),
                                  error=r"diagnoses_icd.csv.gz: has a header but no data rows"),
    "header-only icustays": Case(lambda t: t.update({STAYS: t[STAYS].iloc[:0]}),
                                 error=r"icustays.csv.gz: has a header but no data rows"),
    "truncated gzip": Case(on_disk=truncate(ADMS, 0.6), error=r"hosp/admissions.csv.gz: .*cannot|cannot read the "
                                                               r"header of \S+/hosp/admissions.csv.gz"),
    "semicolon delimiter": Case(on_disk=rewrite_with(STAYS, sep=";"),
                                error=r"icustays.csv.gz: missing column\(s\) subject_id, .*semicolons"),
    "tab delimiter": Case(on_disk=rewrite_with(PATS, sep="\t"),
                          error=r"patients.csv.gz: missing column\(s\) subject_id, .*tabs"),
    "Latin-1 encoding": Case(_latin1_french, on_disk=rewrite_with(ADMS, encoding="latin-1"),
                             error=r"admissions.csv.gz: data row 5: line '10000005,20000051.*FRAN.AIS.*' is not "
                                   r"UTF-8 text"),
    "BOM": Case(on_disk=rewrite_csv(STAYS, lambda data: "\ufeff".encode() + data)),
    "CRLF line ends": Case(on_disk=every_file(lambda data: data.replace(b"\n", b"\r\n"))),
    "MIMIC-IV v1.0 layout (.csv)": Case(replace_iv_tables("v1.0"), suffix=".csv"),
    "MIMIC-IV v3-style columns": Case(replace_iv_tables("v3-style")),
    ".csv instead of .csv.gz": Case(suffix=".csv"),
    # --- ids and keys
    "non-numeric id": Case(set_cells(STAYS, 2, "stay_id", "abc"),
                           error=r"icustays.csv.gz: column 'stay_id', data row 3: value 'abc' is not an integer"),
    "fractional id": Case(set_cells(ADMS, 0, "hadm_id", "20000001.5"),
                          error=r"admissions.csv.gz: column 'hadm_id', data row 1: value '20000001.5' is not an "
                                r"integer"),
    "empty subject_id": Case(set_cells(STAYS, 4, "subject_id", None),
                             error=r"icustays.csv.gz: column 'subject_id', data row 5: value empty is not an integer"),
    "empty hadm_id in diagnoses": Case(set_cells(DIAG, 5, "hadm_id", None),
                                       error=r"diagnoses_icd.csv.gz: column 'hadm_id', data row 6: value empty"),
    "duplicate stay_id": Case(set_cells(STAYS, 10, "stay_id", 30000001),
                              error=r"icustays.csv.gz: column 'stay_id', data row 11: duplicate id 30000001"),
    "duplicate admission": Case(append_row(ADMS, {}),
                                error=r"admissions.csv.gz: column 'hadm_id', data row 11: duplicate id 20000001"),
    "duplicate patient": Case(append_row(PATS, {}),
                              error=r"patients.csv.gz: column 'subject_id', data row 10: duplicate id 10000001"),
    "repeated diagnosis rows": Case(lambda t: t.update({DIAG: pd.concat([t[DIAG], t[DIAG]], ignore_index=True)})),
    "orphan ICU stay": Case(append_row(STAYS, {"hadm_id": 29999999, "stay_id": 30009999,
                                               "intime": "2150-02-01 10:00:00", "outtime": "2150-02-03 10:00:00"})),
    "orphan diagnosis": Case(append_row(DIAG, {"subject_id": 10000099, "hadm_id": 29999999})),
    # --- dates and times
    "impossible date": Case(set_cells(STAYS, 0, "intime", "2150-13-45 10:00:00"),
                            error=r"icustays.csv.gz: column 'intime', data row 1: cannot parse timestamp "
                                  r"'2150-13-45 10:00:00'"),
    "day-first dates": Case(reformat_times(STAYS, STAY_TIMES, "%d/%m/%Y %H:%M"),
                            error=r"icustays.csv.gz: column 'intime', data row 1: cannot parse timestamp "
                                  r"'01/01/2150 10:00' \(MIMIC timestamps are ISO 8601"),
    "month-first dates": Case(reformat_times(ADMS, ("admittime",), "%m/%d/%Y %I:%M %p"),
                              error=r"admissions.csv.gz: column 'admittime', data row 1: cannot parse timestamp "
                                    r"'01/01/2150 08:00 AM'"),
    "non-ISO deathtime": Case(set_cells(ADMS, 2, "deathtime", "04/03/2141 10:00"),
                              error=r"admissions.csv.gz: column 'deathtime', data row 3: cannot parse timestamp "
                                    r"'04/03/2141 10:00'"),
    "non-ISO dod": Case(set_cells(PATS, 3, "dod", "20/06/2171"),
                        error=r"patients.csv.gz: column 'dod', data row 4: cannot parse timestamp '20/06/2171'"),
    "ISO 'T' separator": Case(reformat_times(STAYS, STAY_TIMES, "%Y-%m-%dT%H:%M:%S")),
    "times without seconds": Case(reformat_times(STAYS, STAY_TIMES, "%Y-%m-%d %H:%M")),
    "dod with midnight time": Case(reformat_times(PATS, ("dod",), "%Y-%m-%d %H:%M:%S")),
    "empty intime": Case(set_cells(STAYS, 0, "intime", None), dropped=(30000001,)),
    "outtime before intime": Case(set_cells(STAYS, 3, "outtime", "2171-06-09 12:00:00"), dropped=(30000004,)),
    # --- values
    "negative anchor_age": Case(set_cells(PATS, 0, "anchor_age", -60),
                                error=r"patients.csv.gz: column 'anchor_age', data row 1: value -60 is negative"),
    "fractional anchor_age": Case(set_cells(PATS, 0, "anchor_age", "52.5"),
                                  error=r"patients.csv.gz: column 'anchor_age', data row 1: value '52.5' is not an "
                                        r"integer"),
    "dotted ICD codes": Case(respell_icd(dotted_icd)),
    "lower-case padded ICD codes": Case(respell_icd(lambda code, version: f" {code.lower()} ")),
    "icd_version 8": Case(set_cells(DIAG, 0, "icd_version", 8),
                          error=r"diagnoses_icd.csv.gz: column 'icd_version', data row 1: value 8 is not one of "
                                r"9, 10"),
    "empty icd_version": Case(set_cells(DIAG, 2, "icd_version", None),
                              error=r"diagnoses_icd.csv.gz: column 'icd_version', data row 3: value empty is not an "
                                    r"integer"),
    "icd_version as text": Case(set_cells(DIAG, 5, "icd_version", "ICD10"),
                                error=r"diagnoses_icd.csv.gz: column 'icd_version', data row 6: value 'ICD10' is not "
                                      r"an integer"),
    "unknown race string": Case(set_cells(ADMS, 0, "race", "MARTIAN"), race={30000001: "OTHER"}),
    # --- MIMIC-CXR-JPG tables
    "CXR impossible StudyDate": Case(set_cells(META, 0, "StudyDate", 21491331),
                                     error=r"metadata.csv.gz: columns 'StudyDate'/'StudyTime', data row 1: cannot "
                                           r"parse study time 21491331"),
    "CXR StudyDate written as ISO": Case(set_cells(META, 1, "StudyDate", "2149-12-31"),
                                         error=r"metadata.csv.gz: column 'StudyDate', data row 2: value '2149-12-31' "
                                               r"is not an integer"),
    "CXR duplicate CheXpert study": Case(append_row(CHEX, {}),
                                         error=r"chexpert.csv.gz: column 'study_id', data row 16: value 50000101 "
                                               r"repeats a study"),
    "CXR missing ViewPosition column": Case(lambda t: t[META].drop(columns="ViewPosition", inplace=True),
                                            error=r"metadata.csv.gz: missing column\(s\) ViewPosition"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_a_clear_error_or_the_clean_result(name, clean, tmp_path, caplog):
    case = CASES[name]
    tables = tiny_tables()
    case.edit(tables)
    for prefix in (IV, CXR):  # the CXR tables keep .csv.gz; a case's suffix applies to MIMIC-IV
        write_tables(tmp_path, {k: v for k, v in tables.items() if k.startswith(prefix)},
                     case.suffix if prefix == IV else ".csv.gz")
    case.on_disk(tmp_path)
    if case.error is not None:
        with pytest.raises(raw.RawDataError, match=case.error):
            run_cohort_stage(tmp_path)
        return
    with caplog.at_level(logging.WARNING, logger="ehrcxr"):
        stays, cxr_studies = run_cohort_stage(tmp_path)
    expected_stays, expected_studies = clean
    expected_stays = expected_stays[~expected_stays["stay_id"].isin(case.dropped)].reset_index(drop=True)
    expected_studies = expected_studies[~expected_studies["stay_id"].isin(case.dropped)].reset_index(drop=True)
    for stay_id, race in case.race.items():
        expected_stays.loc[expected_stays["stay_id"] == stay_id, "race"] = race
    compared = [c for c in expected_stays.columns if not (case.dropped and c == "split")]  # splits reshuffle
    pd.testing.assert_frame_equal(stays[compared], expected_stays[compared])
    pd.testing.assert_frame_equal(cxr_studies, expected_studies)
    if case.race:
        assert "1 stays with a value MIMIC-IV does not use, counted as OTHER (e.g. 'MARTIAN')" in caplog.text


def test_there_are_at_least_forty_kinds_of_bad_table_input():
    assert len(CASES) >= 40


def test_dotted_and_plain_icd_codes_give_the_same_labels_and_are_counted(tmp_path, clean, caplog):
    tables = tiny_tables()
    CASES["dotted ICD codes"].edit(tables)
    assert tables[DIAG]["icd_code"].tolist()[:4] == ["038.9", "401.9", "584.9", "V70.7"]
    write_tables(tmp_path, tables)
    with caplog.at_level(logging.INFO, logger="ehrcxr"):
        stays, _ = run_cohort_stage(tmp_path)
    phenotypes = [c for c in stays.columns if c.startswith("ph_")]
    assert stays[phenotypes].to_numpy().sum() == 14  # the 14 positive labels listed in tiny_mimic's docstring
    pd.testing.assert_frame_equal(stays[phenotypes], clean[0][phenotypes])
    # the 7 kept admissions hold 16 codes; all but '486', 'I10' (twice) and 'J99' gain a dot
    assert "diagnoses_icd: 12 of 16 cohort codes normalised" in caplog.text


# --- event tables, streamed by the EHR stage ---------------------------------------------------------------

EVENT_CASES = {
    "day-first charttime": (set_cells(f"{IV}/icu/chartevents", 1, "charttime", "01/01/2150 10:30"),
                            r"chartevents.csv.gz: column 'charttime', data row 2: cannot parse timestamp "
                            r"'01/01/2150 10:30'"),
    "non-numeric valuenum": (set_cells(f"{IV}/icu/chartevents", 4, "valuenum", "ninety"),
                             r"chartevents.csv.gz: column 'valuenum', data row 5: value 'ninety' is not a valid"),
    "non-numeric lab itemid": (set_cells(f"{IV}/hosp/labevents", 2, "itemid", "glucose"),
                               r"labevents.csv.gz: column 'itemid', data row 3: value 'glucose' is not a valid"),
}


@pytest.mark.parametrize("name", list(EVENT_CASES))
def test_bad_event_values_name_file_column_row_and_value(name, clean, tmp_path):
    edit, error = EVENT_CASES[name]
    tables = tiny_tables()
    edit(tables)
    write_tables(tmp_path, tables)
    cohort = ehr.prepare_stays(task_stays(clean[0], "phenotyping"))
    with pytest.raises(raw.RawDataError, match=error):
        ehr.extract_hourly_codes(tmp_path / IV, cohort, 48, ehr.channel_layout())


# --- images ------------------------------------------------------------------------------------------------

SIZE = 4
GRAY = np.array([[0, 17, 34, 51], [68, 85, 102, 119], [136, 153, 170, 187], [204, 221, 238, 255]], np.uint8)
# 12-bit values in a 16-bit container: range 1000..5080 = 16 × 255, so each value maps to (v − 1000) / 16.
TWELVE_BIT = np.array([[1000, 1016, 1160, 2008], [3048, 4008, 5080, 1000],
                       [1032, 1048, 1064, 1080], [4088, 4104, 2520, 3560]], np.uint16)
TWELVE_BIT_8 = np.array([[0, 1, 10, 63], [128, 188, 255, 0], [2, 3, 4, 5], [193, 194, 95, 160]], np.uint8)
# Full 16-bit range: 32768 × 255 / 65535 = 127.502 → 128, 100 × 255 / 65535 = 0.389 → 0.
FULL_16 = np.array([[0, 65535, 32768, 100]] * 4, np.uint16)
FULL_16_8 = np.array([[0, 255, 128, 0]] * 4, np.uint8)
FLOAT = np.array([[-1.0, 1.0, 0.0, 0.5]] * 4, np.float32)  # range 2: (v + 1) × 127.5 → 0, 255, 127.5 → 128, 191.25
FLOAT_8 = np.array([[0, 255, 128, 191]] * 4, np.uint8)


def _save(path: Path, image: Image.Image, fmt: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    path.write_bytes(buffer.getvalue())


def _cmyk(gray: np.ndarray) -> Image.Image:
    pixels = np.zeros((*gray.shape, 4), np.uint8)
    pixels[..., 3] = 255 - gray
    return Image.fromarray(pixels, mode="CMYK")


def _palette(gray: np.ndarray) -> Image.Image:
    """Indices 255 − gray into a reversed gray palette: PIL's conversion must look the palette up."""
    image = Image.fromarray(255 - gray, mode="P")
    image.putpalette([level for index in range(256) for level in [255 - index] * 3])
    return image


JPEG_BYTES = io.BytesIO()
Image.fromarray(np.tile(GRAY, (4, 4)), mode="L").save(JPEG_BYTES, "JPEG")

# kind -> (writer of the file at a path, expected status, expected mode, expected pixels or None)
IMAGE_CASES: dict[str, tuple[Callable[[Path], None], str, str, np.ndarray | None]] = {
    "8-bit grayscale PNG": (lambda p: _save(p, Image.fromarray(GRAY, mode="L"), "PNG"), "ok", "L", GRAY),
    "RGB PNG": (lambda p: _save(p, Image.fromarray(np.stack([GRAY] * 3, -1), mode="RGB"), "PNG"), "ok", "RGB",
                GRAY),
    "RGBA PNG": (lambda p: _save(p, Image.fromarray(np.stack([GRAY] * 3 + [GRAY * 0 + 200], -1), mode="RGBA"),
                                 "PNG"), "ok", "RGBA", GRAY),
    "CMYK TIFF": (lambda p: _save(p, _cmyk(GRAY), "TIFF"), "ok", "CMYK", GRAY),
    "palette PNG": (lambda p: _save(p, _palette(GRAY), "PNG"), "ok", "P", GRAY),
    "16-bit PNG, 12-bit values": (lambda p: _save(p, Image.fromarray(TWELVE_BIT), "PNG"), "ok", "I;16",
                                  TWELVE_BIT_8),
    "16-bit PNG, full range": (lambda p: _save(p, Image.fromarray(FULL_16), "PNG"), "ok", "I;16", FULL_16_8),
    "16-bit TIFF": (lambda p: _save(p, Image.fromarray(TWELVE_BIT), "TIFF"), "ok", "I;16", TWELVE_BIT_8),
    "32-bit float TIFF": (lambda p: _save(p, Image.fromarray(FLOAT), "TIFF"), "ok", "F", FLOAT_8),
    "constant 16-bit PNG": (lambda p: _save(p, Image.fromarray(np.full((4, 4), 777, np.uint16)), "PNG"), "ok",
                            "I;16", np.zeros((4, 4), np.uint8)),
    "float TIFF with NaN": (lambda p: _save(p, Image.fromarray(np.where(FLOAT > 0.6, np.nan, FLOAT).astype(np.float32)), "TIFF"),
                            "corrupt", "", None),
    "truncated JPEG": (lambda p: p.write_bytes(JPEG_BYTES.getvalue()[: len(JPEG_BYTES.getvalue()) // 2]),
                       "corrupt", "", None),
    "empty file": (lambda p: p.write_bytes(b""), "corrupt", "", None),
    "text file named .jpg": (lambda p: p.write_text("not an image\n"), "corrupt", "", None),
    "renamed (not at its path)": (lambda p: p.with_name("renamed.jpg").write_bytes(JPEG_BYTES.getvalue()),
                                  "missing", "", None),
    "missing": (lambda p: None, "missing", "", None),
}


def test_every_image_kind_is_decoded_by_its_rule_or_counted(tmp_path, caplog):
    names = list(IMAGE_CASES)
    for number, name in enumerate(names):
        IMAGE_CASES[name][0](tmp_path / f"img{number:02d}.jpg")
    studies = pd.DataFrame({"stay_id": range(len(names)), "dicom_id": [f"img{n:02d}" for n in range(len(names))],
                            "view_position": "AP", "path": [f"img{n:02d}.jpg" for n in range(len(names))]})
    with caplog.at_level(logging.INFO, logger="ehrcxr"):
        summary = build_cxr_cache(tmp_path, studies, SIZE, tmp_path / "images.npy", tmp_path / "index.parquet")
    images, index = load_cxr_cache(tmp_path / "images.npy", tmp_path / "index.parquet")
    for number, name in enumerate(names):
        _, status, mode, pixels = IMAGE_CASES[name]
        row = index.iloc[number]
        assert (row["status"], row["input_mode"]) == (status, mode), name
        if pixels is not None:
            np.testing.assert_array_equal(images[row["row"]], pixels, err_msg=name)
    assert (summary["ok"], summary["corrupt"], summary["missing"]) == (10, 4, 2)
    assert summary["modes"] == {"CMYK": 1, "F": 1, "I;16": 4, "L": 1, "P": 1, "RGB": 1, "RGBA": 1}
    assert "decoded images per input mode: CMYK 1, F 1, I;16 4, L 1, P 1, RGB 1, RGBA 1" in caplog.text
    assert "5 high-bit-depth images mapped to 8 bits by their own min-max range" in caplog.text


def test_large_16_bit_image_is_resized_after_range_mapping(tmp_path):
    """A 16-bit radiograph of 12-bit values is never near-white: its 8-bit mean follows its range."""
    rng = np.random.default_rng(0)
    twelve = rng.integers(0, 4096, size=(64, 48)).astype(np.uint16)
    twelve[0, 0], twelve[0, 1] = 0, 4095
    _save(tmp_path / "x.png", Image.fromarray(twelve), "PNG")
    studies = pd.DataFrame({"stay_id": [1], "dicom_id": ["x"], "view_position": ["PA"], "path": ["x.png"]})
    build_cxr_cache(tmp_path, studies, 16, tmp_path / "images.npy", tmp_path / "index.parquet")
    images, _ = load_cxr_cache(tmp_path / "images.npy", tmp_path / "index.parquet")
    eight = np.rint(twelve * (255 / 4095)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(eight).resize((16, 21), Image.Resampling.BILINEAR).crop((0, 2, 16, 18)))
    np.testing.assert_array_equal(images[0], expected)
    assert abs(float(images[0].mean()) - 127.5) < 10  # saturation would give ~255
