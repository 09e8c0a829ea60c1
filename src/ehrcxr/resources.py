"""Static reference data shipped in resources/ (phenotype ICD codes, itemids, ranges, channels)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

RESOURCES = Path(__file__).resolve().parents[2] / "resources"

CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
RACE_GROUPS = ["WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER"]
# Named itemid maps: "benchmark" is every row of itemids.csv (mimic3-benchmarks' map, as MedFuse and CareBench);
# "corrected" keeps the rows marked in_corrected_map (it drops lab items measured in urine or other body fluids).
ITEMID_MAPS = ("corrected", "benchmark")
DEFAULT_ITEMID_MAP = "corrected"


@lru_cache
def phenotypes() -> list[dict]:
    """The 25 benchmark phenotypes: dicts with name, label (column name), type, icd9, icd10 code lists."""
    return yaml.safe_load((RESOURCES / "phenotypes.yaml").read_text())["phenotypes"]


def phenotype_labels() -> list[str]:
    """Label column names of the 25 phenotypes, in benchmark order."""
    return [p["label"] for p in phenotypes()]


@lru_cache
def itemids() -> pd.DataFrame:
    """Every itemid -> variable row (columns: variable, itemid, label, unit, table, fluid, in_corrected_map)."""
    return pd.read_csv(RESOURCES / "itemids.csv", dtype={"in_corrected_map": bool})


def mapped_itemids(name: str) -> pd.DataFrame:
    """The rows of :func:`itemids` in the named map (one of :data:`ITEMID_MAPS`)."""
    if name not in ITEMID_MAPS:
        raise ValueError(f"unknown itemid map {name!r}; expected one of {', '.join(ITEMID_MAPS)}")
    items = itemids()
    return items if name == "benchmark" else items[items["in_corrected_map"]]


@lru_cache
def variable_ranges() -> pd.DataFrame:
    """Per-variable outlier/valid ranges and imputation values, indexed by variable."""
    return pd.read_csv(RESOURCES / "variable_ranges.csv").set_index("variable")


@lru_cache
def channels() -> dict:
    """The 17-variable discretizer config: id_to_channel, is_categorical_channel, possible_values, normal_values."""
    return json.loads((RESOURCES / "channels.json").read_text())
