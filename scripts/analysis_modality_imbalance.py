"""Snakemake adapter: drop of every fusion model with the X-ray or the EHR withheld (tables/modality_imbalance.*)."""
from pathlib import Path

from ehrcxr.analysis.imbalance import run_imbalance
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_imbalance(snakemake.input.metrics, a["modalities"], Path(a["tables_dir"]) / "modality_imbalance",
              Path(a["figures_dir"]) / "modality_imbalance", signal_map=snakemake.input.get("signal_map"),
              ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"],
              n_boot=evaluate["n_bootstrap"], ci=evaluate["ci"], seed=evaluate["seed"], threads=snakemake.threads)
