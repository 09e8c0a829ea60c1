"""Hourly EHR tensor of the 17 mimic3-benchmarks / MedFuse variables (59 features + 17 masks).

MIMIC-IV ``icu/chartevents`` and ``hosp/labevents`` are streamed in chunks; each chunk is cut down to
the mapped itemids of cohort subjects before anything else, so memory grows with the kept events only.
Events are assigned to cohort stays (chart: by ``stay_id``; labs and chart rows without one: by
``hadm_id`` and time, else by ``subject_id`` and time), cleaned by itemid, binned into hours since
intime (last value wins), forward-filled, one-hot encoded and z-scored with train-split statistics.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ehrcxr.data import raw
from ehrcxr.data.tasks import task_stays
from ehrcxr.resources import channels, itemids, variable_ranges

log = logging.getLogger("ehrcxr.ehr")

EVENT_COLUMNS = {
    "chartevents": ["subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value", "valuenum", "valueuom"],
    "labevents": ["subject_id", "hadm_id", "charttime", "itemid", "value", "valuenum", "valueuom"],
}
STAY_COLUMNS = ["stay_id", "subject_id", "hadm_id", "intime", "outtime", "los_hours", "split"]
SPLITS = ("train", "val", "test")
DROP_REASONS = ("unassigned", "outside_window", "non_numeric", "out_of_range", "unknown_gcs")

# Unit conversions by itemid (MIMIC-IV MetaVision items).
FAHRENHEIT_ITEMS = (223761,)       # Temperature Fahrenheit
POUND_ITEMS = (226531,)            # Admission Weight (lbs.)
INCH_ITEMS = (226707,)             # Height (inches)
KG_PER_POUND = 0.45359237
CM_PER_INCH = 2.54

SYSTOLIC = "Systolic blood pressure"
DIASTOLIC = "Diastolic blood pressure"
FIO2 = "Fraction inspired oxygen"
SPO2 = "Oxygen saturation"
GCS_EYE = "Glascow coma scale eye opening"
GCS_MOTOR = "Glascow coma scale motor response"
GCS_VERBAL = "Glascow coma scale verbal response"

# GCS component: score -> canonical vocabulary string; text (lower case) -> score or own category.
# Scores follow mimic3-benchmarks' channel_info.json, except eye 'None', which MIMIC-IV scores 1
# (valuenum 1 in the real data) and is therefore mapped to '1 No Response'.
GCS_CANONICAL = {
    GCS_EYE: {1: "1 No Response", 2: "2 To pain", 3: "3 To speech", 4: "4 Spontaneously"},
    GCS_MOTOR: {1: "1 No Response", 2: "2 Abnorm extensn", 3: "3 Abnorm flexion", 4: "4 Flex-withdraws",
                5: "5 Localizes Pain", 6: "6 Obeys Commands"},
    GCS_VERBAL: {1: "1 No Response", 2: "2 Incomp sounds", 3: "3 Inapprop words", 4: "4 Confused",
                 5: "5 Oriented"},
}
GCS_TEXT_SCORE = {
    GCS_EYE: {"none": 1, "no response": 1, "to pain": 2, "to speech": 3, "spontaneously": 4},
    GCS_MOTOR: {"no response": 1, "abnormal extension": 2, "abnorm extensn": 2, "abnormal flexion": 3,
                "abnorm flexion": 3, "flex-withdraws": 4, "localizes pain": 5, "obeys commands": 6},
    GCS_VERBAL: {"no response": 1, "incomprehensible sounds": 2, "incomp sounds": 2, "inappropriate words": 3,
                 "inapprop words": 3, "confused": 4, "oriented": 5},
}
# Intubated patients cannot be scored: these keep their own vocabulary category.
GCS_OWN_CATEGORY = {GCS_VERBAL: {"no response-ett": "No Response-ETT", "1.0 et/trach": "1.0 ET/Trach"}}

BP_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$"


@dataclasses.dataclass(frozen=True)
class Channels:
    """The 17 variables in discretizer order with their vocabularies, normal codes and feature layout."""

    variables: list[str]
    categorical: list[bool]
    vocab: list[list[str]]
    normal_code: np.ndarray      # (V,) normal value (continuous) or its vocabulary index (categorical)
    feature_names: list[str]
    feature_variable: np.ndarray  # (F,) variable index of each feature
    feature_category: np.ndarray  # (F,) one-hot category index, -1 for continuous features

    @property
    def continuous_variables(self) -> np.ndarray:
        """Variable positions of the 12 continuous variables."""
        return np.flatnonzero(~np.asarray(self.categorical))


def channel_layout() -> Channels:
    """Variables, vocabularies and the 59-feature layout from ``resources/channels.json``."""
    config = channels()
    variables = list(config["id_to_channel"])
    categorical = [bool(config["is_categorical_channel"][v]) for v in variables]
    vocab = [list(config["possible_values"][v]) for v in variables]
    normal, names, feat_var, feat_cat = [], [], [], []
    for index, (variable, is_cat, values) in enumerate(zip(variables, categorical, vocab)):
        normal_value = config["normal_values"][variable]
        if is_cat:
            normal.append(values.index(normal_value))
            names += [f"{variable}->{value}" for value in values]
            feat_var += [index] * len(values)
            feat_cat += list(range(len(values)))
        else:
            normal.append(float(normal_value))
            names.append(variable)
            feat_var.append(index)
            feat_cat.append(-1)
    return Channels(variables, categorical, vocab, np.asarray(normal, dtype=np.float64), names,
                    np.asarray(feat_var), np.asarray(feat_cat))


def _check_stays(stays: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in STAY_COLUMNS if c not in stays.columns]
    if missing:
        raise ValueError(f"stays table lacks column(s) {', '.join(missing)}")
    frame = stays[STAY_COLUMNS].copy()
    for column in ("stay_id", "subject_id", "hadm_id", "intime", "outtime", "los_hours", "split"):
        if frame[column].isna().any():
            row = int(frame[column].isna().to_numpy().argmax())
            raise ValueError(f"stays table: column {column!r} is empty in row {row}")
    if frame["stay_id"].duplicated().any():
        raise ValueError(f"stays table: duplicated stay_id {frame['stay_id'][frame['stay_id'].duplicated()].iloc[0]}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        raise ValueError(f"stays table: column 'split' holds {frame['split'][bad_split].iloc[0]!r}; "
                         f"expected one of {', '.join(SPLITS)}")
    for column in ("stay_id", "subject_id", "hadm_id"):
        frame[column] = frame[column].astype("int64")
    for column in ("intime", "outtime"):
        frame[column] = pd.to_datetime(frame[column])
    frame = frame.sort_values("stay_id").reset_index(drop=True)
    frame["stay_pos"] = np.arange(len(frame))
    return frame


def _parse_charttime(values: pd.Series, path: Path) -> pd.Series:
    """Parse the charttime of kept rows; the error names the file's data row (chunk indexes are global)."""
    parsed = pd.to_datetime(values, format="mixed", errors="coerce")
    bad = parsed.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if bad.any():
        row = int(values.index[bad.to_numpy().argmax()])
        raise raw.RawDataError(f"{path}: column 'charttime', data row {row + 1}: "
                               f"cannot parse timestamp {values.loc[row]!r}")
    return parsed


def _assign(chunk: pd.DataFrame, cohort: pd.DataFrame, hours: int) -> tuple[pd.DataFrame, int, int]:
    """Pair each event with cohort stays and keep those with intime <= charttime <= outtime, t < hours.

    Returns the kept (event, stay) pairs plus the counts of rows without any candidate stay and rows whose
    candidates all fall outside the window."""
    stay_ids = chunk["stay_id"] if "stay_id" in chunk else pd.Series(pd.NA, index=chunk.index, dtype="Int64")
    by_stay = stay_ids.notna()
    by_hadm = ~by_stay & chunk["hadm_id"].notna()
    by_subject = ~by_stay & ~by_hadm
    stay_cols = ["stay_pos", "intime", "outtime"]
    events = chunk.drop(columns=[c for c in ("stay_id",) if c in chunk])
    candidates = [
        events[by_stay].assign(stay_id=stay_ids[by_stay].astype("int64")).merge(
            cohort[["stay_id"] + stay_cols], on="stay_id", how="inner"),
        events[by_hadm].assign(hadm_id=events["hadm_id"][by_hadm].astype("int64")).merge(
            cohort[["hadm_id"] + stay_cols], on="hadm_id", how="inner"),
        events[by_subject].merge(cohort[["subject_id"] + stay_cols], on="subject_id", how="inner"),
    ]
    pairs = pd.concat(candidates, ignore_index=True)
    hours_since = (pairs["charttime"] - pairs["intime"]) / pd.Timedelta(hours=1)
    keep = (hours_since >= 0) & (hours_since < hours) & (pairs["charttime"] <= pairs["outtime"])
    kept = pairs[keep.to_numpy()].assign(hour=np.floor(hours_since[keep]).astype("int64").to_numpy())
    n_candidates = pairs["row"].nunique()
    return kept, len(chunk) - n_candidates, n_candidates - kept["row"].nunique()


def _collect_events(root: Path, cohort: pd.DataFrame, hours: int, chunksize: int,
                    counts: dict[str, int]) -> pd.DataFrame:
    """Stream chartevents then labevents and return the kept (event, stay) pairs of mapped itemids."""
    item_map = itemids()
    subjects = pd.Index(cohort["subject_id"].unique())
    kept_parts, row_offset = [], 0
    for table, columns in EVENT_COLUMNS.items():
        spec = raw.MIMIC_IV_TABLES[table]
        path = raw.table_path(root, spec)
        lazy_time_spec = {table: dataclasses.replace(spec, timestamps=())}  # parse charttime after filtering
        wanted_items = item_map.loc[item_map["table"] == table, "itemid"].to_numpy()
        gcs_items = item_map.loc[item_map["variable"].isin(list(GCS_CANONICAL)), "itemid"].to_numpy()
        n_rows = n_kept = 0
        for chunk in raw.iter_table(root, table, columns, chunksize=chunksize, specs=lazy_time_spec):
            n_rows += len(chunk)
            chunk = chunk[chunk["itemid"].isin(wanted_items).to_numpy() & chunk["subject_id"].isin(subjects).to_numpy()]
            if chunk.empty:
                continue
            chunk = chunk.assign(charttime=_parse_charttime(chunk["charttime"], path),
                                 row=chunk.index.to_numpy() + row_offset)
            kept, unassigned, outside = _assign(chunk, cohort, hours)
            counts["unassigned"] += unassigned
            counts["outside_window"] += outside
            n_kept += len(kept)
            text_needed = kept["valuenum"].isna() | kept["itemid"].isin(gcs_items)  # keep memory to the numbers
            kept = kept.assign(value=kept["value"].where(text_needed))
            kept_parts.append(kept[["stay_pos", "hour", "charttime", "row", "itemid", "value", "valuenum"]])
        log.info("%s: %d rows read, %d events of mapped items kept in the first %d h of cohort stays",
                 path, n_rows, n_kept, hours)
        row_offset += n_rows
    if not kept_parts:
        return pd.DataFrame({"stay_pos": pd.Series(dtype="int64"), "hour": pd.Series(dtype="int64"),
                             "charttime": pd.Series(dtype="datetime64[ns]"), "row": pd.Series(dtype="int64"),
                             "itemid": pd.Series(dtype="int64"), "value": pd.Series(dtype="string"),
                             "valuenum": pd.Series(dtype="float64")})
    return pd.concat(kept_parts, ignore_index=True)


def _gcs_codes(events: pd.DataFrame, variable: str, vocab: list[str], numbers: pd.Series) -> pd.Series:
    """Vocabulary index of GCS rows: known text first (own category or via its score), then the score."""
    text = events["value"].astype("string").str.strip().str.lower()
    canonical = GCS_CANONICAL[variable]
    by_text = text.map({t: canonical[s] for t, s in GCS_TEXT_SCORE[variable].items()}
                       | {v.lower(): v for v in canonical.values()}
                       | GCS_OWN_CATEGORY.get(variable, {}))
    whole = numbers.where(numbers == np.round(numbers))
    by_score = whole.map(canonical)
    category = by_text.astype("object").where(by_text.notna(), by_score)
    return category.map({value: index for index, value in enumerate(vocab)}).astype("float64")


def _clean(events: pd.DataFrame, layout: Channels, counts: dict[str, int]) -> pd.DataFrame:
    """Map itemids to variables and turn every event into a code (value, or vocabulary index); drop bad rows."""
    item_map = itemids().drop_duplicates("itemid").set_index("itemid")["variable"]
    var_index = {v: i for i, v in enumerate(layout.variables)}
    variable = events["itemid"].map(item_map)
    events = events.assign(variable=variable.map(var_index).astype("int64"))
    value_text = events["value"].astype("string").str.strip()
    numbers = events["valuenum"].astype("float64")
    numbers = numbers.where(numbers.notna(), pd.to_numeric(value_text, errors="coerce").astype("float64"))
    code = pd.Series(np.nan, index=events.index)
    gcs = pd.Series(False, index=events.index)
    for name in GCS_CANONICAL:
        rows = (variable == name).to_numpy()
        gcs |= rows
        code[rows] = _gcs_codes(events[rows], name, layout.vocab[var_index[name]], numbers[rows]).to_numpy()
    unknown_gcs = gcs & code.isna()
    if unknown_gcs.any():
        examples = value_text[unknown_gcs].fillna("<empty>").value_counts().head(10).to_dict()
        log.warning("%d GCS events with an unknown value dropped (value: count) %s", int(unknown_gcs.sum()), examples)
    counts["unknown_gcs"] += int(unknown_gcs.sum())

    continuous = ~gcs
    blood_pressure = value_text.str.extract(BP_PATTERN).astype("float64")
    split_bp = numbers.isna() & blood_pressure[0].notna()
    numbers = numbers.where(~(split_bp & (variable == SYSTOLIC)), blood_pressure[0])
    numbers = numbers.where(~(split_bp & (variable == DIASTOLIC)), blood_pressure[1])
    non_numeric = continuous & numbers.isna()
    counts["non_numeric"] += int(non_numeric.sum())

    itemid = events["itemid"]
    numbers = numbers.where(~itemid.isin(FAHRENHEIT_ITEMS), (numbers - 32.0) * 5.0 / 9.0)
    numbers = numbers.where(~itemid.isin(POUND_ITEMS), numbers * KG_PER_POUND)
    numbers = numbers.where(~itemid.isin(INCH_ITEMS), numbers * CM_PER_INCH)
    numbers = numbers.where(~((variable == FIO2) & (numbers > 1)), numbers / 100.0)
    numbers = numbers.where(~((variable == SPO2) & (numbers <= 1)), numbers * 100.0)
    ranges = variable_ranges()
    low, high = variable.map(ranges["valid_low"]), variable.map(ranges["valid_high"])
    out_of_range = continuous & numbers.notna() & ((numbers < low) | (numbers > high))
    counts["out_of_range"] += int(out_of_range.sum())
    code[continuous.to_numpy()] = numbers[continuous]
    return events.assign(code=code)[code.notna().to_numpy() & ~out_of_range.to_numpy()]


def _grid(events: pd.DataFrame, n_stays: int, hours: int, n_variables: int) -> np.ndarray:
    """(stay, hour, variable) array of the last code per bin by charttime (later row wins ties); NaN = empty."""
    last = (events.sort_values(["stay_pos", "variable", "hour", "charttime", "row"], kind="stable")
            .drop_duplicates(["stay_pos", "hour", "variable"], keep="last"))
    grid = np.full((n_stays, hours, n_variables), np.nan)
    grid[last["stay_pos"].to_numpy(), last["hour"].to_numpy(), last["variable"].to_numpy()] = last["code"].to_numpy()
    return grid


def _forward_fill(grid: np.ndarray, normal_code: np.ndarray) -> np.ndarray:
    """Carry the last observation forward over hours; the normal code before the first observation."""
    observed = ~np.isnan(grid)
    last_seen = np.where(observed, np.arange(grid.shape[1])[None, :, None], -1)
    last_seen = np.maximum.accumulate(last_seen, axis=1)
    filled = np.take_along_axis(grid, np.clip(last_seen, 0, None), axis=1)
    return np.where(last_seen >= 0, filled, normal_code[None, None, :])


def _encode(filled: np.ndarray, layout: Channels, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(stay, hour, 59) float32 features: z-scored continuous values (mean/std per continuous variable, in
    :attr:`Channels.continuous_variables` order) and one-hot categorical codes."""
    features = np.zeros(filled.shape[:2] + (len(layout.feature_names),), dtype=np.float32)
    scale = dict(zip(layout.continuous_variables, zip(mean, std)))
    for variable in range(len(layout.variables)):
        columns = np.flatnonzero(layout.feature_variable == variable)
        if variable in scale:
            variable_mean, variable_std = scale[variable]
            features[:, :, columns[0]] = (filled[:, :, variable] - variable_mean) / variable_std
        else:
            features[:, :, columns] = filled[:, :, variable, None] == layout.feature_category[columns]
    return features


def fit_normaliser(values: np.ndarray, valid: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=1, clipped below at 1e-7) of ``values[..., columns]`` over the ``valid`` hours."""
    sample = values[valid][:, columns]
    if sample.shape[0] < 2:
        raise ValueError(f"cannot fit the EHR normaliser: {sample.shape[0]} valid train-split hour(s); need >= 2")
    return sample.mean(axis=0), np.clip(sample.std(axis=0, ddof=1), 1e-7, None)


def build_ehr_tensor(mimic_iv_root: str | Path, stays: pd.DataFrame, *, hours: int = 48,
                     chunksize: int = 1_000_000) -> xr.Dataset:
    """Hourly tensor of the first ``hours`` hours of each stay: values (stay, hour, 59 features, z-scored
    with train-split statistics), mask (stay, hour, 17 variables), length (valid hours)."""
    if hours < 1:
        raise ValueError(f"hours must be >= 1, got {hours}")
    root = Path(mimic_iv_root)
    raw.check_mimic_iv(root, tables=list(EVENT_COLUMNS))
    cohort = _check_stays(stays)
    layout = channel_layout()
    counts = dict.fromkeys(DROP_REASONS, 0)
    events = _clean(_collect_events(root, cohort, hours, chunksize, counts), layout, counts)

    grid = _grid(events, len(cohort), hours, len(layout.variables))
    length = np.clip(np.ceil(cohort["los_hours"].to_numpy(dtype=np.float64)), 1, hours).astype(np.int32)
    valid = np.arange(hours)[None, :] < length[:, None]
    mask = (~np.isnan(grid) & valid[:, :, None]).astype(np.uint8)
    filled = _forward_fill(grid, layout.normal_code)
    del grid

    continuous = layout.continuous_variables
    train = (cohort["split"] == "train").to_numpy()
    mean, std = fit_normaliser(filled[train], valid[train], continuous)
    values = _encode(filled, layout, mean, std)
    values[~valid] = 0.0

    normaliser = {layout.variables[v]: {"mean": float(m), "std": float(s)} for v, m, s in zip(continuous, mean, std)}
    attrs = {"normaliser": json.dumps(normaliser), "hours": int(hours)}
    attrs |= {f"dropped_{reason}": int(n) for reason, n in counts.items()}
    return xr.Dataset(
        {"values": (("stay", "hour", "feature"), values),
         "mask": (("stay", "hour", "variable"), mask),
         "length": (("stay",), length)},
        coords={"stay_id": ("stay", cohort["stay_id"].to_numpy()),
                "split": ("stay", cohort["split"].astype(str).to_numpy()),
                "hour": ("hour", np.arange(hours)),
                "feature": ("feature", layout.feature_names),
                "variable": ("variable", layout.variables)},
        attrs=attrs)


def observed_rates(dataset: xr.Dataset) -> pd.Series:
    """Share of valid (stay, hour) bins with a real observation, per variable."""
    valid = dataset["hour"] < dataset["length"]
    observed = dataset["mask"].where(valid).sum(("stay", "hour"))
    return (observed / valid.sum()).to_series()


def run_ehr_tensor(mimic_iv_root: str | Path, stays_path: str | Path, task: str, out_path: str | Path,
                   hours: int = 48, chunksize: int = 1_000_000) -> xr.Dataset:
    """Build the EHR tensor of ``task``'s cohort stays and write it as compressed NetCDF (h5netcdf)."""
    stays = task_stays(pd.read_parquet(stays_path), task)
    log.info("%s: %d stays (%s)", task, len(stays), stays["split"].value_counts().to_dict())
    dataset = build_ehr_tensor(mimic_iv_root, stays, hours=hours, chunksize=chunksize)
    for key in sorted(k for k in dataset.attrs if k.startswith("dropped_")):
        log.info("%s: %d", key, dataset.attrs[key])
    for variable, rate in observed_rates(dataset).items():
        log.info("observed share of valid hours: %-36s %.4f", variable, rate)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compressed = {"compression": "gzip", "compression_opts": 4}
    dataset.to_netcdf(out_path, engine="h5netcdf",
                      encoding={name: dict(compressed) for name in ("values", "mask", "length")})
    log.info("wrote %s", out_path)
    return dataset


def load_ehr_tensor(path: str | Path) -> xr.Dataset:
    """Load an EHR tensor written by :func:`run_ehr_tensor` fully into memory."""
    return xr.load_dataset(path, engine="h5netcdf")
