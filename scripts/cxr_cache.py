"""Snakemake adapter: decode and resize every needed JPEG once into a memory-mapped array."""
from ehrcxr.data.cxr import run_cxr_cache
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_cxr_cache(snakemake.input.cxr_images, snakemake.input.cxr_studies, snakemake.output.images,
              snakemake.output.index, image_size=snakemake.params.image_size, threads=snakemake.threads)
