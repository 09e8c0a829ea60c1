"""Mean per-label AUROC of each model by planted signal group (synthetic data): does the benchmark find
which modality carries which phenotype, and does a fusion model use both?

Reads the aggregated ``tables/main_results.csv`` (per-label rows ``auroc:<label>``) and the generator's
``raw/signal_map.json``; prints one Markdown table (aggregates only).

Usage: python benchmarks/signal_groups.py [--results results/synthetic] [--task phenotyping]
       [--missing natural] [--eval-set paired_test]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

GROUPS = ("ehr", "cxr", "both", "weak")


def signal_group_table(results: Path, task: str, missing: str, eval_set: str) -> pd.DataFrame:
    """Models x signal groups: the mean of the per-label AUROC estimates of the group's labels."""
    table = pd.read_csv(results / "tables" / "main_results.csv")
    signal = json.loads((results / "raw" / "signal_map.json").read_text())
    rows = table[(table["task"] == task) & (table["eval_set"] == eval_set)
                 & table["missing"].isin([missing, "—"]) & table["metric"].str.startswith("auroc:")]
    if rows.empty:
        raise ValueError(f"{results}/tables/main_results.csv has no per-label AUROC rows for {task}/{missing}/"
                         f"{eval_set}")
    rows = rows.assign(group=rows["metric"].str.removeprefix("auroc:").map(signal))
    means = rows.pivot_table(index="model", columns="group", values="estimate", aggfunc="mean")
    counts = rows.drop_duplicates("metric")["group"].value_counts()
    means.columns = [f"{group} ({counts.get(group, 0)} labels)" for group in means.columns]
    return means[[c for group in GROUPS for c in means.columns if c.startswith(f"{group} ")]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results/synthetic"))
    parser.add_argument("--task", default="phenotyping")
    parser.add_argument("--missing", default="natural")
    parser.add_argument("--eval-set", default="paired_test")
    args = parser.parse_args()
    table = signal_group_table(args.results, args.task, args.missing, args.eval_set)
    print(f"Mean per-label AUROC by planted signal: {args.task}, {args.missing}, {args.eval_set}\n")
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
