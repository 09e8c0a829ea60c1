"""The simple in-memory extraction: the reference that ehrcxr's streaming path must equal, and the benchmark's
baseline. pandas reads each whole event table, keeps the mapped itemids, joins the stays, cleans with
ehrcxr's own rules and pivots the last value per (stay, hour, variable); hour 0 of a static variable without a
value of its own takes the last value charted before intime (rows naming the stay or its admission).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.data import ehr, raw
from ehrcxr.data.events import EVENT_TABLES, READ_COLUMNS
from ehrcxr.resources import DEFAULT_ITEMID_MAP, mapped_itemids


def _assign_stays(events: pd.DataFrame, cohort: pd.DataFrame) -> pd.DataFrame:
    """Join events to stays by stay_id; without one by hadm_id; without both by subject_id."""
    stays = cohort[["stay_id", "hadm_id", "subject_id", "stay_pos", "intime", "outtime"]]
    events = events.reindex(columns=[*events.columns.drop("stay_id", errors="ignore"), "stay_id"])
    has_stay, has_hadm = events["stay_id"].notna(), events["hadm_id"].notna()
    by_stay = events[has_stay].drop(columns=["hadm_id", "subject_id"]).astype({"stay_id": "int64"})
    by_hadm = events[~has_stay & has_hadm].drop(columns=["stay_id", "subject_id"]).astype({"hadm_id": "int64"})
    by_subject = events[~has_stay & ~has_hadm].drop(columns=["stay_id", "hadm_id"])
    parts = [by_stay.merge(stays, on="stay_id"), by_hadm.merge(stays, on="hadm_id"),
             by_subject.merge(stays, on="subject_id")]
    return pd.concat(parts, ignore_index=True)


def naive_hourly_codes(mimic_iv_root: str | Path, cohort: pd.DataFrame, hours: int, layout: ehr.Channels,
                       itemid_map: str = DEFAULT_ITEMID_MAP) -> np.ndarray:
    """(stay, hour, variable) codes like :func:`ehrcxr.data.ehr.extract_hourly_codes`, all in memory."""
    item_map = mapped_itemids(itemid_map)
    static_items = item_map.loc[item_map["variable"].isin(ehr.STATIC_VARIABLES), "itemid"]
    kept = []
    for table_index, table in enumerate(EVENT_TABLES):
        path = raw.table_path(mimic_iv_root, raw.MIMIC_IV_TABLES[table])
        events = pd.read_csv(path, usecols=READ_COLUMNS[table], dtype={"value": str}, **raw.NA_ONLY_EMPTY)
        events = events[events["itemid"].isin(item_map.loc[item_map["table"] == table, "itemid"])]
        stay_id = events["stay_id"] if "stay_id" in events else pd.Series(np.nan, index=events.index)
        names_stay_or_admission = events["hadm_id"].notna() | stay_id.notna()
        events = events.assign(row=events.index, table=table_index, charttime=pd.to_datetime(events["charttime"]),
                               names_stay_or_admission=names_stay_or_admission)
        pairs = _assign_stays(events, cohort)
        since = pairs["charttime"] - pairs["intime"]
        window = (since >= pd.Timedelta(0)) & (since < pd.Timedelta(hours=hours)) & (pairs["charttime"] <= pairs["outtime"])
        before = (since < pd.Timedelta(0)) & pairs["itemid"].isin(static_items) & pairs["names_stay_or_admission"]
        keep = window | before
        kept.append(pairs[keep].assign(hour=(since[keep] // pd.Timedelta(hours=1)).astype("int64")))  # < 0: before
    events = pd.concat(kept, ignore_index=True)
    counts = dict.fromkeys(ehr.DROP_REASONS, 0)
    events = ehr.clean_events(events, layout, counts)
    events = events.sort_values(["charttime", "table", "row"], kind="stable")
    in_window = events["hour"] >= 0
    table = events[in_window].pivot_table(index=["stay_pos", "hour"], columns="variable", values="code",
                                          aggfunc="last")
    codes = np.full((len(cohort), hours, len(layout.variables)), np.nan)
    stay_pos, hour = (table.index.get_level_values(level).to_numpy() for level in ("stay_pos", "hour"))
    for variable in table.columns:
        codes[stay_pos, hour, variable] = table[variable].to_numpy()
    last_before = events[~in_window].groupby(["stay_pos", "variable"])["code"].last()
    stay_pos, variable = (last_before.index.get_level_values(level).to_numpy() for level in ("stay_pos", "variable"))
    own = codes[stay_pos, 0, variable]
    codes[stay_pos, 0, variable] = np.where(np.isnan(own), last_before.to_numpy(), own)
    return codes
