"""Snakemake adapter: bootstrap-CI tables over the grid's finished cells; the others are listed as missing."""
from ehrcxr.evaluate.aggregate import run_aggregate
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_aggregate(snakemake.params.runs, snakemake.output.csv, snakemake.output.md,
              oracle_path=snakemake.input.get("oracle"), params=snakemake.params.evaluate, allow_missing=True,
              ehr_only_models=snakemake.params.ehr_only_models, grid_missing=snakemake.params.grid_missing,
              threads=snakemake.threads, itemid_map=snakemake.params.itemid_map)
