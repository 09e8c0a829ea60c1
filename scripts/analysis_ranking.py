"""Snakemake adapter: average ranks, Friedman test and critical-difference diagram (tables/ranking.*)."""
from ehrcxr.analysis.ranking import run_ranking
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
a = snakemake.params.analysis
run_ranking(snakemake.input.metrics, a["modalities"], a["tables_dir"], a["figures_dir"],
            ehr_only_models=a["ehr_only_models"], grid_missing=a["grid_missing"])
