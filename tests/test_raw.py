"""Raw MIMIC readers: errors that name file/column/row, string ICD codes, CXR time and path helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrcxr.data import raw
from ehrcxr.resources import CHEXPERT_LABELS
from tiny_mimic import ICUSTAYS, mimic_cxr_tables, mimic_iv_tables, write_tables


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
    path, _ = _write_many_icustays(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(raw.RawDataError, match="icustays.csv.gz"):
        raw.read_table(tmp_path, "icustays")
    with pytest.raises(raw.RawDataError, match="icustays.csv.gz.*cannot be read"):
        list(raw.iter_table(tmp_path, "icustays", ["stay_id", "intime"], chunksize=1000))
    path.write_bytes(data[:20])  # not even a header left
    with pytest.raises(raw.RawDataError, match="header of .*icustays.csv.gz"):
        raw.read_table(tmp_path, "icustays")


def test_missing_column_is_named(mimic_iv: Path) -> None:
    tables = mimic_iv_tables()
    write_tables(mimic_iv, {"hosp/admissions": tables["hosp/admissions"].drop(columns=["race"])})
    with pytest.raises(raw.RawDataError, match=r"admissions.csv.gz: missing column\(s\) race"):
        raw.read_table(mimic_iv, "admissions")
    with pytest.raises(raw.RawDataError, match=r"missing column\(s\) race"):
        next(raw.iter_table(mimic_iv, "admissions", ["hadm_id", "race"]))


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
    with pytest.raises(raw.RawDataError, match=r"icustays.csv.gz \(after row 4000\): column 'stay_id', data row 4501"):
        list(raw.iter_table(tmp_path, "icustays", ["stay_id", "intime"], chunksize=1000))


def test_unparsable_timestamp_names_column_and_row(tmp_path: Path) -> None:
    _, stays = _write_many_icustays(tmp_path)
    stays.loc[4500, "intime"] = "2150-13-45 10:00:00"
    write_tables(tmp_path, {"icu/icustays": stays})
    expected = r"icustays.csv.gz: column 'intime', data row 4501: cannot parse timestamp '2150-13-45 10:00:00'"
    with pytest.raises(raw.RawDataError, match=expected):
        raw.read_table(tmp_path, "icustays")
    with pytest.raises(raw.RawDataError, match=expected):
        list(raw.iter_table(tmp_path, "icustays", ["stay_id", "intime"], chunksize=1000))


def test_iter_table_chunks_cover_the_table_and_skip_unrequested_timestamps(tmp_path: Path) -> None:
    _, stays = _write_many_icustays(tmp_path, copies=10)
    chunks = list(raw.iter_table(tmp_path, "icustays", ["stay_id", "intime"], chunksize=40))
    assert [len(c) for c in chunks] == [40, 40, 30]
    combined = pd.concat(chunks, ignore_index=True)
    assert combined["stay_id"].tolist() == list(range(1, 111))
    assert combined["intime"].iloc[0] == pd.Timestamp("2150-01-01 10:00:00")


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
