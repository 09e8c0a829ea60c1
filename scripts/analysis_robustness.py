"""Snakemake adapter: train-time (miss<r>) and test-time X-ray missingness curves (tables/robustness_*)."""
from ehrcxr.analysis.robustness import run_robustness
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_robustness(snakemake.input.metrics, a["modalities"], a["missing_aware"], a["tables_dir"], a["figures_dir"],
               test_rates=a["settings"]["test_missing_rates"], ehr_only_models=a["ehr_only_models"],
               grid_missing=a["grid_missing"], baseline=a["settings"]["fusion_baseline"],
               n_boot=evaluate["n_bootstrap"], ci=evaluate["ci"], seed=evaluate["seed"], threads=snakemake.threads)
