"""Streaming event extraction: equal to the simple in-memory path, independent of block size and threads,
and clear about bad input (file, column, row)."""
from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pandas as pd
import pytest

from ehrcxr.data import ehr
from ehrcxr.data.cohort import build_cohort
from ehrcxr.data.events import HourlyBins, prefetch
from ehrcxr.data.raw import RawDataError
from ehrcxr.synthetic import generate
from ehrcxr.data.tasks import task_stays
from naive_extraction import naive_hourly_codes
from test_ehr import chart_rows, lab_rows, stays_frame, write_tables


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, n_stays=300, seed=3, image_size=32)
    stays, _ = build_cohort(out / "mimic-iv", out / "mimic-cxr-jpg")
    return out / "mimic-iv", ehr.prepare_stays(task_stays(stays, "phenotyping"))


def test_streaming_equals_in_memory_path_for_any_block_size_and_threads(synthetic):
    root, cohort = synthetic
    layout = ehr.channel_layout()
    expected = naive_hourly_codes(root, cohort, 48, layout)
    assert np.isfinite(expected).sum() > 10_000  # a real comparison, not two empty grids
    for block_size, threads in ((1 << 14, 1), (1 << 16, 4), (16 << 20, 2)):  # 4: both tables at once
        codes, counts = ehr.extract_hourly_codes(root, cohort, 48, layout, threads=threads, block_size=block_size)
        np.testing.assert_array_equal(codes, expected)
        assert counts["outside_window"] > 0


def test_hourly_bins_keep_the_largest_order_key_whatever_the_update_order():
    updates = [  # (stay, hour, variable, code, order)
        (0, 1, 2, 10.0, 5), (0, 1, 2, 11.0, 9), (0, 1, 2, 12.0, 7),   # one bin: order 9 wins -> 11
        (1, 0, 0, 20.0, 3), (1, 0, 0, 21.0, 3 << 41),                  # later within the hour wins -> 21
    ]
    for permutation in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]):
        bins = HourlyBins(2, 2, 3)
        for split in (permutation[:2], permutation[2:]):   # two blocks
            rows = np.array([updates[i] for i in split], dtype=object)
            bins.update(rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2].astype(int),
                        rows[:, 3].astype(float), rows[:, 4].astype(np.int64))
        assert bins.code[0, 1, 2] == 11.0 and bins.code[1, 0, 0] == 21.0
        assert np.isnan(bins.code).sum() == 2 * 2 * 3 - 2


def test_prefetch_yields_in_order_and_reraises_errors_in_the_caller():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise RawDataError("broken block")

    seen = []
    with pytest.raises(RawDataError, match="broken block"):
        for item in prefetch(failing()):
            seen.append(item)
    assert seen == [1]


def _with_chart_row(tmp_path, **overrides) -> None:
    charts = chart_rows()
    charts[3] = {**charts[3], **overrides}
    write_tables(tmp_path, charts, lab_rows())


def test_unparsable_charttime_names_file_column_and_row(tmp_path):
    _with_chart_row(tmp_path, charttime="2150-01-01 25:99")
    with pytest.raises(RawDataError, match=r"chartevents\.csv\.gz: column 'charttime', data row 4: .*25:99"):
        ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=300)


def test_non_numeric_itemid_names_file_column_and_row(tmp_path):
    _with_chart_row(tmp_path, itemid="HR")
    with pytest.raises(RawDataError, match=r"chartevents\.csv\.gz: column 'itemid', data row 4: value 'HR'"):
        ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=300)


def test_truncated_gzip_names_the_file_and_the_rows_read(tmp_path):
    write_tables(tmp_path, chart_rows() * 4000, lab_rows())
    path = tmp_path / "icu" / "chartevents.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match=r"chartevents\.csv\.gz: cannot be read after data row \d+"):
        ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=1 << 16)
    assert gzip.decompress(data).count(b"\n") > 1  # the intact file was readable


def test_unknown_gcs_text_is_counted_and_logged_once_with_examples(tmp_path, caplog):
    _with_chart_row(tmp_path, itemid=223900, value="Sleepy", valuenum=np.nan)  # verbal response
    with caplog.at_level(logging.WARNING, logger="ehrcxr.ehr"):
        dataset = ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=300)
    assert dataset.attrs["dropped_unknown_gcs"] == 2  # this row and the fixture's 'Mumbles loudly'
    warnings = [r.getMessage() for r in caplog.records if "unknown value" in r.getMessage()]
    assert len(warnings) == 1 and "'Sleepy': 1" in warnings[0] and "'Mumbles loudly': 1" in warnings[0]


def test_duplicate_charting_at_the_same_time_keeps_the_later_row(tmp_path):
    h = pd.Timedelta(hours=1)
    t1 = stays_frame().set_index("stay_id").loc[300, "intime"]
    charts = chart_rows()
    charts += [dict(charts[1], charttime=str(t1 + 20 * h), value="71", valuenum=71.0),
               dict(charts[1], charttime=str(t1 + 20 * h), value="72", valuenum=72.0)]
    write_tables(tmp_path, charts, lab_rows())
    for block_size in (200, 1 << 20):  # duplicates in one block and across blocks
        dataset = ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=block_size)
        stats = json.loads(dataset.attrs["normaliser"])["Heart Rate"]
        value = dataset["values"].sel(feature="Heart Rate").values[list(dataset["stay_id"].values).index(300), 20]
        assert value * stats["std"] + stats["mean"] == pytest.approx(72.0, abs=1e-4)


def test_lab_text_values_parse_when_numeric_and_count_when_not(tmp_path):
    h = pd.Timedelta(hours=1)
    t3 = stays_frame().set_index("stay_id").loc[400, "intime"]  # test stay 400: subject 30, hadm 300
    labs = lab_rows() + [
        {"subject_id": 30, "hadm_id": 300, "charttime": str(t3 + 2.5 * h), "itemid": 50820, "value": " 7.31 ",
         "valuenum": np.nan, "valueuom": "units"},                       # pH as text only: parsed, hour 2
        {"subject_id": 30, "hadm_id": 300, "charttime": str(t3 + 3.5 * h), "itemid": 50931, "value": "___",
         "valuenum": np.nan, "valueuom": "mg/dL"},                       # de-identified / unusable: counted
        {"subject_id": 30, "hadm_id": 300, "charttime": str(t3 + 4.5 * h), "itemid": 50931, "value": "ERROR",
         "valuenum": np.nan, "valueuom": "mg/dL"}]
    write_tables(tmp_path, chart_rows(), labs)
    dataset = ehr.build_ehr_tensor(tmp_path, stays_frame(), block_size=300)
    assert dataset.attrs["dropped_non_numeric"] == 1 + 2   # the fixture's HR 'error' + two glucose texts
    stay = list(dataset["stay_id"].values).index(400)
    stats = json.loads(dataset.attrs["normaliser"])["pH"]
    ph = dataset["values"].sel(feature="pH").values[stay]
    assert ph[2] * stats["std"] + stats["mean"] == pytest.approx(7.31, abs=1e-4)
    assert dataset["mask"].sel(variable="pH").values[stay, 2] == 1
    assert dataset["mask"].sel(variable="Glucose").values[stay, [3, 4]].tolist() == [0, 0]
