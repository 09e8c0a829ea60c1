"""Write large chartevents files in the real MIMIC-IV v3.1 format for the extraction benchmark.

Rows mimic the real table: 11 columns in the official order, ids in MIMIC ranges, ~30% of rows from the
17-variable item map (numeric values, GCS text, "None"/"No Response-ETT"), the rest from other items (with
free-text values), charted over stays of 1-10 days so that only part of each stay falls in its first 48 h.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ehrcxr.resources import itemids

CHARTEVENTS_COLUMNS = ["subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
                       "value", "valuenum", "valueuom", "warning"]
LABEVENTS_COLUMNS = ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
                     "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
                     "ref_range_upper", "flag", "priority", "comments"]
MAPPED_SHARE = 0.3
GCS_TEXT = {220739: ["Spontaneously", "To Speech", "To Pain", "None"],                       # eye opening
            223900: ["Oriented", "Confused", "Inappropriate Words", "No Response-ETT"],   # verbal
            223901: ["Obeys Commands", "Localizes Pain", "Flex-withdraws", "No response"]}  # motor
OTHER_TEXT = ["Normal sinus", "Sinus Tachy", "Regular", "Intact", "Clear", "Diminished", "Yes", "No"]
BATCH_ROWS = 1_000_000
GZIP_LEVEL = 6  # gzip's default, as in the PhysioNet files


def benchmark_stays(n_stays: int, seed: int = 0) -> pd.DataFrame:
    """A cohort in the stays.parquet contract: subject/hadm/stay ids, intime/outtime, length and split."""
    rng = np.random.default_rng(seed)
    stay_id = 30_000_000 + np.arange(n_stays) * 7
    subject_id = 10_000_000 + np.arange(n_stays) * 3
    hadm_id = 20_000_000 + np.arange(n_stays) * 5
    intime = pd.Timestamp("2150-01-01") + pd.to_timedelta(rng.integers(0, 3650 * 24 * 60, n_stays), unit="min")
    los_hours = rng.uniform(24, 240, n_stays)
    outtime = intime + pd.to_timedelta(los_hours * 3600, unit="s").round("s")
    split = rng.choice(["train", "val", "test"], n_stays, p=[0.7, 0.1, 0.2])
    return pd.DataFrame({"stay_id": stay_id, "subject_id": subject_id, "hadm_id": hadm_id, "intime": intime,
                         "outtime": outtime, "los_hours": (outtime - intime) / pd.Timedelta(hours=1),
                         "split": split})


def _timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype("datetime64[s]")).cast(pa.string())


def _chart_batch(stays: pd.DataFrame, n_rows: int, rng: np.random.Generator) -> pa.Table:
    item_map = itemids()
    chart_items = item_map.loc[item_map["table"] == "chartevents", ["itemid", "variable"]]
    stay = rng.integers(0, len(stays), n_rows)
    mapped = rng.random(n_rows) < MAPPED_SHARE
    itemid = np.where(mapped, rng.choice(chart_items["itemid"].to_numpy(), n_rows),
                      rng.integers(225_000, 229_000, n_rows))
    start = stays["intime"].to_numpy().astype("datetime64[s]").astype(np.int64)[stay]
    length = (stays["los_hours"].to_numpy() * 3600).astype(np.int64)[stay]
    charttime = start + (rng.random(n_rows) * length).astype(np.int64) // 60 * 60
    number = np.round(rng.normal(80, 15, n_rows), 1)
    gcs = np.isin(itemid, list(GCS_TEXT))
    text_only = (~mapped & (rng.random(n_rows) < 0.3)) | gcs
    text = rng.choice(OTHER_TEXT, n_rows).astype(object)
    for item, words in GCS_TEXT.items():
        rows = itemid == item
        text[rows] = rng.choice(words, int(rows.sum()))
    value = np.where(text_only, text, number.astype(str))
    valuenum = pa.array(number, mask=text_only)
    return pa.table({
        "subject_id": stays["subject_id"].to_numpy()[stay], "hadm_id": stays["hadm_id"].to_numpy()[stay],
        "stay_id": stays["stay_id"].to_numpy()[stay], "caregiver_id": rng.integers(10_000, 99_999, n_rows),
        "charttime": _timestamps(charttime), "storetime": _timestamps(charttime + 600),
        "itemid": itemid, "value": value, "valuenum": valuenum,
        "valueuom": np.where(text_only, "", "bpm"), "warning": rng.integers(0, 2, n_rows)})


def _csv_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return sink.getvalue().to_pybytes()


def _write_gzip_csv(path: Path, columns: list[str], batches) -> None:
    """One gzip member (like the real files): header line, then each batch; compression overlaps generation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    with open(path, "wb") as out, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(compressor.compress, (",".join(columns) + "\n").encode())
        for batch in batches:
            data = _csv_bytes(batch)
            out.write(pending.result())
            pending = pool.submit(compressor.compress, data)
        out.write(pending.result())
        out.write(compressor.flush())


def write_chartevents(path: Path, stays: pd.DataFrame, n_rows: int, seed: int = 0) -> None:
    """Write ``n_rows`` chartevents rows of ``stays`` as a gzip-compressed CSV with the official header."""
    rng = np.random.default_rng(seed)
    sizes = [min(BATCH_ROWS, n_rows - start) for start in range(0, n_rows, BATCH_ROWS)]
    _write_gzip_csv(path, CHARTEVENTS_COLUMNS, (_chart_batch(stays, size, rng) for size in sizes))


def write_labevents(path: Path, stays: pd.DataFrame, n_rows: int, seed: int = 1) -> None:
    """Write ``n_rows`` labevents rows (v3.1 columns; half of them glucose or pH, assigned by hadm_id)."""
    rng = np.random.default_rng(seed)
    item_map = itemids()
    lab_items = item_map.loc[item_map["table"] == "labevents", "itemid"].to_numpy()
    stay = rng.integers(0, len(stays), n_rows)
    itemid = np.where(rng.random(n_rows) < 0.5, rng.choice(lab_items, n_rows), rng.integers(51_000, 52_000, n_rows))
    start = stays["intime"].to_numpy().astype("datetime64[s]").astype(np.int64)[stay]
    charttime = start + rng.integers(-24 * 3600, 96 * 3600, n_rows) // 60 * 60
    number = np.round(rng.normal(7.4, 0.1, n_rows), 2)
    empty = pa.nulls(n_rows, pa.string())
    table = pa.table({
        "labevent_id": np.arange(n_rows), "subject_id": stays["subject_id"].to_numpy()[stay],
        "hadm_id": stays["hadm_id"].to_numpy()[stay], "specimen_id": rng.integers(0, 10**8, n_rows),
        "itemid": itemid, "order_provider_id": empty, "charttime": _timestamps(charttime),
        "storetime": _timestamps(charttime + 3600), "value": number.astype(str), "valuenum": number,
        "valueuom": np.full(n_rows, "units"), "ref_range_lower": np.full(n_rows, 7.35),
        "ref_range_upper": np.full(n_rows, 7.45), "flag": empty, "priority": np.full(n_rows, "ROUTINE"),
        "comments": empty})
    _write_gzip_csv(path, LABEVENTS_COLUMNS, [table])
