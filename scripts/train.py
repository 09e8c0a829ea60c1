"""Snakemake adapter: train and evaluate one grid cell."""
from pathlib import Path

from ehrcxr.logs import log_to
from ehrcxr.train.cell import run_cell

log_to(snakemake.log[0])
run_cell(inputs=dict(snakemake.input.items()), out_dir=Path(snakemake.output.metrics).parent,
         task=snakemake.wildcards.task, model=snakemake.wildcards.model, missing=snakemake.wildcards.missing,
         seed=int(snakemake.wildcards.seed), settings=snakemake.params.settings, threads=snakemake.threads)
