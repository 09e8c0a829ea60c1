"""Snakemake adapter: pretrain the CXR encoder of one seed and ResNet depth on the CheXpert labels."""
from ehrcxr.logs import log_to
from ehrcxr.train.pretrain import pretrain_cxr

log_to(snakemake.log[0])
pretrain = snakemake.params.pretrain
pretrain_cxr(snakemake.input.cxr_studies, snakemake.input.stays, snakemake.input.images, snakemake.input.index,
             snakemake.output.encoder, snakemake.output.history, depth=int(snakemake.wildcards.depth),
             weights=snakemake.params.weights, epochs=pretrain["epochs"], batch_size=pretrain["batch_size"],
             lr=pretrain["lr"], weight_decay=pretrain["weight_decay"], seed=int(snakemake.wildcards.seed),
             device=snakemake.params.device, threads=snakemake.threads)
