"""Snakemake adapter: one generator's X-ray latents at prediction time (DDIM, or z0 itself for copy_x0)."""
from ehrcxr.ddl.generation import run_generation
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_generation(snakemake.wildcards.generator, snakemake.input.get("diffusion"), snakemake.input.latents,
               snakemake.input.stays, snakemake.input.index, snakemake.input.ehr, snakemake.output.generated,
               snakemake.params.generation, seed=int(snakemake.wildcards.seed), device=snakemake.params.device,
               threads=snakemake.threads)
