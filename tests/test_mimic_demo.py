"""The workflow's data stages on the real, open MIMIC-IV demo v2.2, through the snakemake CLI.

Every expected value is recomputed here from the raw csv.gz rows with plain pandas (no ehrcxr code), from the
rules in docs/ARCHITECTURE.md and the reference files in resources/. The workflow builds the tensors with the
default (corrected) itemid map; the benchmark-map tensor is built by the library directly. Also validates the
shipped MIMIC configs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "mimic-iv-demo"
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
RESULTS = "results/mimic_demo"
HOUR = pd.Timedelta(hours=1)

needs_demo = pytest.mark.skipif(not DEMO.exists(), reason=f"the MIMIC-IV demo v2.2 is not at {DEMO} "
                                "(download https://physionet.org/content/mimic-iv-demo/2.2/ there)")

HEART_RATE, TEMP_F, TEMP_C = 220045, 223761, 223762
GLUCOSE_CHART, GLUCOSE_LAB = (220621, 225664, 226537), (50809, 50931)   # blood
PH_CHART, PH_LAB = (220274, 223830), (50820,)                           # blood
NON_BLOOD_LAB = {51478: "Glucose", 51491: "pH", 51094: "pH", 50831: "pH"}  # urine, other body fluid
CM_PER_UNIT = {226730: 1.0, 226707: 2.54}                               # height: cm, inches
KG_PER_UNIT = {224639: 1.0, 226512: 1.0, 226531: 0.45359237}            # weight: kg, kg, lbs
CHART_VARIABLE = ({i: "Glucose" for i in GLUCOSE_CHART} | {i: "pH" for i in PH_CHART}
                  | {i: "Height" for i in CM_PER_UNIT} | {i: "Weight" for i in KG_PER_UNIT})
LAB_VARIABLE = {i: "Glucose" for i in GLUCOSE_LAB} | {i: "pH" for i in PH_LAB} | NON_BLOOD_LAB
# Measured on the demo's 112 cohort stays: stays whose observed glucose / pH bins change with the urine and
# other-fluid rows (11 stays in all); stays with a height (weight) in hour 0 itself, and stays whose hour 0 takes
# the last value before intime.
AFFECTED_STAYS = {"Glucose": 3, "pH": 8}
HEIGHT_AT_HOUR_0, WEIGHT_AT_HOUR_0 = (2, 60), (47, 65)
# Checked stays: 32155744 (ids inferred in the rebuilt chartevents, mortality task), 32145159 (original ids and
# text, 24.9 h long, phenotyping only), 33177122 (original ids, mortality task), 35436337 (original ids,
# mortality task, a blood glucose lab in hour 0 with no chart glucose). See the demo's README.md.
HEART_RATE_HOURS = [(32155744, 6), (32145159, 4), (33177122, 41)]  # several rows in the hour: the last wins
FAHRENHEIT_HOURS = [(32155744, 5), (32145159, 3)]                  # only °F temperature rows in the hour
LAB_GLUCOSE_HOUR = (35436337, 0)
CHECKED_STAYS = sorted({s for s, _ in HEART_RATE_HOURS + FAHRENHEIT_HOURS} | {LAB_GLUCOSE_HOUR[0]})


def demo_config() -> dict:
    """config/mimic_demo.yaml with the raw path made absolute (snakemake runs in a temporary directory)."""
    config = yaml.safe_load((REPO / "config" / "mimic_demo.yaml").read_text())
    config["raw"]["mimic_iv"] = str(DEMO)
    return config


def read_raw(table: str, dates: list[str], **options) -> pd.DataFrame:
    frame = pd.read_csv(DEMO / f"{table}.csv.gz", **options)
    for column in dates:
        frame[column] = pd.to_datetime(frame[column])
    return frame


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Run the cohort and both EHR tensors (no training) on the demo in a temporary directory."""
    if not DEMO.exists():
        pytest.skip(f"the MIMIC-IV demo v2.2 is not at {DEMO}")
    workdir = tmp_path_factory.mktemp("mimic_demo")
    (workdir / "config.yaml").write_text(yaml.safe_dump(demo_config()))
    targets = [f"{RESULTS}/cohort/stays.parquet", f"{RESULTS}/ehr/phenotyping.nc", f"{RESULTS}/ehr/mortality.nc"]
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2", *targets]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


@pytest.fixture(scope="module")
def stays(workdir) -> pd.DataFrame:
    return pd.read_parquet(workdir / RESULTS / "cohort" / "stays.parquet").set_index("stay_id")


@pytest.fixture(scope="module")
def tensors(workdir) -> dict[str, xr.Dataset]:
    """Both task tensors, indexed by stay_id."""
    return {task: xr.load_dataset(workdir / RESULTS / "ehr" / f"{task}.nc", engine="h5netcdf").swap_dims(stay="stay_id")
            for task in ("phenotyping", "mortality")}


@pytest.fixture(scope="module")
def expected() -> pd.DataFrame:
    """The cohort by the documented rules, from icustays ⨝ admissions ⨝ patients, indexed by stay_id."""
    icustays = read_raw("icu/icustays", ["intime", "outtime"])
    admissions = read_raw("hosp/admissions", ["admittime", "dischtime", "deathtime"])
    patients = read_raw("hosp/patients", ["dod"])
    frame = icustays.merge(admissions, on=["subject_id", "hadm_id"]).merge(patients, on="subject_id")
    frame = frame[frame["intime"] <= frame["outtime"]]
    frame = frame[frame["first_careunit"].fillna("") == frame["last_careunit"].fillna("")]
    frame = frame[frame.groupby("hadm_id")["stay_id"].transform("size") == 1]
    frame = frame[frame["anchor_age"] + frame["intime"].dt.year - frame["anchor_year"] >= 18].copy()
    frame["los_hours"] = (frame["outtime"] - frame["intime"]) / HOUR
    by_deathtime = frame["deathtime"].between(frame["admittime"], frame["dischtime"])
    by_dod = frame["dod"].between(frame["admittime"].dt.normalize(), frame["dischtime"].dt.normalize())
    frame["mortality"] = (by_deathtime | by_dod).astype(int)
    return frame.set_index("stay_id").sort_index()


@pytest.fixture(scope="module")
def events(expected) -> dict[str, pd.DataFrame]:
    """chartevents and labevents rows of the checked stays' subjects, with parsed charttime."""
    subjects = expected.loc[CHECKED_STAYS, "subject_id"].unique()
    frames = {}
    for table in ("icu/chartevents", "hosp/labevents"):
        frame = pd.read_csv(DEMO / f"{table}.csv.gz", dtype={"value": str}, low_memory=False)
        frame = frame[frame["subject_id"].isin(subjects)].copy()
        frame["charttime"] = pd.to_datetime(frame["charttime"])
        frames[table.split("/")[1]] = frame
    # every checked chart row carries its stay_id, so selecting chart rows by stay_id is exact
    assert frames["chartevents"]["stay_id"].notna().all()
    return frames


@pytest.fixture(scope="module")
def benchmark_phenotyping(stays) -> xr.Dataset:
    """The phenotyping tensor under the benchmark itemid map (the workflow builds the default, corrected one)."""
    from ehrcxr.data.ehr import build_ehr_tensor
    from ehrcxr.data.tasks import task_stays

    dataset = build_ehr_tensor(DEMO, task_stays(stays.reset_index(), "phenotyping"), itemid_map="benchmark")
    return dataset.swap_dims(stay="stay_id")


@pytest.fixture(scope="module")
def variable_events(expected) -> pd.DataFrame:
    """Glucose, pH, height and weight rows of every cohort stay: chart rows by stay_id, lab rows by hadm_id (by
    subject_id without one); ``code`` in the canonical unit and within the variable's valid range
    (resources/variable_ranges.csv); ``since`` from intime; sorted in the tie order (charttime, chartevents
    before labevents, file row), so the last row of a group is the value the tensor keeps."""
    stays = expected.reset_index()[["stay_id", "hadm_id", "subject_id", "intime", "outtime"]]
    chart = read_raw("icu/chartevents", ["charttime"], usecols=["stay_id", "charttime", "itemid", "valuenum"])
    chart = chart[chart["itemid"].isin(list(CHART_VARIABLE))].reset_index(names="row")
    assert chart["stay_id"].notna().all()  # every demo chart row names its stay
    chart = chart.merge(stays, on="stay_id").assign(table=0, variable=lambda rows: rows["itemid"].map(CHART_VARIABLE))
    lab = read_raw("hosp/labevents", ["charttime"], usecols=["subject_id", "hadm_id", "charttime", "itemid",
                                                            "value", "valuenum"], dtype={"value": str})
    lab = lab[lab["itemid"].isin(list(LAB_VARIABLE))].reset_index(names="row")
    lab["valuenum"] = lab["valuenum"].fillna(pd.to_numeric(lab["value"], errors="coerce"))
    lab = pd.concat([lab[lab["hadm_id"].notna()].drop(columns="subject_id").merge(stays, on="hadm_id"),
                     lab[lab["hadm_id"].isna()].drop(columns="hadm_id").merge(stays, on="subject_id")])
    lab = lab.assign(table=1, variable=lambda rows: rows["itemid"].map(LAB_VARIABLE))
    rows = pd.concat([chart, lab], ignore_index=True)
    factor = rows["itemid"].map(CM_PER_UNIT | KG_PER_UNIT).fillna(1.0)
    rows["code"] = rows["valuenum"] * factor
    ranges = pd.read_csv(REPO / "resources" / "variable_ranges.csv").set_index("variable")
    valid = rows["code"].between(rows["variable"].map(ranges["valid_low"]), rows["variable"].map(ranges["valid_high"]))
    rows = rows[valid].assign(since=lambda r: r["charttime"] - r["intime"])
    return rows.sort_values(["charttime", "table", "row"], kind="stable")


def last_per_hour(rows: pd.DataFrame, variable: str, itemids, length: pd.Series) -> pd.Series:
    """Last code per (stay_id, hour) of the variable's rows of ``itemids`` in the first 48 h (not after outtime,
    within the stay's valid hours)."""
    rows = rows[(rows["variable"] == variable) & rows["itemid"].isin(itemids)]
    window = (rows["since"] >= pd.Timedelta(0)) & (rows["since"] < 48 * HOUR) & (rows["charttime"] <= rows["outtime"])
    rows = rows[window].assign(hour=rows["since"] // HOUR)
    rows = rows[rows["hour"] < rows["stay_id"].map(length)]
    return rows.groupby(["stay_id", "hour"])["code"].last()


def length_of(dataset: xr.Dataset) -> pd.Series:
    """Valid hours per stay_id."""
    return dataset["length"].to_series()


def observed(dataset: xr.Dataset, variable: str) -> pd.Series:
    """The tensor's observed (masked) raw values of a continuous variable per (stay_id, hour)."""
    scale = json.loads(dataset.attrs["normaliser"])[variable]
    values = dataset["values"].sel(feature=variable).to_pandas().stack() * scale["std"] + scale["mean"]
    mask = dataset["mask"].sel(variable=variable).to_pandas().stack().astype(bool)
    return values[mask].rename_axis(["stay_id", "hour"])


def in_hour(rows: pd.DataFrame, stay: pd.Series, hour: int) -> pd.DataFrame:
    """Rows with intime + hour <= charttime < intime + hour + 1 h (and not after outtime), in charttime order;
    the stable sort keeps file order among equal times, so the last row is the value the tensor keeps."""
    start = stay["intime"] + hour * HOUR
    keep = (rows["charttime"] >= start) & (rows["charttime"] < start + HOUR) & (rows["charttime"] <= stay["outtime"])
    return rows[keep].sort_values("charttime", kind="stable")


def chart_rows(events, stay_id: int, itemids) -> pd.DataFrame:
    chart = events["chartevents"]
    return chart[(chart["stay_id"] == stay_id) & chart["itemid"].isin(itemids)]


def lab_rows(events, stay: pd.Series, itemids) -> pd.DataFrame:
    """Lab rows of the stay's admission, plus rows without hadm_id of its subject (assigned by time)."""
    lab = events["labevents"]
    mine = (lab["hadm_id"] == stay["hadm_id"]) | (lab["hadm_id"].isna() & (lab["subject_id"] == stay["subject_id"]))
    return lab[mine & lab["itemid"].isin(itemids)]


def zscored(dataset: xr.Dataset, variable: str, value: float) -> float:
    scale = json.loads(dataset.attrs["normaliser"])[variable]
    return (value - scale["mean"]) / scale["std"]


def tensors_of(stay_id: int, tensors: dict[str, xr.Dataset]) -> list[xr.Dataset]:
    """The task tensors that hold the stay (phenotyping always, mortality for stays >= 48 h)."""
    return [dataset for dataset in tensors.values() if stay_id in dataset["stay_id"].values]


@needs_demo
def test_cohort_follows_the_stay_rules(stays, expected):
    assert list(stays.index) == list(expected.index)
    assert (len(stays), stays["subject_id"].nunique()) == (len(expected), expected["subject_id"].nunique()) == (112, 91)
    assert (stays["hadm_id"] == expected["hadm_id"]).all()
    np.testing.assert_allclose(stays["los_hours"], expected["los_hours"])
    assert (stays["in_mortality_task"] == (expected["los_hours"] >= 48)).all()
    assert int(stays["in_mortality_task"].sum()) == 54


@needs_demo
def test_splits_are_by_subject_and_follow_the_seeded_rule(stays, expected):
    split_config = demo_config()["cohort"]["split"]
    subjects = np.random.default_rng(split_config["seed"]).permutation(np.sort(expected["subject_id"].unique()))
    n_train, n_train_val = np.round(np.cumsum([split_config["train"], split_config["val"]]) * len(subjects)).astype(int)
    split_of = dict.fromkeys(subjects[:n_train], "train") | dict.fromkeys(subjects[n_train:n_train_val], "val")
    split_of |= dict.fromkeys(subjects[n_train_val:], "test")
    assert (stays["split"] == expected["subject_id"].map(split_of)).all()
    assert stays.groupby("subject_id")["split"].nunique().max() == 1
    counts = stays["split"].value_counts()
    assert counts.sum() == len(stays) and set(counts.index) == {"train", "val", "test"}
    # both tasks keep stays and in-hospital deaths in every split (validation AUPRC needs a positive)
    mortality_task = stays[stays["in_mortality_task"]]
    assert (mortality_task.groupby("split")["mortality"].agg(["size", "sum"]) > 0).all().all()
    assert len(mortality_task.groupby("split")) == 3


@needs_demo
def test_mortality_is_death_within_the_admission(stays, expected):
    assert (stays["mortality"] == expected["mortality"]).all()
    assert int(stays["mortality"].sum()) == int(expected["mortality"].sum()) == 10


@needs_demo
def test_phenotypes_match_the_version_specific_icd_lists(stays, expected):
    diagnoses = pd.read_csv(DEMO / "hosp" / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    diagnoses = diagnoses[diagnoses["hadm_id"].isin(expected["hadm_id"])]
    code = diagnoses["icd_code"].str.strip()
    # resources/phenotypes.yaml lists full, dot-less codes per ICD version: exact match within the version
    groups = yaml.safe_load((REPO / "resources" / "phenotypes.yaml").read_text())["phenotypes"]
    positives = {}
    for group in groups:
        match = (((diagnoses["icd_version"] == 9) & code.isin(group["icd9"]))
                 | ((diagnoses["icd_version"] == 10) & code.isin(group["icd10"])))
        hadm_ids = set(diagnoses.loc[match, "hadm_id"])
        positives[group["label"]] = int(expected["hadm_id"].isin(hadm_ids).sum())
        assert (stays[group["label"]] == expected["hadm_id"].isin(hadm_ids).astype(int)).all(), group["label"]
    assert {label: positives[label] for label in ("ph_essential_hypertension", "ph_septicemia", "ph_shock")} == {
        "ph_essential_hypertension": 46, "ph_septicemia": 17, "ph_shock": 15}


@needs_demo
def test_tensors_hold_the_task_stays_in_stay_order(tensors, stays, expected):
    mortality_stays = expected.index[expected["los_hours"] >= 48]
    for task, stay_ids in (("phenotyping", expected.index), ("mortality", mortality_stays)):
        dataset = tensors[task]
        assert list(dataset["stay_id"].values) == list(stay_ids), task
        assert list(dataset["split"].values) == list(stays.loc[stay_ids, "split"]), task
        length = np.clip(np.ceil(expected.loc[stay_ids, "los_hours"]), 1, 48).astype(int)
        assert list(dataset["length"].values) == list(length), task


@needs_demo
@pytest.mark.parametrize("stay_id,hour", HEART_RATE_HOURS)
def test_heart_rate_is_the_last_row_of_its_hour_zscored(tensors, expected, events, stay_id, hour):
    rows = in_hour(chart_rows(events, stay_id, [HEART_RATE]), expected.loc[stay_id], hour)
    # the hour's last value differs from its earlier ones, so "last wins" is what is checked
    assert len(rows) > 1 and (rows["valuenum"].iloc[:-1] != rows["valuenum"].iloc[-1]).all()
    for dataset in tensors_of(stay_id, tensors):
        value = float(dataset["values"].sel(stay_id=stay_id, hour=hour, feature="Heart Rate"))
        assert value == pytest.approx(zscored(dataset, "Heart Rate", rows["valuenum"].iloc[-1]), abs=1e-5)
        assert int(dataset["mask"].sel(stay_id=stay_id, hour=hour, variable="Heart Rate")) == 1


@needs_demo
def test_hours_without_heart_rate_are_masked_and_imputed(tensors, expected, events):
    normal_rate = float(json.loads((REPO / "resources" / "channels.json").read_text())["normal_values"]["Heart Rate"])
    # 32155744: no heart rate before hour 5, so hour 0 holds the normal value
    first = chart_rows(events, 32155744, [HEART_RATE])
    first = first[first["charttime"] >= expected.loc[32155744, "intime"]].sort_values("charttime")
    assert first["charttime"].iloc[0] >= expected.loc[32155744, "intime"] + 5 * HOUR
    # 32145159 (25 valid hours): no row in hour 24, so it repeats the last rate before it
    stay = expected.loc[32145159]
    rows = chart_rows(events, 32145159, [HEART_RATE])
    assert in_hour(rows, stay, 24).empty
    before = rows[(rows["charttime"] >= stay["intime"]) & (rows["charttime"] < stay["intime"] + 24 * HOUR)]
    last_before = before.sort_values("charttime", kind="stable")["valuenum"].iloc[-1]
    for stay_id, hour, raw_value in ((32155744, 0, normal_rate), (32145159, 24, last_before)):
        for dataset in tensors_of(stay_id, tensors):
            assert int(dataset["mask"].sel(stay_id=stay_id, hour=hour, variable="Heart Rate")) == 0
            value = float(dataset["values"].sel(stay_id=stay_id, hour=hour, feature="Heart Rate"))
            assert value == pytest.approx(zscored(dataset, "Heart Rate", raw_value), abs=1e-5)
    # hours after the stay's 25 valid hours are zero and unmasked
    after = tensors["phenotyping"].sel(stay_id=32145159, hour=slice(25, None))
    assert float(abs(after["values"]).max()) == 0 and int(after["mask"].max()) == 0


@needs_demo
@pytest.mark.parametrize("stay_id,hour", FAHRENHEIT_HOURS)
def test_fahrenheit_temperature_is_converted_to_celsius(tensors, expected, events, stay_id, hour):
    rows = in_hour(chart_rows(events, stay_id, [TEMP_F, TEMP_C]), expected.loc[stay_id], hour)
    assert len(rows) > 0 and (rows["itemid"] == TEMP_F).all() and (rows["valueuom"] == "°F").all()
    celsius = (rows["valuenum"].iloc[-1] - 32) * 5 / 9
    for dataset in tensors_of(stay_id, tensors):
        value = float(dataset["values"].sel(stay_id=stay_id, hour=hour, feature="Temperature"))
        assert value == pytest.approx(zscored(dataset, "Temperature", celsius), abs=1e-5)
        assert int(dataset["mask"].sel(stay_id=stay_id, hour=hour, variable="Temperature")) == 1


@needs_demo
def test_lab_glucose_is_assigned_by_admission_and_time(tensors, expected, events):
    stay_id, hour = LAB_GLUCOSE_HOUR
    stay = expected.loc[stay_id]
    assert in_hour(chart_rows(events, stay_id, GLUCOSE_CHART), stay, hour).empty
    labs = in_hour(lab_rows(events, stay, GLUCOSE_LAB), stay, hour)
    assert len(labs) == 1 and labs["hadm_id"].iloc[0] == stay["hadm_id"]  # a lab row has no stay_id
    datasets = tensors_of(stay_id, tensors)
    assert len(datasets) == 2  # a mortality-task stay: checked in both tensors, each with its own normaliser
    for dataset in datasets:
        value = float(dataset["values"].sel(stay_id=stay_id, hour=hour, feature="Glucose"))
        assert value == pytest.approx(zscored(dataset, "Glucose", labs["valuenum"].iloc[0]), abs=1e-5)
        assert int(dataset["mask"].sel(stay_id=stay_id, hour=hour, variable="Glucose")) == 1


@needs_demo
def test_variables_without_a_mimic_iv_item_are_never_observed(tensors):
    mapped = set(pd.read_csv(REPO / "resources" / "itemids.csv")["variable"])
    unmapped = [v for v in json.loads((REPO / "resources" / "channels.json").read_text())["id_to_channel"]
                if v not in mapped]
    assert unmapped == ["Capillary refill rate", "Glascow coma scale total"]
    for dataset in tensors.values():
        assert int(dataset["mask"].sel(variable=unmapped).sum()) == 0
        assert int(dataset["mask"].sel(variable="Heart Rate").sum()) > 0


@pytest.mark.parametrize("name", ["config.yaml", "mimic_demo.yaml", "mimic.yaml"])
def test_shipped_configs_match_the_schema(name):
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load((REPO / "config" / name).read_text()))


@pytest.mark.parametrize("change,message", [
    (lambda c: c["missing"].append("miss1.5"), "'miss1.5' does not match"),
    (lambda c: c.pop("raw"), "'raw' is a required property"),
    (lambda c: c["cxr"].update(depth=101), "101 is not one of"),
    (lambda c: c["ehr"].update(itemid_map="mimic3"), "'mimic3' is not one of"),
])
def test_the_schema_rejects_a_broken_mimic_config(change, message):
    config = yaml.safe_load((REPO / "config" / "mimic.yaml").read_text())
    change(config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.Draft202012Validator(SCHEMA).validate(config)


def test_the_schema_rejects_synthetic_images_the_generator_cannot_draw():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["synthetic"]["image_size"] = 16
    with pytest.raises(jsonschema.ValidationError, match="16 is less than the minimum of 32"):
        jsonschema.Draft202012Validator(SCHEMA).validate(config)


@pytest.mark.parametrize("settings", ["harmonised", "published"])
def test_mimic_models_accept_their_params(settings):
    """Every model of config/mimic.yaml builds with its params, harmonised and published (a misspelt param fails
    here, not on the cluster)."""
    from ehrcxr.models.registry import create_model
    from ehrcxr.settings import model_settings

    config = {**yaml.safe_load((REPO / "config" / "mimic.yaml").read_text()), "settings": settings}
    cxr = {**config["cxr"], "weights": None}  # no ImageNet download in tests
    for name, entry in config["models"].items():
        params = model_settings(config, name)["params"]
        model = create_model(entry.get("architecture", name), n_labels=25, ehr_features=76,
                             cxr=cxr if "cxr" in entry["modalities"] else None, **params)
        assert sum(p.numel() for p in model.parameters()) > 0, name


@needs_demo
def test_whole_demo_grid_trains_ehr_only_models_without_image_stages(workdir):
    """The rest of the grid after the data stages: no image stage, EHR-only models, 'natural' only."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    dry = subprocess.run([*command, "--dry-run", "--quiet", "rules"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = {line.split()[0]: int(line.split()[1]) for line in dry.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    models, tasks = demo_config()["models"], demo_config()["tasks"]
    analyses = {"ranking": 1, "calibration": 1, "fairness": 1}  # those that need no X-ray
    assert jobs == {"train": len(tasks) * len(models), "aggregate": 1, "all": 1, **analyses,
                    "total": len(tasks) * len(models) + 2 + len(analyses)}, dry.stdout
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    table = pd.read_csv(workdir / RESULTS / "tables" / "main_results.csv")
    assert set(table["model"]) == set(models) and set(table["missing"]) == {"natural"}
    assert set(table["task"]) == {"phenotyping", "mortality", "length_of_stay"}
    assert {"accuracy", "macro_f1", "kappa_linear"} <= set(table.loc[table["task"] == "length_of_stay", "metric"])
    assert not (workdir / RESULTS / "cxr").exists() and not (workdir / RESULTS / "pretrain").exists()
    for name in ("ranking", "calibration", "fairness_groups", "fairness_gaps"):
        assert (workdir / RESULTS / "tables" / f"{name}.md").is_file(), name
    assert not (workdir / RESULTS / "tables" / "fusion_gain.csv").exists()  # needs X-rays: skipped
    report = subprocess.run([*command, "--report", "report.html"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "skipped without X-ray data: fusion_gain, modality_imbalance, robustness, xray_age" in (
        workdir / "report.html").read_text()


@needs_demo
@pytest.mark.parametrize("variable", ["Glucose", "pH"])
def test_glucose_and_ph_match_a_recomputation_under_each_itemid_map(tensors, benchmark_phenotyping, variable_events,
                                                                    variable):
    blood = [i for i, v in (CHART_VARIABLE | LAB_VARIABLE).items() if v == variable and i not in NON_BLOOD_LAB]
    for dataset, itemids in ((tensors["phenotyping"], blood), (benchmark_phenotyping, blood + list(NON_BLOOD_LAB))):
        expected_values = last_per_hour(variable_events, variable, itemids, length_of(dataset))
        values = observed(dataset, variable)
        assert list(values.index) == list(expected_values.index), dataset.attrs["itemid_map"]
        np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-4)
    assert tensors["phenotyping"].attrs["itemid_map"] == "corrected"
    assert benchmark_phenotyping.attrs["itemid_map"] == "benchmark"


@needs_demo
@pytest.mark.parametrize("variable", ["Glucose", "pH"])
def test_urine_and_other_fluid_rows_reach_only_the_benchmark_tensor(tensors, benchmark_phenotyping, variable_events,
                                                                   variable):
    length = length_of(benchmark_phenotyping)
    items = [i for i, v in (CHART_VARIABLE | LAB_VARIABLE).items() if v == variable]
    every = last_per_hour(variable_events, variable, items, length)
    blood = last_per_hour(variable_events, variable, [i for i in items if i not in NON_BLOOD_LAB], length)
    both = pd.concat([every.rename("every"), blood.rename("blood")], axis=1)
    affected = set(both.index[~np.isclose(both["every"], both["blood"])].get_level_values("stay_id"))
    assert len(affected) == AFFECTED_STAYS[variable] and len(length) == 112
    corrected, benchmark = (observed(d, variable) for d in (tensors["phenotyping"], benchmark_phenotyping))
    both = pd.concat([corrected.rename("corrected"), benchmark.rename("benchmark")], axis=1)
    differs = set(both.index[~np.isclose(both["corrected"], both["benchmark"], atol=1e-4)].get_level_values(0))
    assert differs == affected
    if variable == "pH":  # blood pH never falls below 6.8 here; urine pH 6.5 reaches the benchmark tensor
        assert corrected.min() >= 6.8 > benchmark.min()


@needs_demo
@pytest.mark.parametrize("variable,from_hour_0,from_before_intime", [("Height", *HEIGHT_AT_HOUR_0),
                                                                     ("Weight", *WEIGHT_AT_HOUR_0)])
def test_static_variables_hold_the_last_value_before_intime_at_hour_0(tensors, variable_events, variable,
                                                                      from_hour_0, from_before_intime):
    rows = variable_events[variable_events["variable"] == variable]
    own = rows[(rows["since"] >= pd.Timedelta(0)) & (rows["since"] < HOUR) & (rows["charttime"] <= rows["outtime"])]
    before = rows[rows["since"] < pd.Timedelta(0)]
    hour_0 = own.groupby("stay_id")["code"].last()
    carried = before.groupby("stay_id")["code"].last().drop(hour_0.index, errors="ignore")
    assert (len(hour_0), len(carried)) == (from_hour_0, from_before_intime)
    expected_values = pd.concat([hour_0, carried]).sort_index()
    for dataset in tensors.values():
        values = observed(dataset, variable).xs(0, level="hour")
        task_stays = expected_values[expected_values.index.isin(dataset["stay_id"].values)]
        assert list(values.index) == list(task_stays.index)
        np.testing.assert_allclose(values, task_stays, rtol=1e-5)
