"""Snakemake adapter: group metrics, gaps, fusion's effect on disparity (tables/fairness_*)."""
from ehrcxr.analysis.fairness import run_fairness
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_fairness(snakemake.input.metrics, snakemake.input.stays, a["modalities"], a["tables_dir"], a["figures_dir"],
             ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"], n_boot=evaluate["n_bootstrap"],
             ci=evaluate["ci"], seed=evaluate["seed"], min_stays=a["settings"]["fairness_min_stays"],
             threads=snakemake.threads)
