"""Snakemake adapter: fusion gain over the best unimodal model per label (tables/fusion_gain.*)."""
from pathlib import Path

from ehrcxr.analysis.fusion_gain import run_fusion_gain
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a, evaluate = snakemake.params.analysis, snakemake.params.analysis["evaluate"]
run_fusion_gain(snakemake.input.metrics, a["modalities"], Path(a["tables_dir"]) / "fusion_gain",
                Path(a["figures_dir"]) / "fusion_gain", signal_map=snakemake.input.get("signal_map"),
                ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"],
                baseline=a["settings"]["fusion_baseline"],
                n_boot=evaluate["n_bootstrap"], ci=evaluate["ci"], seed=evaluate["seed"], threads=snakemake.threads)
