"""Snakemake adapter: DDL-CXR's generation quality on the test pairs (tables/ddl_generation_quality.*)."""
from pathlib import Path

from ehrcxr.ddl.quality import run_quality
from ehrcxr.logs import log_to

log_to(snakemake.log[0])
params, inputs = snakemake.params, snakemake.input
table = next(path for path in snakemake.output if path.endswith(".csv"))
figure = next((path for path in snakemake.output if path.endswith(".png")), None)
run_quality(inputs.pairs, inputs.latents, inputs.index, inputs.images, inputs.ehr, inputs.autoencoder,
            inputs.cxr_encoder, {name: inputs.get(f"diffusion_{name}") if diffused else None
                                 for name, diffused in params.generators.items()},
            Path(table).with_suffix(""), Path(figure).with_suffix("") if figure else None, depth=int(params.depth),
            generation=params.generation, n_boot=params.evaluate["n_bootstrap"], ci=params.evaluate["ci"],
            seed=int(params.seed), examples=int(params.examples), device=params.device, threads=snakemake.threads)
