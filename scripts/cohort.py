"""Snakemake adapter: build the ICU-stay cohort, labels, splits and CXR pairing."""
from ehrcxr.data.cohort import run_cohort
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_cohort(snakemake.input.mimic_iv, snakemake.input.get("mimic_cxr"), snakemake.output.stays,
           snakemake.output.cxr_studies, snakemake.params.cohort, cxr_image_layout=snakemake.params.cxr_image_layout)
