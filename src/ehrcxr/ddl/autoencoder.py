"""Stage 1 of DDL-CXR: a KL-regularised autoencoder (diffusers ``AutoencoderKL``) with a CheXpert head on its sampled
latent (``AutoencoderKLLabel`` of the original), trained on the train-split subjects' cached frontal images, and one
encoding pass that caches the latent of every cached image."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ehrcxr.data.cxr import load_cxr_cache
from ehrcxr.data.datasets import standardise
from ehrcxr.resources import CHEXPERT_LABELS
from ehrcxr.train.loop import autocast, configure_device, resolve_device, seed_everything, write_atomic

log = logging.getLogger("ehrcxr.ddl")

AUTOENCODER_KEYS = ("image_size", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
HISTORY_COLUMNS = ["epoch", "train_loss", "train_rec_loss", "train_label_loss", "label_weight", "val_rec_loss",
                   "val_label_loss", "seconds"]


class LabelledAutoencoder(nn.Module):
    """AutoencoderKL (1-channel images, no attention) + Linear(latent size -> 14) on the sampled latent.

    A log-variance ``logvar`` (initialised at 0) scales the L1 reconstruction term as in the original's
    ``LPIPSWithDiscriminator``: nll = |x - x̂| / exp(logvar) + logvar.
    """

    def __init__(self, image_size: int, block_out_channels: list[int], layers_per_block: int = 1,
                 latent_channels: int = 4, norm_num_groups: int = 8, n_labels: int = len(CHEXPERT_LABELS)):
        super().__init__()
        from diffusers import AutoencoderKL

        levels = len(block_out_channels)
        factor = 2 ** (levels - 1)
        if image_size % factor:
            raise ValueError(f"autoencoder image_size {image_size} is not divisible by its downsampling {factor}")
        self.config = {"image_size": int(image_size), "block_out_channels": [int(c) for c in block_out_channels],
                       "layers_per_block": int(layers_per_block), "latent_channels": int(latent_channels),
                       "norm_num_groups": int(norm_num_groups)}
        self.vae = AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=image_size, mid_block_add_attention=False)
        self.latent_shape = (int(latent_channels), image_size // factor, image_size // factor)
        self.label_head = nn.Linear(math.prod(self.latent_shape), n_labels)
        self.logvar = nn.Parameter(torch.zeros(()))

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images (B, 1, S, S) -> standardised model input at the autoencoder's image size."""
        images = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        size = self.config["image_size"]
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return standardise(images)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction, posterior, sampled z, label logits) of standardised ``images``."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator=generator)
        reconstruction = self.vae.decode(z).sample
        return reconstruction, posterior, z, self.label_head(z.flatten(1))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean (B, C, h, w) of standardised images: the cached latent."""
        return self.vae.encode(images).latent_dist.mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised images decoded from latents."""
        return self.vae.decode(latents).sample


def adaptive_label_weight(nll: torch.Tensor, label_loss: torch.Tensor, layer: torch.Tensor,
                          max_weight: float = 1e4) -> torch.Tensor:
    """‖∇ nll‖ / (‖∇ label_loss‖ + 1e-4) at ``layer`` (the encoder's conv_out weight), clamped to [0, max_weight]
    and detached: the label term then moves the encoder as much as the reconstruction does."""
    nll_grad = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    label_grad = torch.autograd.grad(label_loss, layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (label_grad.norm() + 1e-4), 0.0, max_weight).detach()


def autoencoder_losses(model: LabelledAutoencoder, images: torch.Tensor, targets: torch.Tensor, *,
                       kl_weight: float, max_label_weight: float, generator: torch.Generator | None = None,
                       adaptive: bool = True) -> dict[str, torch.Tensor]:
    """The original's generator loss: nll (L1 summed per image, mean over the batch) + kl_weight · KL + w · label
    BCE, with w from :func:`adaptive_label_weight` (``adaptive`` False -> w = 1, as at validation)."""
    reconstruction, posterior, _, logits = model(images, generator)
    rec = (images - reconstruction).abs()
    nll = (rec / torch.exp(model.logvar) + model.logvar).sum() / images.shape[0]
    kl = posterior.kl().sum() / images.shape[0]
    label_loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
    weight = (adaptive_label_weight(nll, label_loss, model.vae.encoder.conv_out.weight, max_label_weight)
              if adaptive else torch.ones((), device=images.device))
    return {"loss": nll + kl_weight * kl + weight * label_loss, "nll": nll, "kl": kl,
            "rec_loss": rec.mean(), "label_loss": label_loss, "label_weight": weight}


def _pixels(images: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Cached uint8 images of ``rows`` as (B, 1, S, S) on ``device`` (read from the memory map in row order)."""
    order = np.argsort(rows, kind="stable")
    pixels = np.empty((rows.size, *images.shape[1:]), dtype=np.uint8)
    pixels[order] = images[rows[order]]
    return torch.from_numpy(pixels).unsqueeze(1).to(device, non_blocking=device.type == "cuda")


def _validate(model: LabelledAutoencoder, images: np.ndarray, rows: np.ndarray, targets: np.ndarray,
              batch_size: int, device: torch.device) -> tuple[float, float]:
    """(mean absolute reconstruction error, label BCE) of the posterior means of the validation images."""
    model.eval()
    rec_total, label_total = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            chosen = slice(start, start + batch_size)
            batch = model.prepare(_pixels(images, rows[chosen], device))
            latents = model.encode(batch)
            rec_total += float((model.decode(latents) - batch).abs().mean()) * batch.shape[0]
            logits = model.label_head(latents.flatten(1)).float()
            label_total += float(F.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(targets[chosen]).to(device), reduction="sum")) / targets.shape[1]
    n = max(rows.size, 1)
    return rec_total / n, label_total / n


def train_autoencoder(images: np.ndarray, table: pd.DataFrame, params: dict, *, seed: int,
                      device: torch.device) -> tuple[LabelledAutoencoder, pd.DataFrame]:
    """Train the autoencoder on the 'train' rows of ``table`` (dicom_id, row, split, 14 CheXpert targets, as
    :func:`ehrcxr.train.pretrain.chexpert_image_labels`) and keep the epoch with the lowest validation
    reconstruction error (the original's ``val/rec_loss``). Returns the model at that epoch and the history."""
    seed_everything(seed)
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if train.empty:
        raise ValueError("no usable frontal images of train-split subjects to train the DDL-CXR autoencoder on")
    train_rows, val_rows = train["row"].to_numpy(np.int64), val["row"].to_numpy(np.int64)
    train_targets = train[CHEXPERT_LABELS].to_numpy(np.float32)
    val_targets = val[CHEXPERT_LABELS].to_numpy(np.float32)
    model = LabelledAutoencoder(**{key: params[key] for key in AUTOENCODER_KEYS}).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=params["lr"], betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(seed)
    sample_generator = torch.Generator(device=device).manual_seed(seed)
    batch_size = int(params["batch_size"])
    history, best = [], (math.inf, None)
    for epoch in range(1, int(params["epochs"]) + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(train_rows.size, generator=generator).numpy()
        sums = {"loss": 0.0, "rec_loss": 0.0, "label_loss": 0.0, "label_weight": 0.0}
        for start in range(0, order.size, batch_size):
            chosen = order[start:start + batch_size]
            batch = model.prepare(_pixels(images, train_rows[chosen], device))
            targets = torch.from_numpy(train_targets[chosen]).to(device)
            with autocast(device):
                losses = autoencoder_losses(model, batch, targets, kl_weight=params["kl_weight"],
                                            max_label_weight=params["max_label_weight"],
                                            generator=sample_generator)
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimiser.step()
            for key in sums:
                sums[key] += float(losses[key].detach()) * chosen.size
        val_rec, val_label = _validate(model, images, val_rows, val_targets, max(batch_size, 256), device)
        row = {"epoch": epoch, **{f"train_{key}" if key != "label_weight" else key: value / order.size
                                  for key, value in sums.items()},
               "val_rec_loss": val_rec, "val_label_loss": val_label, "seconds": time.perf_counter() - started}
        history.append(row)
        log.info("autoencoder epoch %d: train loss %.4f (rec %.4f, label %.4f, label weight %.3g), "
                       "val rec %.4f, val label %.4f (%.1f s)", epoch, row["train_loss"], row["train_rec_loss"],
                       row["train_label_loss"], row["label_weight"], val_rec, val_label, row["seconds"])
        score = val_rec if math.isfinite(val_rec) else math.inf
        if best[1] is None or score < best[0]:
            best = (score, {key: value.detach().cpu().clone() for key, value in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model, pd.DataFrame(history, columns=HISTORY_COLUMNS)


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> LabelledAutoencoder:
    """The autoencoder saved by :func:`run_autoencoder` (its config travels with its weights)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LabelledAutoencoder(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


def run_autoencoder(cxr_studies_path: str | Path, stays_path: str | Path, images_path: str | Path,
                    index_path: str | Path, out_model: str | Path, out_history: str | Path, params: dict, *,
                    seed: int, device: str = "auto", threads: int = 1) -> dict:
    """Train the autoencoder (config ``ddl_cxr.autoencoder``) and save its weights with its config."""
    from ehrcxr.train.pretrain import chexpert_image_labels

    absent = sorted({*AUTOENCODER_KEYS, "epochs", "batch_size", "lr", "kl_weight", "max_label_weight"} - set(params))
    if absent:
        raise KeyError(f"ddl_cxr.autoencoder lacks {absent}")
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    images, index = load_cxr_cache(images_path, index_path)
    stays = pd.read_parquet(stays_path, columns=["subject_id", "split"])
    table = chexpert_image_labels(pd.read_parquet(cxr_studies_path), stays, index, source=str(cxr_studies_path))
    log.info("autoencoder on %d train / %d val images (%s), %d px -> latent %s", (table["split"] == "train").sum(),
             (table["split"] == "val").sum(), resolved, params["image_size"],
             "x".join(map(str, (params["latent_channels"],) + (params["image_size"] //
                                                               2 ** (len(params["block_out_channels"]) - 1),) * 2)))
    model, history = train_autoencoder(images, table, params, seed=seed, device=resolved)
    Path(out_model).parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.cpu() for key, value in model.state_dict().items()}
    write_atomic(Path(out_model), lambda path: torch.save({"config": model.config, "state_dict": state}, path))
    write_atomic(Path(out_history), lambda path: history.to_csv(path, index=False))
    best = history.loc[history["val_rec_loss"].idxmin()] if history["val_rec_loss"].notna().any() else history.iloc[-1]
    return {"best_epoch": int(best["epoch"]), "val_rec_loss": float(best["val_rec_loss"])}


def encode_cache(model: LabelledAutoencoder, images: np.ndarray, device: torch.device,
                 batch_size: int = 256) -> np.ndarray:
    """Posterior means (N, C, h, w) float32 of every cached image, in cache-row order."""
    latents = np.empty((images.shape[0], *model.latent_shape), dtype=np.float32)
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        rows = np.arange(start, min(start + batch_size, images.shape[0]))
        with torch.no_grad(), autocast(device):
            latents[rows] = model.encode(model.prepare(_pixels(images, rows, device))).float().cpu().numpy()
    return latents


def run_latents(model_path: str | Path, images_path: str | Path, out_latents: str | Path, *, device: str = "auto",
                threads: int = 1) -> int:
    """Write the latent of every cached image as one (N, C, h, w) float32 ``.npy`` (row i = cache row i)."""
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    started = time.perf_counter()
    model = load_autoencoder(model_path, resolved)
    images = np.load(images_path, mmap_mode="r")
    latents = encode_cache(model, images, resolved)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, latents)

    Path(out_latents).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_latents), save)
    seconds = time.perf_counter() - started
    log.info("latents %s of %d cached images in %.1f s (%.0f images/s)", latents.shape[1:], latents.shape[0],
             seconds, latents.shape[0] / max(seconds, 1e-9))
    return int(latents.shape[0])
