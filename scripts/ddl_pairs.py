"""Snakemake adapter: DDL-CXR's diffusion pairs and prediction X-rays (ddl_cxr/pairs.parquet, prediction_x0.parquet)."""
from ehrcxr.data.pairs import run_pairs
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_pairs(snakemake.input.stays, snakemake.input.cxr_studies, snakemake.input.ehr, snakemake.output.pairs,
          snakemake.output.prediction, snakemake.params.pairs)
