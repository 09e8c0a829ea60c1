"""EHR tensor stage on hand-made MIMIC-IV v2.2 chartevents/labevents with hand-computed expectations."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ehrcxr.data.ehr import build_ehr_tensor, load_ehr_tensor, run_ehr_tensor
from ehrcxr.data.raw import RawDataError

CHART_COLUMNS = ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid", "value",
                 "valuenum", "valueuom", "warning"]
LAB_COLUMNS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
               "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag",
               "priority", "comments"]

T1 = pd.Timestamp("2150-01-01 00:00")   # stay 300 (train): subject 10, hadm 100, 72 h long
T2 = pd.Timestamp("2150-02-01 08:00")   # stay 200 (train): subject 20, hadm 200, 10.5 h long
T3 = pd.Timestamp("2150-03-01 00:00")   # stay 400 (test):  subject 30, hadm 300, 60 h long
T4 = pd.Timestamp("2150-04-01 00:00")   # stay 100 (val):   subject 40, hadm 400, 50 h long, no events

HR, SBP, DBP, FIO2, SPO2 = 220045, 220179, 220180, 223835, 220277
TEMP_F, TEMP_C, WEIGHT_LBS, HEIGHT_IN = 223761, 223762, 226531, 226707
WEIGHT_KG, HEIGHT_CM = 226512, 226730
EYE, VERBAL, MOTOR = 220739, 223900, 223901
GLUCOSE_LAB, PH_LAB = 50931, 50820
GLUCOSE_URINE, PH_URINE, PH_URINE_CHEMISTRY, PH_OTHER_FLUID = 51478, 51491, 51094, 50831


def stays_frame() -> pd.DataFrame:
    rows = [(300, 10, 100, T1, 72.0, "train"), (200, 20, 200, T2, 10.5, "train"),
            (400, 30, 300, T3, 60.0, "test"), (100, 40, 400, T4, 50.0, "val")]
    frame = pd.DataFrame(rows, columns=["stay_id", "subject_id", "hadm_id", "intime", "los_hours", "split"])
    frame["outtime"] = frame["intime"] + pd.to_timedelta(frame["los_hours"], unit="h")
    frame["in_mortality_task"] = frame["los_hours"] >= 48
    return frame


def chart(subject, hadm, stay, time, itemid, value, valuenum, uom=""):
    return {"subject_id": subject, "hadm_id": hadm, "stay_id": stay, "charttime": str(time), "itemid": itemid,
            "value": value, "valuenum": valuenum, "valueuom": uom}


def chart_rows(test_stay_hr=(200.0, 150.0)) -> list[dict]:
    h = pd.Timedelta(hours=1)
    s1 = dict(subject=10, hadm=100, stay=300)
    return [
        chart(**s1, time=T1 + 1.5 * h, itemid=TEMP_F, value="98.6", valuenum=98.6, uom="°F"),      # hour 1: 37.0 °C
        chart(**s1, time=T1 + 2.2 * h, itemid=HR, value="80", valuenum=80),
        chart(**s1, time=T1 + 2.8 * h, itemid=HR, value="90", valuenum=90),                        # hour 2: 90 wins
        chart(**s1, time=T1 + 3 * h, itemid=HR, value="100", valuenum=100),
        chart(**s1, time=T1 + 3 * h, itemid=HR, value="110", valuenum=110),                        # tie: later row
        chart(**s1, time=T1 + 5 * h, itemid=WEIGHT_LBS, value="200", valuenum=200),                # 90.718474 kg
        chart(**s1, time=T1 + 5 * h, itemid=HEIGHT_IN, value="70", valuenum=70, uom="Inch"),       # 177.8 cm
        chart(**s1, time=T1 + 6 * h, itemid=FIO2, value="50", valuenum=50),                        # 0.5
        chart(**s1, time=T1 + 6 * h, itemid=SPO2, value="0.97", valuenum=0.97, uom="%"),           # 97
        chart(**s1, time=T1 + 7 * h, itemid=FIO2, value="0.4", valuenum=0.4),                      # 0.4
        chart(**s1, time=T1 + 8 * h, itemid=SBP, value="120/80", valuenum=np.nan),                 # 120
        chart(**s1, time=T1 + 8 * h, itemid=DBP, value="120/80", valuenum=np.nan),                 # 80
        chart(**s1, time=T1 + 9 * h, itemid=EYE, value="To Speech", valuenum=3),                   # '3 To speech'
        chart(**s1, time=T1 + 9 * h, itemid=MOTOR, value=None, valuenum=5),                        # '5 Localizes Pain'
        chart(**s1, time=T1 + 9 * h, itemid=VERBAL, value="No Response-ETT", valuenum=1),          # own category
        chart(**s1, time=T1 + 10 * h, itemid=VERBAL, value="Mumbles loudly", valuenum=np.nan),     # unknown GCS
        chart(**s1, time=T1 + 11 * h, itemid=HR, value="400", valuenum=400),                       # out of range
        chart(**s1, time=T1 + 12 * h, itemid=HR, value="error", valuenum=np.nan),                  # non-numeric
        chart(**s1, time=T1 + 14 * h, itemid=EYE, value="None", valuenum=1),                       # '1 No Response'
        chart(**s1, time=T1 + 47.9 * h, itemid=TEMP_C, value="38.0", valuenum=38.0, uom="°C"),     # hour 47
        chart(**s1, time=T1 + 49 * h, itemid=HR, value="60", valuenum=60),                         # after 48 h
        chart(**s1, time=T1 - 1 * h, itemid=HR, value="60", valuenum=60),                          # before intime
        chart(subject=10, hadm=100, stay=555, time=T1 + 4 * h, itemid=HR, value="61", valuenum=61),  # other stay
        chart(subject=20, hadm=200, stay=200, time=T2 + 0.5 * h, itemid=HR, value="70", valuenum=70),
        chart(subject=20, hadm=200, stay=None, time=T2 + 2 * h, itemid=HR, value="75", valuenum=75),  # by hadm+time
        chart(subject=20, hadm=200, stay=200, time=T2 + 10.25 * h, itemid=HR, value="65", valuenum=65),
        chart(subject=20, hadm=200, stay=200, time=T2 + 10.6 * h, itemid=HR, value="66", valuenum=66),  # > outtime
        chart(subject=30, hadm=300, stay=400, time=T3, itemid=HR, value=str(test_stay_hr[0]),
              valuenum=test_stay_hr[0]),
        chart(subject=30, hadm=300, stay=400, time=T3 + 5 * h, itemid=HR, value=str(test_stay_hr[1]),
              valuenum=test_stay_hr[1]),
        chart(subject=99, hadm=990, stay=990, time=T3, itemid=HR, value="50", valuenum=50),        # not in cohort
    ]


def lab(subject, hadm, time, itemid, value, valuenum):
    return {"subject_id": subject, "hadm_id": hadm, "charttime": str(time), "itemid": itemid, "value": value,
            "valuenum": valuenum, "valueuom": "mg/dL"}


def lab_rows() -> list[dict]:
    h = pd.Timedelta(hours=1)
    return [
        lab(10, 100, T1 + 4.5 * h, GLUCOSE_LAB, "150", 150.0),    # hour 4 by hadm + time
        lab(10, None, T1 + 13.5 * h, PH_LAB, "7.3", 7.3),          # hour 13 by subject + time
        lab(10, 100, T1 - 4 * h, GLUCOSE_LAB, "160", 160.0),       # before intime
        lab(10, 999, T1 + 4 * h, GLUCOSE_LAB, "170", 170.0),       # another admission: unassigned
        lab(30, 300, T3 + 1 * h, GLUCOSE_LAB, "5000", 5000.0),     # out of range (test stay)
    ]


def write_tables(root, charts: list[dict], labs: list[dict], drop_chart_column: str | None = None) -> None:
    (root / "icu").mkdir(parents=True, exist_ok=True)
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    chart_frame = pd.DataFrame(charts).reindex(columns=CHART_COLUMNS)
    chart_frame["hadm_id"] = chart_frame["hadm_id"].astype("Int64")
    chart_frame["stay_id"] = chart_frame["stay_id"].astype("Int64")
    if drop_chart_column:
        chart_frame = chart_frame.drop(columns=drop_chart_column)
    chart_frame.to_csv(root / "icu" / "chartevents.csv.gz", index=False)
    lab_frame = pd.DataFrame(labs).reindex(columns=LAB_COLUMNS)
    lab_frame["labevent_id"] = np.arange(1, len(lab_frame) + 1)
    lab_frame["hadm_id"] = lab_frame["hadm_id"].astype("Int64")
    lab_frame.to_csv(root / "hosp" / "labevents.csv.gz", index=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic-iv")
    write_tables(root, chart_rows(), lab_rows())
    return root, build_ehr_tensor(root, stays_frame(), block_size=300)


def raw_values(ds, stay_id: int, feature: str) -> np.ndarray:
    """Undo the z-scoring of a continuous feature with the stored normaliser."""
    stats = json.loads(ds.attrs["normaliser"])[feature]
    scaled = ds["values"].sel(feature=feature).values[list(ds["stay_id"].values).index(stay_id)]
    return scaled.astype(np.float64) * stats["std"] + stats["mean"]


def at(ds, stay_id: int, name: str, kind: str = "values") -> np.ndarray:
    dim = "feature" if kind == "values" else "variable"
    return ds[kind].sel({dim: name}).values[list(ds["stay_id"].values).index(stay_id)]


def test_layout_and_lengths(built):
    _, ds = built
    assert list(ds["stay_id"].values) == [100, 200, 300, 400]
    assert ds.sizes == {"stay": 4, "hour": 48, "feature": 59, "variable": 17}
    assert ds["values"].dtype == np.float32 and ds["mask"].dtype == np.uint8
    assert list(ds["length"].values) == [48, 11, 48, 48]   # ceil(50), ceil(10.5), clip(72), clip(60)
    features = list(ds["feature"].values)
    assert features[:4] == ["Capillary refill rate->0.0", "Capillary refill rate->1.0", "Diastolic blood pressure",
                            "Fraction inspired oxygen"]
    assert features[4] == "Glascow coma scale eye opening->To Pain" and features[-1] == "pH"
    assert ds.attrs["hours"] == 48


def test_unit_conversions_and_cleaning(built):
    _, ds = built
    temperature = raw_values(ds, 300, "Temperature")
    assert temperature[0] == pytest.approx(36.6, abs=1e-4)          # normal value before the first observation
    assert temperature[1] == pytest.approx(37.0, abs=1e-4)          # 98.6 °F
    assert temperature[46] == pytest.approx(37.0, abs=1e-4)         # forward filled
    assert temperature[47] == pytest.approx(38.0, abs=1e-4)
    assert raw_values(ds, 300, "Weight")[5] == pytest.approx(200 * 0.45359237, abs=1e-3)
    assert raw_values(ds, 300, "Height")[5] == pytest.approx(177.8, abs=1e-3)
    fio2 = raw_values(ds, 300, "Fraction inspired oxygen")
    assert fio2[5] == pytest.approx(0.21, abs=1e-5) and fio2[6] == pytest.approx(0.5, abs=1e-5)
    assert fio2[7] == pytest.approx(0.4, abs=1e-5)
    assert raw_values(ds, 300, "Oxygen saturation")[6] == pytest.approx(97.0, abs=1e-3)
    assert raw_values(ds, 300, "Systolic blood pressure")[8] == pytest.approx(120.0, abs=1e-3)
    assert raw_values(ds, 300, "Diastolic blood pressure")[8] == pytest.approx(80.0, abs=1e-3)


def test_binning_last_wins_fill_and_masks(built):
    _, ds = built
    heart_rate = raw_values(ds, 300, "Heart Rate")
    expected = np.array([86, 86, 90] + [110] * 45, dtype=float)   # 400 (out of range) and 'error' never land
    np.testing.assert_allclose(heart_rate, expected, atol=1e-3)
    mask = at(ds, 300, "Heart Rate", "mask")
    assert list(np.flatnonzero(mask)) == [2, 3]
    assert list(np.flatnonzero(at(ds, 300, "Temperature", "mask"))) == [1, 47]
    assert list(np.flatnonzero(at(ds, 300, "Glucose", "mask"))) == [4]
    # Capillary refill and GCS total have no MIMIC-IV itemid: normal category, never observed.
    assert at(ds, 300, "Capillary refill rate->0.0").tolist() == [1.0] * 48
    assert at(ds, 300, "Glascow coma scale total->15").tolist() == [1.0] * 48
    assert ds["mask"].sel(variable=["Capillary refill rate", "Glascow coma scale total"]).values.sum() == 0
    # The val stay without events: all normal values, nothing observed.
    assert ds["mask"].values[0].sum() == 0
    assert raw_values(ds, 100, "Heart Rate") == pytest.approx(np.full(48, 86.0), abs=1e-3)


def test_labs_assigned_by_admission_and_by_subject(built):
    _, ds = built
    glucose = raw_values(ds, 300, "Glucose")
    assert glucose[3] == pytest.approx(128.0, abs=1e-3) and glucose[4] == pytest.approx(150.0, abs=1e-3)
    ph = raw_values(ds, 300, "pH")
    assert ph[12] == pytest.approx(7.4, abs=1e-5) and ph[13] == pytest.approx(7.3, abs=1e-5)
    assert at(ds, 300, "pH", "mask")[13] == 1


def test_gcs_text_and_scores_to_one_hot(built):
    _, ds = built
    eye = "Glascow coma scale eye opening->"
    assert at(ds, 300, eye + "4 Spontaneously")[8] == 1.0                      # normal before the first value
    assert at(ds, 300, eye + "3 To speech")[9] == 1.0                          # 'To Speech'
    assert at(ds, 300, eye + "To Speech")[9] == 0.0
    assert at(ds, 300, eye + "1 No Response")[14] == 1.0                       # 'None' (MIMIC-IV score 1)
    assert at(ds, 300, "Glascow coma scale motor response->5 Localizes Pain")[9] == 1.0  # score only
    verbal = "Glascow coma scale verbal response->"
    assert at(ds, 300, verbal + "No Response-ETT")[9] == 1.0
    assert at(ds, 300, verbal + "No Response-ETT")[10] == 1.0                  # unknown string: filled, unobserved
    assert list(np.flatnonzero(at(ds, 300, "Glascow coma scale verbal response", "mask"))) == [9]
    one_hot = ds["values"].values[:, :, 4:49]
    assert one_hot.sum(axis=2)[2].tolist() == [4.0] * 48                      # eye, motor, total, verbal: one each


def test_drop_counts(built):
    _, ds = built
    assert ds.attrs["dropped_unknown_gcs"] == 1
    assert ds.attrs["dropped_non_numeric"] == 1
    assert ds.attrs["dropped_out_of_range"] == 2        # HR 400, glucose 5000
    assert ds.attrs["dropped_outside_window"] == 4      # HR after 48 h, HR and lab before intime, HR after outtime
    assert ds.attrs["dropped_unassigned"] == 2          # chart row of stay 555, lab of admission 999


def test_short_stay_hadm_fallback_and_padding(built):
    _, ds = built
    position = 1   # stay 200
    heart_rate = raw_values(ds, 200, "Heart Rate")[:11]
    np.testing.assert_allclose(heart_rate, [70, 70] + [75] * 8 + [65], atol=1e-3)
    assert list(np.flatnonzero(at(ds, 200, "Heart Rate", "mask"))) == [0, 2, 10]
    assert np.all(ds["values"].values[position, 11:] == 0)
    assert np.all(ds["mask"].values[position, 11:] == 0)


def expected_train_columns() -> dict[str, np.ndarray]:
    """Imputed raw values over the valid hours of the train stays (200 then 300), worked out by hand."""
    s1_temp = [36.6] + [37.0] * 46 + [38.0]
    return {
        "Heart Rate": np.array([70, 70] + [75] * 8 + [65] + [86, 86, 90] + [110] * 45, dtype=float),
        "Temperature": np.array([36.6] * 11 + s1_temp),
        "Fraction inspired oxygen": np.array([0.21] * 11 + [0.21] * 6 + [0.5] + [0.4] * 41),
        "Glucose": np.array([128.0] * 11 + [128.0] * 4 + [150.0] * 44),
    }


def test_normaliser_matches_numpy_over_train_only(built, tmp_path):
    root, ds = built
    normaliser = json.loads(ds.attrs["normaliser"])
    assert len(normaliser) == 12
    for feature, column in expected_train_columns().items():
        assert normaliser[feature]["mean"] == pytest.approx(np.mean(column), rel=1e-9)
        assert normaliser[feature]["std"] == pytest.approx(np.std(column, ddof=1), rel=1e-9)
    # Never observed in a train stay: constant normal value, std clipped at 1e-7.
    assert normaliser["Mean blood pressure"] == {"mean": 77.0, "std": 1e-7}
    hr = normaliser["Heart Rate"]
    assert at(ds, 300, "Heart Rate")[2] == pytest.approx((90 - hr["mean"]) / hr["std"], rel=1e-5)

    other = tmp_path / "mimic-iv"
    write_tables(other, chart_rows(test_stay_hr=(40.0, 300.0)), lab_rows())
    changed = build_ehr_tensor(other, stays_frame())
    assert changed.attrs["normaliser"] == ds.attrs["normaliser"]
    assert raw_values(changed, 400, "Heart Rate")[0] == pytest.approx(40.0, abs=1e-3)
    assert raw_values(ds, 400, "Heart Rate")[0] == pytest.approx(200.0, abs=1e-3)


def test_run_writes_and_loads(built, tmp_path):
    root, ds = built
    stays_path = tmp_path / "stays.parquet"
    stays_frame().to_parquet(stays_path)
    out = tmp_path / "ehr" / "mortality.nc"
    run_ehr_tensor(root, stays_path, "mortality", out)
    loaded = load_ehr_tensor(out)
    assert loaded.attrs["itemid_map"] == "corrected"
    assert list(loaded["stay_id"].values) == [100, 300, 400]    # stay 200 (10.5 h) is not in the mortality task
    # The normaliser now sees only stay 300 as train, so it differs from the phenotyping one.
    hr = json.loads(loaded.attrs["normaliser"])["Heart Rate"]
    column = np.array([86, 86, 90] + [110] * 45, dtype=float)
    assert hr["mean"] == pytest.approx(column.mean()) and hr["std"] == pytest.approx(column.std(ddof=1))
    assert loaded["values"].dtype == np.float32 and loaded["mask"].dtype == np.uint8


def test_missing_chartevents_column_is_named(tmp_path):
    write_tables(tmp_path, chart_rows(), lab_rows(), drop_chart_column="valuenum")
    with pytest.raises(RawDataError, match=r"chartevents\.csv\.gz.*valuenum"):
        build_ehr_tensor(tmp_path, stays_frame())


def test_stays_without_split_column_rejected(built):
    root, _ = built
    with pytest.raises(ValueError, match="split"):
        build_ehr_tensor(root, stays_frame().drop(columns="split"))


def fluid_lab_rows() -> list[dict]:
    """Stay 300's glucose and pH labs from blood, urine and other body fluid (subject 10, admission 100)."""
    h = pd.Timedelta(hours=1)
    return [
        lab(10, 100, T1 + 1.5 * h, GLUCOSE_LAB, "150", 150.0),         # hour 1, blood
        lab(10, 100, T1 + 2.5 * h, GLUCOSE_URINE, "500", 500.0),       # hour 2, urine
        lab(10, 100, T1 + 3.5 * h, PH_URINE, "6.5", 6.5),              # hour 3, urine (hematology item)
        lab(10, 100, T1 + 4.5 * h, PH_OTHER_FLUID, "7.9", 7.9),        # hour 4, other body fluid
        lab(10, 100, T1 + 5.5 * h, PH_URINE_CHEMISTRY, "6.8", 6.8),    # hour 5, urine (chemistry item)
        lab(10, 100, T1 + 6.5 * h, PH_LAB, "7.3", 7.3),                # hour 6, blood ...
        lab(10, 100, T1 + 6.75 * h, PH_URINE, "7.0", 7.0),             # ... then urine, later in hour 6
    ]


@pytest.mark.parametrize("itemid_map,glucose,glucose_hours,ph,ph_hours", [
    ("corrected", [128, 150] + [150] * 46, [1], [7.4] * 6 + [7.3] * 42, [6]),
    ("benchmark", [128, 150] + [500] * 46, [1, 2], [7.4] * 3 + [6.5, 7.9, 6.8] + [7.0] * 42, [3, 4, 5, 6]),
])
def test_urine_and_other_fluid_labs_feed_only_the_benchmark_map(tmp_path, itemid_map, glucose, glucose_hours, ph,
                                                                 ph_hours):
    charts = [chart(subject=10, hadm=100, stay=300, time=T1, itemid=HR, value="80", valuenum=80)]
    write_tables(tmp_path, charts, fluid_lab_rows())
    dataset = build_ehr_tensor(tmp_path, stays_frame(), itemid_map=itemid_map, block_size=300)
    assert dataset.attrs["itemid_map"] == itemid_map
    np.testing.assert_allclose(raw_values(dataset, 300, "Glucose"), glucose, atol=1e-3)
    assert list(np.flatnonzero(at(dataset, 300, "Glucose", "mask"))) == glucose_hours
    np.testing.assert_allclose(raw_values(dataset, 300, "pH"), ph, atol=1e-5)
    assert list(np.flatnonzero(at(dataset, 300, "pH", "mask"))) == ph_hours


def test_unknown_itemid_map_is_rejected_with_the_known_names(built):
    root, _ = built
    with pytest.raises(ValueError, match="unknown itemid map 'mimic3'; expected one of corrected, benchmark"):
        build_ehr_tensor(root, stays_frame(), itemid_map="mimic3")


def static_chart_rows() -> list[dict]:
    """Height and weight charted before intime, in hour 0 and later (worked out in the test below)."""
    h = pd.Timedelta(hours=1)
    s1, s2, s3 = dict(subject=10, hadm=100, stay=300), dict(subject=20, hadm=200), dict(subject=30, hadm=300)
    return [
        chart(**s1, time=T1 - 3 * h, itemid=HEIGHT_CM, value="170", valuenum=170),
        chart(**s1, time=T1 - 1 * h, itemid=HEIGHT_IN, value="70", valuenum=70),       # last before intime: 177.8
        chart(**s1, time=T1 + 10.5 * h, itemid=HEIGHT_CM, value="180", valuenum=180),  # hour 10: its own value
        chart(**s1, time=T1 + 50 * h, itemid=HEIGHT_CM, value="190", valuenum=190),    # after the window
        chart(**s1, time=T1 - 2 * h, itemid=WEIGHT_LBS, value="200", valuenum=200),    # before intime, but ...
        chart(**s1, time=T1 + 0.5 * h, itemid=WEIGHT_KG, value="80", valuenum=80),     # ... hour 0 has its own
        chart(**s1, time=T1 - 0.5 * h, itemid=HR, value="60", valuenum=60),            # not static: outside
        chart(**s2, stay=None, time=T2 - 2 * h, itemid=HEIGHT_CM, value="160", valuenum=160),  # by admission
        chart(**s2, stay=200, time=T2 - 1 * h, itemid=WEIGHT_KG, value="70", valuenum=70),
        chart(**s3, stay=400, time=T3 - 5 * h, itemid=HEIGHT_CM, value="165", valuenum=165),
        chart(**s3, stay=400, time=T3 - 1 * h, itemid=HEIGHT_CM, value="400", valuenum=400),   # out of range
        chart(subject=30, hadm=None, stay=None, time=T3 - 0.5 * h, itemid=WEIGHT_KG, value="75",
              valuenum=75),                                                            # names no stay/admission
        chart(**s3, stay=555, time=T3 - 0.25 * h, itemid=WEIGHT_KG, value="76", valuenum=76),  # another stay
    ]


def test_static_variables_take_the_last_value_before_intime_at_hour_0(tmp_path):
    write_tables(tmp_path, static_chart_rows(), lab_rows()[:1])
    dataset = build_ehr_tensor(tmp_path, stays_frame(), block_size=300)
    expected = {  # stay, variable: raw values over the valid hours, observed hours
        (300, "Height"): ([177.8] * 10 + [180.0] * 38, [0, 10]),
        (300, "Weight"): ([80.0] * 48, [0]),
        (200, "Height"): ([160.0] * 11, [0]),
        (200, "Weight"): ([70.0] * 11, [0]),
        (400, "Height"): ([165.0] * 48, [0]),
        (400, "Weight"): ([81.0] * 48, []),       # normal value: no row names stay 400 or its admission
        (100, "Height"): ([170.0] * 48, []),
    }
    for (stay_id, variable), (values, hours) in expected.items():
        np.testing.assert_allclose(raw_values(dataset, stay_id, variable)[:len(values)], values, atol=1e-3,
                                   err_msg=f"{stay_id} {variable}")
        assert list(np.flatnonzero(at(dataset, stay_id, variable, "mask"))) == hours, (stay_id, variable)
    assert dataset.attrs["dropped_outside_window"] == 3   # HR before intime, height after 48 h, subject-only weight
    assert dataset.attrs["dropped_unassigned"] == 1       # weight of stay 555
    assert dataset.attrs["dropped_out_of_range"] == 1     # height 400 cm
