"""Snakemake adapter: ECE and Brier score with CIs, reliability diagrams (tables/calibration.*)."""
from ehrcxr.analysis.calibration import run_calibration
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_calibration(snakemake.input.metrics, a["modalities"], a["tables_dir"], a["figures_dir"],
                ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"],
                n_boot=evaluate["n_bootstrap"], ci=evaluate["ci"], seed=evaluate["seed"],
                bins=a["settings"]["calibration_bins"], threads=snakemake.threads)
