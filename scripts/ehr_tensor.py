"""Snakemake adapter: hourly EHR tensor of one task."""
from ehrcxr.data.ehr import run_ehr_tensor
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
run_ehr_tensor(snakemake.input.mimic_iv, snakemake.input.stays, snakemake.wildcards.task, snakemake.output[0],
               hours=snakemake.params.ehr["hours"], itemid_map=snakemake.params.ehr["itemid_map"],
               threads=snakemake.threads)
