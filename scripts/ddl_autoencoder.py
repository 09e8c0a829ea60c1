"""Snakemake adapter: DDL-CXR's autoencoder with its CheXpert head, for one seed."""
from ehrcxr.ddl.autoencoder import run_autoencoder
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_autoencoder(snakemake.input.cxr_studies, snakemake.input.stays, snakemake.input.images, snakemake.input.index,
                snakemake.output.model, snakemake.output.history, snakemake.params.autoencoder,
                seed=int(snakemake.wildcards.seed), device=snakemake.params.device, threads=snakemake.threads)
