"""Realism check: the synthetic default beside the real MIMIC-IV demo and published MIMIC figures.

Generates a synthetic dataset (or reads an existing results/synthetic folder), runs the cohort and both EHR
tensors on it and on the MIMIC-IV demo with the library calls the workflow uses (cohort settings from
config/config.yaml and config/mimic_demo.yaml), profiles both (ehrcxr.realism) and writes the side-by-side table
to OUT.md and OUT.csv: aggregates only, never a per-stay row.

Usage: PYTHONPATH=src python benchmarks/realism.py OUT [--n-stays 4000] [--seed 0] [--synthetic results/synthetic]
       [--demo ../shared/mimic-iv-demo]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ehrcxr.data.tasks import TASKS
from ehrcxr.realism import TARGETS, compare, profile_dataset
from ehrcxr.realism import build_outputs as realism_outputs
from ehrcxr.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "mimic-iv-demo"


class Stopwatch:
    """Prints and keeps the seconds of each named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, step, *args, **kwargs):
        started = time.perf_counter()
        result = step(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - started
        print(f"{name:<40} {self.seconds[name]:7.1f} s", flush=True)
        return result


def build_outputs(mimic_iv: Path, mimic_cxr: Path | None, out: Path, config: dict, name: str,
                  clock: Stopwatch) -> Path:
    """Cohort and both EHR tensors of one dataset under ``out``, each step timed as '<name>: <step>'."""
    return realism_outputs(mimic_iv, mimic_cxr, out, config,
                           step=lambda step, call, *args, **kwargs: clock.run(f"{name}: {step}", call, *args, **kwargs))


def has_outputs(folder: Path) -> bool:
    """Whether ``folder`` already holds the cohort and both task tensors."""
    return (folder / "cohort" / "stays.parquet").exists() and all(
        (folder / "ehr" / f"{task}.nc").exists() for task in TASKS)


def synthetic_outputs(args, work: Path, clock: Stopwatch) -> Path:
    """Folder with the synthetic cohort/ and ehr/: the given one, built from its raw/, or freshly generated."""
    if args.synthetic is not None and has_outputs(args.synthetic):
        return args.synthetic
    raw = args.synthetic / "raw" if args.synthetic is not None else work / "synthetic" / "raw"
    if args.synthetic is None:
        clock.run(f"synthetic: generate {args.n_stays:,} stays", generate, raw, n_stays=args.n_stays,
                  seed=args.seed, image_size=args.image_size)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    return build_outputs(raw / "mimic-iv", raw / "mimic-cxr-jpg", work / "synthetic", config, "synthetic", clock)


def number(value: float) -> str:
    """Four significant digits; empty for NaN."""
    return "" if pd.isna(value) else f"{value:.4g}"


def render_markdown(table: pd.DataFrame, sizes: dict[str, int], source: str) -> str:
    """The comparison as Markdown: a summary line, the table and the targets with their justification."""
    checked = table["ok"].notna()
    failed = table.loc[checked & ~table["ok"].fillna(True), "aspect"]
    ci = [f"[{number(low)}, {number(high)}]" if pd.notna(low) else ""
          for low, high in zip(table["real_ci_low"], table["real_ci_high"])]
    shown = pd.DataFrame({
        "aspect": table["aspect"], "synthetic": table["synthetic"].map(number), "real": table["real"].map(number),
        "real 95% CI": ci, "real n": table["real_n"].map(lambda n: "" if pd.isna(n) else f"{int(n):,}"),
        "reference": table["reference"], "target": table["target"], "ok": table["ok"].map({True: "✓", False: "✗"}).fillna("—"),
        "detail": table["detail"]})
    legend = pd.DataFrame([(family, target.text, target.why) for family, target in TARGETS.items()],
                          columns=["family", "target", "why"])
    lines = [f"# Realism: synthetic ({source}) vs the MIMIC-IV demo", "",
             f"Cohort stays: synthetic {sizes['synthetic']:,}, real {sizes['real']:,}. Aspects with a target: "
             f"{int(checked.sum())}, met: {int(checked.sum()) - len(failed)}, missed: {len(failed)}.",
             "Shares are fractions; EHR value rows are over the observed hours of the mortality task's first "
             "48 h in physical units; CIs are Wilson (shares of stays) or Hanley-McNeil (AUROCs).", "",
             shown.to_markdown(index=False), "", "## Targets", "", legend.to_markdown(index=False), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output path without suffix: writes OUT.md and OUT.csv")
    parser.add_argument("--n-stays", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--synthetic", type=Path, default=None,
                        help="an existing results/synthetic folder (its cohort/ and ehr/, else built from its raw/)")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the MIMIC-IV demo v2.2 (holds hosp/ and icu/)")
    args = parser.parse_args()
    clock = Stopwatch()
    work = Path(tempfile.mkdtemp(prefix="ehrcxr-realism-"))
    try:
        synthetic = synthetic_outputs(args, work, clock)
        demo_config = yaml.safe_load((REPO / "config" / "mimic_demo.yaml").read_text())
        real = build_outputs(args.demo, None, work / "mimic_demo", demo_config, "demo", clock)
        profiles = {name: clock.run(f"{name}: profile", profile_dataset, folder / "cohort", folder / "ehr")
                    for name, folder in (("synthetic", synthetic), ("real", real))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = compare(profiles["synthetic"], profiles["real"])
    sizes = {name: int(profile.loc[profile["family"] == "no_phenotype_share", "n"].iloc[0])
             for name, profile in profiles.items()}
    source = str(args.synthetic) if args.synthetic else f"{args.n_stays:,} generated stays, seed {args.seed}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".md").write_text(render_markdown(table, sizes, source))
    checked = table["ok"].notna()
    print(f"{int(table.loc[checked, 'ok'].sum())}/{int(checked.sum())} targets met; total "
          f"{np.sum(list(clock.seconds.values())):.1f} s -> {args.out.with_suffix('.md')}, "
          f"{args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
