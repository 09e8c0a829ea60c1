"""Snakemake adapter: the DDL-CXR autoencoder's latent of every cached image."""
from ehrcxr.ddl.autoencoder import run_latents
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_latents(snakemake.input.model, snakemake.input.images, snakemake.output.latents, device=snakemake.params.device,
            threads=snakemake.threads)
