"""Snakemake adapter: pooled features of every cached image under the pretrained CXR encoder of a seed and depth."""
from ehrcxr.logs import log_to
from ehrcxr.train.pretrain import cxr_features

log_to(snakemake.log[0])
cxr_features(snakemake.input.encoder, snakemake.input.images, snakemake.output.features,
             depth=int(snakemake.wildcards.depth), device=snakemake.params.device, threads=snakemake.threads)
