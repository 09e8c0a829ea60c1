"""Stage 3 of DDL-CXR: the X-ray latent at prediction time of every stay with a paired X-ray, sampled once with DDIM
from the diffusion model's EMA weights (original ``LDM_generate_z1.yaml``) and cached in one ``.npz``.

Conditioning of a stay whose last X-ray x₀ is ``age`` hours old at the end of its EHR window (hour ``end``): z₀ and
the EHR of [end − age, end] when age ≥ ``min_context_hours``, else of [end − min_context_hours, end] (the original:
[48 − cha, 48] if cha ≥ 12, otherwise [36, 48]). The "copy x0" generator writes z₀ itself (no diffusion)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ehrcxr.data.datasets import cxr_cache_rows
from ehrcxr.data.pairs import window_bins
from ehrcxr.ddl.diffusion import ConditionalLatentDiffusion, context_windows, load_diffusion, read_tensor
from ehrcxr.train.loop import autocast, configure_device, resolve_device, seed_everything, write_atomic

log = logging.getLogger("ehrcxr.ddl")

def ddim_scheduler(model: ConditionalLatentDiffusion, steps: int):
    """diffusers DDIMScheduler on the model's training betas, spaced as LDM's 'uniform' DDIM discretisation
    (every T/steps-th step, offset 1; ᾱ_prev of the last step = ᾱ_0), ε-prediction; the predicted z₁ clipped to
    ± the model's ``clip_range`` when it has one."""
    from diffusers import DDIMScheduler

    config = model.config
    scheduler = DDIMScheduler(num_train_timesteps=config["timesteps"], beta_start=config["beta_start"],
                              beta_end=config["beta_end"], beta_schedule="scaled_linear",
                              clip_sample=model.clip_range is not None, clip_sample_range=model.clip_range or 1.0,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def ddim_generate(model: ConditionalLatentDiffusion, z0: torch.Tensor, ehr: torch.Tensor, lengths: torch.Tensor, *,
                  steps: int, eta: float, seed: int, batch_size: int, device: torch.device) -> np.ndarray:
    """DDIM samples (N, C, h, w) float32 of z₁ given z₀ and the EHR windows. One fixed x_T (drawn from ``seed``)
    starts every sample, and the η-noise comes from a generator seeded once, so a rerun is identical. The EHR
    context is encoded once per batch, not once per step. The sampler runs in the model's scaled latent space
    (``latent_scale``); the samples come back in the autoencoder's."""
    model.eval().to(device)
    shape = tuple(model.config["latent_shape"])
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    out = np.empty((z0.shape[0], *shape), dtype=np.float32)
    for start in range(0, z0.shape[0], batch_size):
        chosen = slice(start, min(start + batch_size, z0.shape[0]))
        width = max(int(lengths[chosen].max()), 1)
        batch_z0 = z0[chosen].to(device) * model.latent_scale
        batch_lengths = lengths[chosen].to(device)
        scheduler = ddim_scheduler(model, steps)
        with autocast(device):
            tokens, keep, _ = model.context(ehr[chosen, :width].to(device), batch_lengths)
            sample = x_t.expand(batch_z0.shape[0], *shape).clone()
            for t in scheduler.timesteps:
                step = torch.full((sample.shape[0],), int(t), device=device, dtype=torch.long)
                eps = model.denoise(sample, batch_z0, step, tokens, keep).float()
                sample = scheduler.step(eps, t, sample.float(), eta=eta, generator=generator).prev_sample
        out[chosen] = (sample.float() / model.latent_scale).cpu().numpy()
    return out


def prediction_inputs(stays: pd.DataFrame, index: pd.DataFrame, stay_row: pd.Series, ehr_length: np.ndarray
                      ) -> pd.DataFrame:
    """Stays with a usable paired X-ray (the cohort's ``cxr_dicom_id``, as every model of the grid sees it) and an
    EHR row: stay_id, latent row, tensor row, the end of its EHR window and the X-ray's age there."""
    rows = cxr_cache_rows(stays, index)
    tensor_rows = stay_row.reindex(stays["stay_id"].to_numpy()).to_numpy()
    keep = (rows >= 0) & ~np.isnan(tensor_rows) & stays["cxr_hours"].notna().to_numpy()
    tensor_rows = tensor_rows[keep].astype(np.int64)
    end = ehr_length[tensor_rows].astype(np.float64)
    age = np.maximum(end - stays["cxr_hours"].to_numpy(np.float64)[keep], 0.0)
    return pd.DataFrame({"stay_id": stays["stay_id"].to_numpy(np.int64)[keep], "latent_row": rows[keep],
                         "tensor_row": tensor_rows, "end_hour": end, "x0_age_hours": age})


def run_generation(generator_name: str, diffusion_path: str | Path | None, latents_path: str | Path,
                   stays_path: str | Path, index_path: str | Path, ehr_path: str | Path, out_path: str | Path,
                   params: dict, *, seed: int, device: str = "auto", threads: int = 1) -> int:
    """Write ``generated.npz`` (stay_id (N,), latents (N, C, h, w), x0_age_hours (N,)) for every stay of
    :func:`prediction_inputs`, sampled by the generator's diffusion model (without one, "copy x0": z₀ as it is). ``params``: config
    ``ddl_cxr.generation`` (steps, eta, batch_size, min_context_hours)."""
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    seed_everything(seed)
    started = time.perf_counter()
    latents = np.load(latents_path, mmap_mode="r")
    ehr, lengths, stay_row = read_tensor(ehr_path)
    index = pd.read_parquet(index_path, columns=["dicom_id", "row", "status"])
    stays = pd.read_parquet(stays_path, columns=["stay_id", "cxr_dicom_id", "cxr_hours"])
    inputs = prediction_inputs(stays, index, stay_row, lengths)
    z0 = np.asarray(latents[inputs["latent_row"].to_numpy()], dtype=np.float32)
    if diffusion_path is None:  # "copy x0": the last real latent, no diffusion
        generated = z0
    else:
        model = load_diffusion(diffusion_path, resolved)
        end, age = inputs["end_hour"].to_numpy(), inputs["x0_age_hours"].to_numpy()
        start = end - np.maximum(age, float(params["min_context_hours"]))
        first, stop = window_bins(start, end - 1e-9, lengths[inputs["tensor_row"].to_numpy()])
        windows, window_lengths = context_windows(ehr, inputs["tensor_row"].to_numpy(), first, stop)
        generated = ddim_generate(model, torch.from_numpy(z0), torch.from_numpy(windows),
                                  torch.from_numpy(window_lengths), steps=int(params["steps"]),
                                  eta=float(params["eta"]), seed=seed, batch_size=int(params["batch_size"]),
                                  device=resolved)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, stay_id=inputs["stay_id"].to_numpy(np.int64), latents=generated.astype(np.float32),
                     x0_age_hours=inputs["x0_age_hours"].to_numpy(np.float32))

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_path), save)
    seconds = time.perf_counter() - started
    log.info("generator %s: %d latents %s in %.1f s (%.1f latents/s)", generator_name, len(inputs),
             tuple(generated.shape[1:]), seconds, len(inputs) / max(seconds, 1e-9))
    return len(inputs)


def load_generated(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``generated.npz``, checked for consistent lengths."""
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in ("stay_id", "latents", "x0_age_hours")}
    if not len({array.shape[0] for array in arrays.values()}) == 1:
        raise ValueError(f"{path}: stay_id, latents and x0_age_hours differ in length")
    return arrays
