"""Snakemake adapter: pretrain the CXR encoder on CheXpert labels of train-split subjects."""
from ehrcxr.logs import log_to
from ehrcxr.train.pretrain import pretrain_cxr

log_to(snakemake.log[0])
cxr, pretrain = snakemake.params.cxr, snakemake.params.pretrain
pretrain_cxr(snakemake.input.cxr_studies, snakemake.input.stays, snakemake.input.images, snakemake.input.index,
             snakemake.output.encoder, snakemake.output.history, depth=cxr["depth"], weights=cxr["weights"],
             epochs=pretrain["epochs"], batch_size=pretrain["batch_size"], lr=pretrain["lr"],
             weight_decay=pretrain["weight_decay"], seed=snakemake.params.seed, device=snakemake.params.device,
             threads=snakemake.threads)
