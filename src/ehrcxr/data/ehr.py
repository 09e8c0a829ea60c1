"""Hourly EHR tensor of the 17 mimic3-benchmarks / MedFuse variables (59 features + 17 masks).

MIMIC-IV ``icu/chartevents`` and ``hosp/labevents`` are streamed block by block (:mod:`ehrcxr.data.events`),
so memory grows with the cohort, never with the files. Events are assigned to cohort stays (chart: by
``stay_id``; labs and chart rows without one: by ``hadm_id`` and time, else by ``subject_id`` and time),
mapped to variables by the named itemid map (``corrected`` by default, or mimic3-benchmarks' ``benchmark``
map), cleaned by itemid, binned into hours since intime (last value wins), forward-filled, one-hot encoded and
z-scored with train-split statistics. A static variable (height, weight) without a value of its own in hour 0
takes there the last value charted before intime for the stay or its admission, observed in the mask.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

import pyarrow as pa

from ehrcxr.data import events as event_stream
from ehrcxr.data import raw
from ehrcxr.data.tasks import task_stays
from ehrcxr.resources import DEFAULT_ITEMID_MAP, channels, itemids, mapped_itemids, variable_ranges

log = logging.getLogger("ehrcxr.ehr")

STAY_COLUMNS = ["stay_id", "subject_id", "hadm_id", "intime", "outtime", "los_hours", "split"]
SPLITS = ("train", "val", "test")
CONCURRENT_TABLES_MIN_THREADS = 4  # measured: on 2 cores streaming the tables one after the other is faster
DROP_REASONS = ("unassigned", "outside_window", "non_numeric", "out_of_range", "unknown_gcs")
# Charted once and valid all stay: hour 0 falls back to the last value before intime (the value at admission).
STATIC_VARIABLES = ("Height", "Weight")

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


def prepare_stays(stays: pd.DataFrame) -> pd.DataFrame:
    """Validate a stays table and sort it by stay_id with its tensor position ``stay_pos``."""
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


def _gcs_lookup(variable: str, vocab: tuple[str, ...]) -> tuple[dict[str, int], np.ndarray]:
    """(lower-case text -> vocabulary index, score -> vocabulary index with -1 for no score) of a GCS component."""
    canonical = GCS_CANONICAL[variable]
    index = {value: position for position, value in enumerate(vocab)}
    by_text = ({t: canonical[score] for t, score in GCS_TEXT_SCORE[variable].items()}
               | {v.lower(): v for v in canonical.values()} | GCS_OWN_CATEGORY.get(variable, {}))
    by_score = np.full(max(canonical) + 1, -1)
    by_score[list(canonical)] = [index[value] for value in canonical.values()]
    return {text: index[value] for text, value in by_text.items()}, by_score


def _gcs_codes(text: pd.Series, lookup: tuple[dict[str, int], np.ndarray], numbers: np.ndarray) -> np.ndarray:
    """Vocabulary index of GCS rows: known text first (own category or via its score), then the score."""
    by_text, by_score = lookup
    from_text = text.str.lower().map(by_text).to_numpy(dtype=np.float64, na_value=np.nan)
    score = np.where((numbers == np.round(numbers)) & (numbers >= 0) & (numbers < len(by_score)), numbers, 0)
    from_score = np.where(np.isnan(numbers), -1, by_score[score.astype(np.int64)]).astype(np.float64)
    from_score[from_score < 0] = np.nan
    return np.where(np.isnan(from_text), from_score, from_text)


@functools.lru_cache
def _cleaning_tables(variables: tuple[str, ...], vocab: tuple[tuple[str, ...], ...]) -> tuple:
    """Lookups for :func:`clean_events`: sorted itemids with their variable index, valid ranges per variable,
    the GCS lookups per GCS variable index, and the variable index of each name."""
    var_index = {v: i for i, v in enumerate(variables)}
    item_map = itemids().drop_duplicates("itemid").sort_values("itemid")
    ranges = variable_ranges().reindex(list(variables))
    gcs = {var_index[name]: _gcs_lookup(name, vocab[var_index[name]]) for name in GCS_CANONICAL}
    return (item_map["itemid"].to_numpy(), item_map["variable"].map(var_index).to_numpy(np.int64),
            ranges["valid_low"].to_numpy(), ranges["valid_high"].to_numpy(), gcs, var_index)


def clean_events(events: pd.DataFrame, layout: Channels, counts: dict[str, int],
                 unknown_gcs: Counter | None = None) -> pd.DataFrame:
    """Map itemids to variables and turn every event into a ``code`` (value, or vocabulary index); bad rows are
    dropped and counted in ``counts`` (unknown GCS strings also in ``unknown_gcs``). Needs ``itemid``,
    ``value`` (text, read only where ``valuenum`` is empty or for GCS items) and ``valuenum``; keeps the index."""
    sorted_items, item_variable, valid_low, valid_high, gcs_lookups, var_index = _cleaning_tables(
        tuple(layout.variables), tuple(tuple(values) for values in layout.vocab))
    itemid = events["itemid"].to_numpy()
    position = np.clip(np.searchsorted(sorted_items, itemid), 0, len(sorted_items) - 1)
    if len(itemid) and (sorted_items[position] != itemid).any():
        raise ValueError(f"unmapped itemid {itemid[sorted_items[position] != itemid][0]} reached cleaning")
    variable = item_variable[position]
    numbers = events["valuenum"].to_numpy(dtype=np.float64, copy=True)
    text_rows = np.flatnonzero(events["value"].notna().to_numpy())
    text = events["value"].iloc[text_rows].astype(str).str.strip()
    parse = np.isnan(numbers[text_rows])
    numbers[text_rows[parse]] = pd.to_numeric(text[parse], errors="coerce").to_numpy(dtype=np.float64)

    code = np.full(len(events), np.nan)
    gcs = np.zeros(len(events), dtype=bool)
    full_text = np.full(len(events), None, dtype=object)
    full_text[text_rows] = text.to_numpy(dtype=object)
    for variable_index, lookup in gcs_lookups.items():
        rows = np.flatnonzero(variable == variable_index)
        gcs[rows] = True
        code[rows] = _gcs_codes(pd.Series(full_text[rows], dtype=object), lookup, numbers[rows])
    unknown = gcs & np.isnan(code)
    counts["unknown_gcs"] += int(unknown.sum())
    if unknown_gcs is not None and unknown.any():
        unknown_gcs.update("<empty>" if text is None else text for text in full_text[unknown])

    continuous = ~gcs
    bp_rows = np.flatnonzero(np.isin(variable, [var_index[SYSTOLIC], var_index[DIASTOLIC]]) & np.isnan(numbers)
                             & (full_text != None))  # noqa: E711 (elementwise)
    if len(bp_rows):
        pressure = pd.Series(full_text[bp_rows], dtype=object).str.extract(BP_PATTERN).astype("float64").to_numpy()
        numbers[bp_rows] = np.where(variable[bp_rows] == var_index[SYSTOLIC], pressure[:, 0], pressure[:, 1])
    counts["non_numeric"] += int((continuous & np.isnan(numbers)).sum())

    numbers = np.where(np.isin(itemid, FAHRENHEIT_ITEMS), (numbers - 32.0) * 5.0 / 9.0, numbers)
    numbers = np.where(np.isin(itemid, POUND_ITEMS), numbers * KG_PER_POUND, numbers)
    numbers = np.where(np.isin(itemid, INCH_ITEMS), numbers * CM_PER_INCH, numbers)
    numbers = np.where((variable == var_index[FIO2]) & (numbers > 1), numbers / 100.0, numbers)
    numbers = np.where((variable == var_index[SPO2]) & (numbers <= 1), numbers * 100.0, numbers)
    low, high = valid_low[variable], valid_high[variable]
    out_of_range = continuous & ~np.isnan(numbers) & ((numbers < low) | (numbers > high))
    counts["out_of_range"] += int(out_of_range.sum())
    code[continuous] = numbers[continuous]
    keep = ~np.isnan(code) & ~out_of_range
    return events.assign(variable=variable, code=code)[keep]


def _forward_fill(grid: np.ndarray, normal_code: np.ndarray) -> np.ndarray:
    """Carry the last observation forward over hours; the normal code before the first observation."""
    by_hour = np.ascontiguousarray(np.moveaxis(grid, 1, 0))  # (hour, stay, variable): each hour contiguous
    for hour in range(1, by_hour.shape[0]):
        np.copyto(by_hour[hour], by_hour[hour - 1], where=np.isnan(by_hour[hour]))
    np.copyto(by_hour, np.broadcast_to(normal_code, by_hour.shape), where=np.isnan(by_hour))
    return np.ascontiguousarray(np.moveaxis(by_hour, 0, 1))


def _encode(filled: np.ndarray, layout: Channels, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(stay, hour, 59) float32 features: z-scored continuous values (mean/std per continuous variable, in
    :attr:`Channels.continuous_variables` order) and one-hot categorical codes."""
    features = np.empty(filled.shape[:2] + (len(layout.feature_names),), dtype=np.float32)
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


def text_coded_items() -> np.ndarray:
    """Itemids whose text is read even when valuenum is present (GCS components)."""
    item_map = itemids()
    return item_map.loc[item_map["variable"].isin(list(GCS_CANONICAL)), "itemid"].to_numpy()


def extract_hourly_codes(mimic_iv_root: str | Path, cohort: pd.DataFrame, hours: int, layout: Channels, *,
                         itemid_map: str = DEFAULT_ITEMID_MAP, threads: int = 1,
                         block_size: int = event_stream.DEFAULT_BLOCK_SIZE) -> tuple[np.ndarray, dict[str, int]]:
    """(stay, hour, variable) code of the last clean event per bin (NaN: none) and the drop counts.

    ``cohort`` comes from :func:`prepare_stays`; ``itemid_map`` names the itemid map (``corrected`` or
    ``benchmark``). Hour 0 of a :data:`STATIC_VARIABLES` variable without an event of its own holds the last
    clean event before intime (see :func:`ehrcxr.data.events.select_block`). With ``threads`` >= 4 chartevents
    and labevents stream concurrently (each stream keeps ~2 cores busy: decompression, then parsing and
    filtering); the result does not depend on it."""
    root = Path(mimic_iv_root)
    item_map = mapped_itemids(itemid_map)
    stays = event_stream.StayLookup(cohort, hours)
    bins = event_stream.HourlyBins(len(cohort), hours, len(layout.variables))
    text_items = text_coded_items()
    static_items = item_map.loc[item_map["variable"].isin(STATIC_VARIABLES), "itemid"].to_numpy()

    def stream(table: str) -> dict[str, int]:
        counts = dict.fromkeys(DROP_REASONS, 0)
        unknown_gcs: Counter = Counter()

        def consume(kept: event_stream.KeptEvents) -> None:
            clean = clean_events(kept.frame, layout, counts, unknown_gcs)
            rows = clean.index.to_numpy()
            bins.update(kept.stay_pos[rows], kept.since[rows], kept.row_key[rows], clean["variable"].to_numpy(),
                        clean["code"].to_numpy(dtype=np.float64))

        wanted = item_map.loc[item_map["table"] == table, "itemid"].to_numpy()
        path = raw.table_path(root, raw.MIMIC_IV_TABLES[table])
        event_stream.stream_table(path, table, stays, wanted, text_items, static_items, consume, counts, block_size)
        if unknown_gcs:
            log.warning("%s: %d GCS events with an unknown value dropped (value: count) %s", path,
                        counts["unknown_gcs"], dict(unknown_gcs.most_common(10)))
        return counts

    with ThreadPoolExecutor(max_workers=2 if threads >= CONCURRENT_TABLES_MIN_THREADS else 1) as pool:
        per_table = list(pool.map(stream, event_stream.EVENT_TABLES))
    counts = {reason: sum(table_counts[reason] for table_counts in per_table) for reason in DROP_REASONS}
    codes, carried = bins.codes()
    for variable in STATIC_VARIABLES:
        log.info("%s: hour 0 of %d of %d stays holds the last value before intime", variable,
                 carried[:, layout.variables.index(variable)].sum(), len(cohort))
    return codes, counts


def tensor_from_codes(codes: np.ndarray, cohort: pd.DataFrame, layout: Channels,
                      counts: dict[str, int]) -> xr.Dataset:
    """The EHR tensor Dataset from hourly codes (:func:`extract_hourly_codes`) of a :func:`prepare_stays` cohort."""
    hours = codes.shape[1]
    length = np.clip(np.ceil(cohort["los_hours"].to_numpy(dtype=np.float64)), 1, hours).astype(np.int32)
    valid = np.arange(hours)[None, :] < length[:, None]
    mask = (~np.isnan(codes) & valid[:, :, None]).astype(np.uint8)
    filled = _forward_fill(codes, layout.normal_code)

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


def build_ehr_tensor(mimic_iv_root: str | Path, stays: pd.DataFrame, *, hours: int = 48,
                     itemid_map: str = DEFAULT_ITEMID_MAP, threads: int = 1,
                     block_size: int = event_stream.DEFAULT_BLOCK_SIZE) -> xr.Dataset:
    """Hourly tensor of the first ``hours`` hours of each stay: values (stay, hour, 59 features, z-scored
    with train-split statistics), mask (stay, hour, 17 variables), length (valid hours); attrs
    ``itemid_map`` names the itemid map used."""
    if hours < 1:
        raise ValueError(f"hours must be >= 1, got {hours}")
    mapped_itemids(itemid_map)  # an unknown map fails before the tables are read
    raw.check_mimic_iv(mimic_iv_root, tables=list(event_stream.EVENT_TABLES))
    cohort = prepare_stays(stays)
    layout = channel_layout()
    codes, counts = extract_hourly_codes(mimic_iv_root, cohort, hours, layout, itemid_map=itemid_map,
                                         threads=threads, block_size=block_size)
    dataset = tensor_from_codes(codes, cohort, layout, counts)
    dataset.attrs["itemid_map"] = itemid_map
    return dataset


def observed_rates(dataset: xr.Dataset) -> pd.Series:
    """Share of valid (stay, hour) bins with a real observation, per variable."""
    valid = dataset["hour"] < dataset["length"]
    observed = dataset["mask"].where(valid).sum(("stay", "hour"))
    return (observed / valid.sum()).to_series()


def run_ehr_tensor(mimic_iv_root: str | Path, stays_path: str | Path, task: str, out_path: str | Path,
                   hours: int = 48, itemid_map: str = DEFAULT_ITEMID_MAP, threads: int = 1) -> xr.Dataset:
    """Build the EHR tensor of ``task``'s cohort stays and write it as compressed NetCDF (h5netcdf).

    ``itemid_map``: ``corrected`` or ``benchmark`` (mimic3-benchmarks' map, as MedFuse and CareBench).
    ``threads`` sizes pyarrow's CSV parsing pool; from 4 on chartevents and labevents stream concurrently."""
    pa.set_cpu_count(max(1, int(threads)))
    stays = task_stays(pd.read_parquet(stays_path), task)
    log.info("%s: %d stays (%s)", task, len(stays), stays["split"].value_counts().to_dict())
    excluded = itemids().loc[~itemids()["itemid"].isin(mapped_itemids(itemid_map)["itemid"]), "itemid"]
    log.info("itemid map: %s (itemids left out: %s)", itemid_map, ", ".join(map(str, excluded)) or "none")
    dataset = build_ehr_tensor(mimic_iv_root, stays, hours=hours, itemid_map=itemid_map, threads=threads)
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
