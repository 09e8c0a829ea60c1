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
from ehrcxr.data.events import MS_PER_HOUR, HourlyBins, prefetch
from ehrcxr.data.raw import RawDataError
from ehrcxr.synthetic import generate
from ehrcxr.data.tasks import task_stays
from naive_extraction import naive_hourly_codes
from test_ehr import chart_rows, fluid_lab_rows, lab_rows, static_chart_rows, stays_frame, write_tables


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


def test_hourly_bins_keep_the_latest_event_whatever_the_update_order():
    hour = MS_PER_HOUR
    updates = [  # (stay, ms since intime, row key, variable, code)
        (0, hour + 100, 5, 2, 10.0), (0, hour + 100, 9, 2, 11.0), (0, hour + 50, 20, 2, 12.0),  # tie: row 9 -> 11
        (1, 0, 3, 0, 20.0), (1, hour // 2, 1, 0, 21.0),                   # later within hour 0 wins -> 21
        (0, -2 * hour, 7, 1, 30.0), (0, -hour, 2, 1, 31.0), (0, -hour, 1, 1, 32.0),  # last before intime -> 31
        (1, -10, 50, 0, 40.0),                                            # hour 0 of its own wins over it
    ]
    for permutation in (list(range(9)), list(range(9))[::-1], [2, 7, 4, 0, 8, 3, 6, 1, 5]):
        bins = HourlyBins(2, 2, 3)
        for split in (permutation[:4], permutation[4:]):   # two blocks
            rows = np.array([updates[i] for i in split], dtype=object)
            bins.update(rows[:, 0].astype(int), rows[:, 1].astype(np.int64), rows[:, 2].astype(np.int64),
                        rows[:, 3].astype(int), rows[:, 4].astype(float))
        codes, carried = bins.codes()
        assert (codes[0, 1, 2], codes[1, 0, 0], codes[0, 0, 1]) == (11.0, 21.0, 31.0)
        assert np.isnan(codes).sum() == 2 * 2 * 3 - 3
        assert np.argwhere(carried).tolist() == [[0, 1]]


@pytest.mark.parametrize("itemid_map", ["corrected", "benchmark"])
def test_streaming_equals_in_memory_path_with_static_and_fluid_rows(tmp_path, itemid_map):
    write_tables(tmp_path, chart_rows() + static_chart_rows(), lab_rows() + fluid_lab_rows())
    cohort, layout = ehr.prepare_stays(stays_frame()), ehr.channel_layout()
    expected = naive_hourly_codes(tmp_path, cohort, 48, layout, itemid_map=itemid_map)
    stay_300, height, ph = 2, layout.variables.index("Height"), layout.variables.index("pH")
    assert expected[stay_300, 0, height] == pytest.approx(177.8)        # carried from before intime
    assert np.isnan(expected[stay_300, 3, ph]) == (itemid_map == "corrected")  # urine pH 6.5 in hour 3
    for block_size in (200, 1 << 20):
        codes, _ = ehr.extract_hourly_codes(tmp_path, cohort, 48, layout, itemid_map=itemid_map,
                                            block_size=block_size)
        np.testing.assert_array_equal(codes, expected)


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
