"""Rebuild resources/ from ../shared/reference-data (run once; outputs are committed).

Usage: python resources/build.py [REFERENCE_DATA_DIR]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent


# Short label column names, in the benchmark's alphabetical (listfile) order.
SHORT_LABELS = [
    "acute_renal_failure", "acute_cerebrovascular", "acute_mi", "cardiac_dysrhythmias", "ckd", "copd",
    "complications_of_care", "conduction_disorders", "chf", "coronary_atherosclerosis", "diabetes_complicated",
    "diabetes_uncomplicated", "lipid_disorders", "essential_hypertension", "fluid_electrolyte", "gi_hemorrhage",
    "hypertension_complicated", "liver_disease", "other_lower_respiratory", "other_upper_respiratory",
    "pleurisy_pneumothorax", "pneumonia", "respiratory_failure", "septicemia", "shock",
]


def build(reference: Path) -> None:
    both = yaml.safe_load((reference / "icd_9_10_definitions.yaml").read_text())
    icd9_only = yaml.safe_load((reference / "hcup_ccs_2015_definitions.yaml").read_text())
    phenotypes = []
    names = sorted(n for n, group in both.items() if group.get("use_in_benchmark"))
    for name, short in zip(names, SHORT_LABELS, strict=True):
        icd9_set = set(icd9_only[name]["codes"])
        codes = list(dict.fromkeys(str(c) for c in both[name]["codes"]))  # dedupe, keep order
        phenotypes.append({
            "name": name,
            "label": "ph_" + short,
            "type": both[name]["type"],
            "icd9": [c for c in codes if c in icd9_set],
            "icd10": [c for c in codes if c not in icd9_set],
        })
    assert len(phenotypes) == 25, len(phenotypes)
    (HERE / "phenotypes.yaml").write_text(yaml.safe_dump({"phenotypes": phenotypes}, sort_keys=False, width=200))

    items = pd.read_csv(reference / "itemid_to_variable_mimic4_subset.csv")
    items = items.rename(columns={"LEVEL2": "variable", "ITEMID": "itemid", "MIMIC LABEL": "label",
                                  "UNITNAME": "unit", "LINKSTO": "table", "FLUID": "fluid"})
    # mimic3-benchmarks maps urine glucose to Glucose and urine / other-body-fluid pH to pH; the corrected map
    # keeps only blood lab items (chart items carry no fluid: vitals and bedside blood measurements).
    items["in_corrected_map"] = (items["table"] != "labevents") | (items["fluid"] == "BLOOD")
    items[["variable", "itemid", "label", "unit", "table", "fluid", "in_corrected_map"]].to_csv(
        HERE / "itemids.csv", index=False)

    ranges = pd.read_csv(reference / "variable_ranges.csv")
    discretizer = json.loads((reference / "discretizer_config.json").read_text())
    channel_names = discretizer["id_to_channel"]
    # variable_ranges.csv spells "Heart rate"; the discretizer spells "Heart Rate"
    lookup = {name.lower(): name for name in channel_names}
    ranges = ranges[ranges["LEVEL2"].str.lower().isin(lookup) & ranges["LEVEL1"].isna()].copy()
    ranges["variable"] = ranges["LEVEL2"].str.lower().map(lookup)
    ranges = ranges.rename(columns={"VALID LOW": "valid_low", "VALID HIGH": "valid_high",
                                    "OUTLIER LOW": "outlier_low", "OUTLIER HIGH": "outlier_high", "IMPUTE": "impute"})
    ranges[["variable", "outlier_low", "valid_low", "impute", "valid_high", "outlier_high"]].to_csv(
        HERE / "variable_ranges.csv", index=False)
    (HERE / "channels.json").write_text(json.dumps(discretizer, indent=2) + "\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "reference-data")
