"""Snakemake adapter: every model's metrics by the age of the paired X-ray at prediction time (tables/xray_age.*)."""
from ehrcxr.analysis.calibration import run_xray_age
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_xray_age(snakemake.input.metrics, snakemake.input.stays, a["modalities"], a["tables_dir"], a["figures_dir"],
             ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"],
             age_bins=a["settings"]["xray_age_hours"], n_boot=evaluate["n_bootstrap"], ci=evaluate["ci"],
             seed=evaluate["seed"], threads=snakemake.threads,
             contrasts=[tuple(pair) for pair in a["settings"]["xray_age_contrasts"]])
