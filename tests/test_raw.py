"""Raw MIMIC readers: errors that name file/column/row, string ICD codes, CXR time and path helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrcxr.data import events, raw
from ehrcxr.resources import CHEXPERT_LABELS
from tiny_mimic import ADMISSIONS, ICUSTAYS, mimic_cxr_tables, mimic_iv_tables, mimic_iv_tables_as, write_tables

# (release, file suffix) pairs users have on disk: v1.0 was commonly unpacked to plain .csv.
RELEASES = [("v1.0", ".csv"), ("v2.0", ".csv.gz"), ("v3-style", ".csv.gz")]


@pytest.fixture()
def mimic_iv(tmp_path: Path) -> Path:
    write_tables(tmp_path, mimic_iv_tables())
    return tmp_path


def _write_many_icustays(root: Path, copies: int = 3000) -> tuple[Path, pd.DataFrame]:
    """icustays repeated ``copies`` times with unique stay ids (large enough that a cut gzip keeps its header)."""
    stays = pd.concat([ICUSTAYS] * copies, ignore_index=True)
    stays["stay_id"] = np.arange(len(stays), dtype="int64") + 1
    write_tables(root, {"icu/icustays": stays})
    return root / "icu" / "icustays.csv.gz", stays


def test_icd_codes_stay_strings_with_leading_zeros(mimic_iv: Path) -> None:
    diagnoses = raw.read_table(mimic_iv, "diagnoses_icd")
    codes = diagnoses["icd_code"].tolist()
    assert codes[0] == "0389" and "4019" in codes and "I10" in codes
    assert diagnoses["icd_version"].dtype == np.int64
    assert diagnoses["subject_id"].dtype == np.int64


def test_timestamps_parsed_and_blank_is_nat(mimic_iv: Path) -> None:
    admissions = raw.read_table(mimic_iv, "admissions", ["hadm_id", "admittime", "deathtime"])
    first = admissions.iloc[0]
    assert first["admittime"] == pd.Timestamp("2150-01-01 08:00:00")
    assert pd.isna(first["deathtime"])
    assert admissions["deathtime"].notna().sum() == 2  # the two deaths typed in tiny_mimic


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    path, stays = _write_many_icustays(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(raw.RawDataError, match="icustays.csv.gz"):
        raw.read_table(tmp_path, "icustays")
    path.write_bytes(data[:20])  # not even a header left
    with pytest.raises(raw.RawDataError, match="header of .*icustays.csv.gz"):
        raw.read_table(tmp_path, "icustays")


def test_missing_column_is_named(mimic_iv: Path) -> None:
    tables = mimic_iv_tables()
    write_tables(mimic_iv, {"hosp/admissions": tables["hosp/admissions"].drop(columns=["race"])})
    with pytest.raises(raw.RawDataError, match=r"admissions.csv.gz: missing column\(s\) race"):
        raw.read_table(mimic_iv, "admissions")


def test_schema_check_lists_every_problem(mimic_iv: Path) -> None:
    tables = mimic_iv_tables()
    write_tables(mimic_iv, {"icu/icustays": tables["icu/icustays"].drop(columns=["intime", "los"])})
    (mimic_iv / "hosp" / "patients.csv.gz").unlink()
    with pytest.raises(raw.RawDataError) as error:
        raw.check_mimic_iv(mimic_iv, ["patients", "admissions", "icustays"])
    message = str(error.value)
    assert "hosp/patients.csv.gz" in message
    assert "icustays.csv.gz: missing column(s) intime, los" in message
    assert "admissions" not in message


def test_non_numeric_id_names_column_and_row(tmp_path: Path) -> None:
    path, stays = _write_many_icustays(tmp_path)
    stays["stay_id"] = stays["stay_id"].astype(str)
    stays.loc[4500, "stay_id"] = "abc"  # data row 4501
    write_tables(tmp_path, {"icu/icustays": stays})
    with pytest.raises(raw.RawDataError, match=r"icustays.csv.gz: column 'stay_id', data row 4501: value 'abc'"):
        raw.read_table(tmp_path, "icustays")


def test_unparsable_timestamp_names_column_and_row(tmp_path: Path) -> None:
    _, stays = _write_many_icustays(tmp_path)
    stays.loc[4500, "intime"] = "2150-13-45 10:00:00"
    write_tables(tmp_path, {"icu/icustays": stays})
    expected = r"icustays.csv.gz: column 'intime', data row 4501: cannot parse timestamp '2150-13-45 10:00:00'"
    with pytest.raises(raw.RawDataError, match=expected):
        raw.read_table(tmp_path, "icustays")


def test_chexpert_labels_are_floats_with_blanks_as_nan(tmp_path: Path) -> None:
    write_tables(tmp_path, mimic_cxr_tables())
    chexpert = raw.read_table(tmp_path, "chexpert", specs=raw.CXR_TABLES).set_index("study_id")
    assert list(chexpert.columns) == ["subject_id", *CHEXPERT_LABELS]
    row = chexpert.loc[50000104]
    assert (row["Atelectasis"], row["Cardiomegaly"], row["Edema"], row["Support Devices"]) == (1.0, -1.0, 0.0, 1.0)
    assert np.isnan(row["Pneumonia"])


def test_cxr_study_datetime_handles_dropped_leading_zero_and_fraction() -> None:
    times = raw.cxr_study_datetime(pd.Series([21800101, 21800101, 21800101, 21491231]),
                                   pd.Series([80556.875, 0.0, 235959.5, 200000.0]))
    assert times.tolist() == [pd.Timestamp("2180-01-01 08:05:56.875"), pd.Timestamp("2180-01-01 00:00:00"),
                              pd.Timestamp("2180-01-01 23:59:59.5"), pd.Timestamp("2149-12-31 20:00:00")]


def test_cxr_image_relpath_follows_official_layout() -> None:
    paths = raw.cxr_image_relpath(pd.Series([10000032, 19999987]), pd.Series([50414267, 58971208]),
                                  pd.Series(["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "abc"]))
    assert paths.tolist() == [
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
        "files/p19/p19999987/s58971208/abc.jpg"]


def test_text_values_like_none_are_data_not_missing(tmp_path: Path) -> None:
    # MIMIC-IV writes GCS eye opening 'None' (score 1) as text; only an empty field is missing
    path = tmp_path / "icu"
    path.mkdir()
    pd.DataFrame({"subject_id": [1, 1], "hadm_id": [2, 2], "stay_id": [3, 3], "caregiver_id": ["", ""],
                  "charttime": ["2150-01-01 10:00:00"] * 2, "storetime": ["", ""], "itemid": [220739, 220739],
                  "value": ["None", ""], "valuenum": [1.0, None], "valueuom": ["", ""], "warning": ["", ""]}
                 ).to_csv(path / "chartevents.csv.gz", index=False)
    events = raw.read_table(tmp_path, "chartevents", ["stay_id", "value", "valuenum"])
    assert events["value"].iloc[0] == "None"
    assert pd.isna(events["value"].iloc[1]) and pd.isna(events["valuenum"].iloc[1])


@pytest.mark.parametrize("release,suffix", RELEASES)
def test_every_release_layout_reads_as_canonical_v2_tables(tmp_path: Path, release: str, suffix: str) -> None:
    write_tables(tmp_path / "v2.2", mimic_iv_tables())
    write_tables(tmp_path / release, mimic_iv_tables_as(release), suffix)
    for name in raw.MIMIC_IV_TABLES:
        expected = raw.read_table(tmp_path / "v2.2", name)
        got = raw.read_table(tmp_path / release, name)
        pd.testing.assert_frame_equal(got, expected, check_like=True)  # v3-style files have another column order
    folder = "core" if release == "v1.0" else "hosp"
    assert raw.table_path(tmp_path / release, raw.MIMIC_IV_TABLES["admissions"]) == (
        tmp_path / release / folder / f"admissions{suffix}")
    admissions = raw.read_table(tmp_path / release, "admissions", ["hadm_id", "race"])
    assert admissions["race"].tolist()[:3] == ["WHITE", "WHITE", "HISPANIC/LATINO - PUERTO RICAN"]
    assert admissions["race"].isna().tolist() == ADMISSIONS["race"].isna().tolist()  # 10000009's race is blank
    assert raw.read_header(raw.table_path(tmp_path / release, raw.MIMIC_IV_TABLES["admissions"]),
                           raw.MIMIC_IV_TABLES["admissions"]).count("race") == 1
    chart = raw.table_path(tmp_path / release, raw.MIMIC_IV_TABLES["chartevents"])
    blocks = list(events.iter_blocks(chart, ["stay_id", "charttime", "itemid", "valuenum"], block_size=256))
    assert len(blocks) > 1 and [first for _, first in blocks][0] == 0
    valuenum = [v for block, _ in blocks for v in block.column("valuenum").to_pylist()]
    assert valuenum == [70.0, 80.0, 120.0, 4.0, 90.0, 98.6, 100.0, 50.0, 110.0]


@pytest.mark.parametrize("release,suffix", RELEASES)
def test_icd_codes_keep_leading_zeros_in_every_layout(tmp_path: Path, release: str, suffix: str) -> None:
    write_tables(tmp_path, mimic_iv_tables_as(release), suffix)
    diagnoses = raw.read_table(tmp_path, "diagnoses_icd", ["hadm_id", "icd_code", "icd_version"])
    first = diagnoses[diagnoses["hadm_id"] == 20000001].iloc[0]
    assert (first["icd_code"], first["icd_version"]) == ("0389", 9)
    assert str(diagnoses["icd_code"].dtype) == "string"
    assert (diagnoses["icd_code"] == "0389").sum() == 4  # subjects 10000001, 10000002, 10000007, 10000009


def test_v1_schema_check_names_both_candidate_paths_and_renamed_columns(tmp_path: Path) -> None:
    tables = mimic_iv_tables_as("v1.0")
    tables["core/admissions"] = tables["core/admissions"].rename(columns={"subject_id": "subjectid",
                                                                          "ethnicity": "ethnic_group"})
    del tables["core/patients"]
    write_tables(tmp_path, tables, ".csv")
    with pytest.raises(raw.RawDataError) as error:
        raw.check_mimic_iv(tmp_path)
    message = str(error.value)
    assert (f"missing raw file: {tmp_path}/hosp/patients.csv.gz (or .csv); "
            f"nor {tmp_path}/core/patients.csv.gz (or .csv)") in message
    assert f"{tmp_path}/core/admissions.csv: missing column(s) subject_id, race (or ethnicity)" in message
    assert "icustays" not in message and "chartevents" not in message  # the intact tables are not blamed
    with pytest.raises(raw.RawDataError, match=r"core/admissions.csv: missing column\(s\) subject_id$"):
        raw.read_table(tmp_path, "admissions", ["subject_id", "hadm_id"])


def test_current_layout_wins_over_the_v1_location(tmp_path: Path) -> None:
    write_tables(tmp_path, {"hosp/patients": mimic_iv_tables()["hosp/patients"]})
    write_tables(tmp_path, {"core/patients": mimic_iv_tables()["hosp/patients"].iloc[:2]}, ".csv")
    assert raw.table_path(tmp_path, raw.MIMIC_IV_TABLES["patients"]) == tmp_path / "hosp" / "patients.csv.gz"
    assert len(raw.read_table(tmp_path, "patients")) == 9


def test_v1_unparsable_timestamp_names_v1_file_column_and_row(tmp_path: Path) -> None:
    tables = mimic_iv_tables_as("v1.0")
    tables["core/admissions"].loc[4, "dischtime"] = "2180-05-08 12:00:00 noon"
    write_tables(tmp_path, tables, ".csv")
    with pytest.raises(raw.RawDataError, match=r"core/admissions.csv: column 'dischtime', data row 5: cannot parse"):
        raw.read_table(tmp_path, "admissions")


def test_cxr_image_relpath_flat_layout_and_unknown_layout() -> None:
    subjects, studies = pd.Series([10000032, 19999987]), pd.Series([50414267, 58971208])
    dicoms = pd.Series(["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "abc"])
    assert raw.cxr_image_relpath(subjects, studies, dicoms, "flat").tolist() == [
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg", "abc.jpg"]
    with pytest.raises(ValueError, match="cxr_image_layout must be one of official, flat, got 'nested'"):
        raw.cxr_image_relpath(subjects, studies, dicoms, "nested")
