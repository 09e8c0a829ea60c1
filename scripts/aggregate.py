"""Snakemake adapter: bootstrap-CI tables over every finished cell."""
from pathlib import Path

from ehrcxr.evaluate.aggregate import run_aggregate
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_aggregate([Path(p).parent for p in snakemake.input.metrics], snakemake.output.csv, snakemake.output.md,
              oracle_path=snakemake.input.get("oracle"), params=snakemake.params.evaluate,
              ehr_only_models=snakemake.params.ehr_only_models, grid_missing=snakemake.params.grid_missing,
              threads=snakemake.threads, itemid_map=snakemake.params.itemid_map)
