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


@lru_cache
def phenotypes() -> list[dict]:
    """The 25 benchmark phenotypes: dicts with name, label (column name), type, icd9, icd10 code lists."""
    return yaml.safe_load((RESOURCES / "phenotypes.yaml").read_text())["phenotypes"]


def phenotype_labels() -> list[str]:
    """Label column names of the 25 phenotypes, in benchmark order."""
    return [p["label"] for p in phenotypes()]


@lru_cache
def itemids() -> pd.DataFrame:
    """Itemid -> variable map (columns: variable, itemid, label, unit, table, fluid)."""
    return pd.read_csv(RESOURCES / "itemids.csv")


@lru_cache
def variable_ranges() -> pd.DataFrame:
    """Per-variable outlier/valid ranges and imputation values, indexed by variable."""
    return pd.read_csv(RESOURCES / "variable_ranges.csv").set_index("variable")


@lru_cache
def channels() -> dict:
    """The 17-variable discretizer config: id_to_channel, is_categorical_channel, possible_values, normal_values."""
    return json.loads((RESOURCES / "channels.json").read_text())
