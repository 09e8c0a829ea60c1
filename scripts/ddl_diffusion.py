"""Snakemake adapter: DDL-CXR's conditional latent diffusion model of one generator variant and seed."""
from ehrcxr.ddl.diffusion import run_diffusion
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_diffusion(snakemake.input.pairs, snakemake.input.latents, snakemake.input.index, snakemake.input.ehr,
              snakemake.output.model, snakemake.output.history, snakemake.params.diffusion,
              snakemake.params.variant, seed=int(snakemake.wildcards.seed), device=snakemake.params.device,
              threads=snakemake.threads)
