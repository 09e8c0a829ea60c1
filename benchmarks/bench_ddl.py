"""Throughput of DDL-CXR's stages on this machine: autoencoder training and encoding (images/s), diffusion training
(pairs/s, with and without the contrastive term's second UNet pass) and DDIM generation (latents/s), at the demo's
sizes (config/config.yaml) and, for a few batches, the paper's (config/mimic.yaml). Random inputs of the right
shapes; the timings do not depend on the values.

    PYTHONPATH=src python benchmarks/bench_ddl.py [--threads 1] [--paper]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ehrcxr.ddl.autoencoder import AUTOENCODER_KEYS, LabelledAutoencoder, autoencoder_losses
from ehrcxr.ddl.diffusion import MODEL_KEYS, ConditionalLatentDiffusion, diffusion_losses
from ehrcxr.ddl.generation import ddim_generate

REPO = Path(__file__).resolve().parents[1]
EHR_FEATURES, EHR_HOURS = 76, 24


def timed(function, repeats: int) -> float:
    """Seconds per call (after one warm-up call)."""
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def bench(config: dict, image_size: int, batch: int, repeats: int, steps: int) -> dict[str, float]:
    autoencoder_params, diffusion_params = config["autoencoder"], config["diffusion"]
    torch.manual_seed(0)
    autoencoder = LabelledAutoencoder(**{key: autoencoder_params[key] for key in AUTOENCODER_KEYS})
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=1e-4, betas=(0.5, 0.9))
    pixels = torch.randint(0, 256, (batch, 1, image_size, image_size), dtype=torch.uint8)
    targets = torch.randint(0, 2, (batch, 14)).float()

    def autoencoder_step():
        losses = autoencoder_losses(autoencoder, autoencoder.prepare(pixels), targets, kl_weight=1e-6,
                                    max_label_weight=1e4)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()

    results = {"autoencoder train images/s": batch / timed(autoencoder_step, repeats)}
    results["autoencoder encode images/s"] = batch / timed(lambda: autoencoder.encode(autoencoder.prepare(pixels)),
                                                           repeats)
    shape = autoencoder.latent_shape
    model = ConditionalLatentDiffusion(shape, EHR_FEATURES, **{key: diffusion_params[key] for key in MODEL_KEYS})
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    z0, z1 = torch.randn(batch, *shape), torch.randn(batch, *shape)
    ehr, lengths = torch.randn(batch, EHR_HOURS, EHR_FEATURES), torch.full((batch,), EHR_HOURS)
    labels = torch.zeros(batch, 14)

    def diffusion_step(ramp: float):
        losses = diffusion_losses(model, z0, z1, ehr, lengths, labels, aux_weight=1.4, contrastive_weight=1.0,
                                  margin=0.2, ramp=ramp)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()

    results["diffusion train pairs/s (no contrastive pass)"] = batch / timed(lambda: diffusion_step(0.0), repeats)
    results["diffusion train pairs/s (with contrastive pass)"] = batch / timed(lambda: diffusion_step(0.5), repeats)
    seconds = timed(lambda: ddim_generate(model, z0, ehr, lengths, steps=steps, eta=1.0, seed=0, batch_size=batch,
                                          device=torch.device("cpu")), max(1, repeats // 2))
    results[f"generation latents/s (DDIM {steps} steps)"] = batch / seconds
    results["generation UNet evaluations/s"] = batch * steps / seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paper", action="store_true", help="also the paper's sizes (slow on CPU: 2 batches of 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cache = demo["cxr"]["image_size"]
    print(f"demo sizes ({args.threads} thread(s), batch 64, cache {cache} px):")
    for name, value in bench(demo["ddl_cxr"], cache, 64, 5, demo["ddl_cxr"]["generation"]["steps"]).items():
        print(f"  {name:52s} {value:10.1f}")
    if args.paper:
        paper = yaml.safe_load((REPO / "config" / "mimic.yaml").read_text())
        print(f"paper sizes ({args.threads} thread(s), batch 4, 224 px):")
        for name, value in bench(paper["ddl_cxr"], 224, 4, 2, 5).items():
            print(f"  {name:52s} {value:10.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
