"""Snakemake adapter: pretrain one model's EHR encoder on its task's EHR alone (one seed)."""
from pathlib import Path

from ehrcxr.logs import log_to
from ehrcxr.train.pretrain import pretrain_ehr

log_to(snakemake.log[0])
settings = snakemake.params.settings
pretrain_ehr(snakemake.input.stays, snakemake.input.ehr, snakemake.output.encoder,
             Path(snakemake.output.history).parent, task=snakemake.wildcards.task, model=snakemake.wildcards.model,
             params=settings["params"], train=settings["train"], seed=int(snakemake.wildcards.seed),
             threads=snakemake.threads)
