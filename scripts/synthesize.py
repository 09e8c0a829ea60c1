"""Snakemake adapter: write the synthetic MIMIC-IV / MIMIC-CXR-JPG files and the oracle."""
from pathlib import Path

from ehrcxr.synthetic import generate
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
params = snakemake.params.synthetic
generate(Path(snakemake.output.oracle).parent, n_stays=params["n_stays"], seed=params["seed"],
         image_size=params["image_size"], n_corrupt_images=params.get("n_corrupt_images", 2),
         cxr_paired_share=params.get("cxr_paired_share", 0.265), signal_strength=params.get("signal_strength", 1.0))
