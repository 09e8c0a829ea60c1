"""Stage 2 of DDL-CXR: a conditional latent diffusion model (``DDL_CXR_LDM`` of the original).

An ε-prediction UNet (diffusers ``UNet2DConditionModel``) denoises the latent z₁ of the later X-ray of a pair; its
input is the noisy z₁ channel-concatenated with z₀, the latent of the earlier X-ray, and it cross-attends to the
token sequence of an EHR Transformer over [t₀, t₁], trained jointly. The loss (original ``p_losses``):

    L = MSE(ε, ε̂(z₁ₜ, z₀, E)) + aux_weight · BCE(head(CLS), CheXpert labels of x₁)
        + (epoch / epochs) · mean_b[(1 − ᾱ_t) · mean(ReLU((ε − ε̂_E)² − (ε − ε̂_E′)² + margin))]

with E′ = 0.5·E + 0.5·N(0, I), a corrupted EHR context: the model must denoise better with the true EHR than with
a corrupted one. The variants ``condition_x0`` / ``condition_ehr`` False drop z₀ / the EHR (then one learned context
token stands in for the EHR and the auxiliary and contrastive terms have nothing to act on).

Latents enter the diffusion multiplied by ``latent_scale`` (LDM's ``scale_by_std``: 1 / the standard deviation of the
training z₁, so the data have the unit scale the noise schedule assumes; generation divides it out again). With
``clip_quantile``, DDIM clips each step's predicted z₁ to ± that quantile of the scaled training |z₁| (DDPM's
``clip_denoised`` with the latents' range for the images' [−1, 1]; off in the original's latent model)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ehrcxr.data.datasets import usable_cache_rows
from ehrcxr.data.pairs import window_bins
from ehrcxr.models.encoders import padding_mask, transformer_encoder
from ehrcxr.resources import CHEXPERT_LABELS
from ehrcxr.train.loop import autocast, configure_device, resolve_device, seed_everything, write_atomic

log = logging.getLogger("ehrcxr.ddl")

MODEL_KEYS = ("unet_channels", "layers_per_block", "head_channels", "norm_num_groups", "hidden", "heads",
              "ehr_layers", "dropout", "timesteps", "beta_start", "beta_end")
VARIANT_KEYS = ("condition_x0", "condition_ehr", "aux_weight", "contrastive_weight")
HISTORY_COLUMNS = ["epoch", "train_loss", "train_simple_loss", "train_aux_loss", "train_contrastive_loss",
                   "contrastive_ramp", "val_simple_loss_ema", "val_aux_loss_ema", "seconds"]


def sinusoidal_positions(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """(steps, dim) sine/cosine positional encoding of Vaswani et al."""
    position = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(steps, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding


class EHRContextEncoder(nn.Module):
    """DDL-CXR's EHR Transformer: input · √d embedding + sinusoidal positions, a learned CLS token, padding masks.
    Returns the step tokens (the cross-attention context), their keep-mask and the CLS summary."""

    def __init__(self, in_features: int, hidden: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(in_features, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.encoder = transformer_encoder(hidden, heads, layers, dropout, feedforward=2 * hidden)

    def forward(self, ehr: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.embed(ehr) * math.sqrt(self.hidden) + sinusoidal_positions(ehr.shape[1], self.hidden, ehr.device)
        tokens = torch.cat([self.cls.expand(ehr.shape[0], -1, -1), tokens], dim=1)
        padding = torch.cat([torch.zeros_like(lengths, dtype=torch.bool)[:, None],
                             padding_mask(lengths, ehr.shape[1])], dim=1)
        encoded = self.encoder(tokens, src_key_padding_mask=padding)
        return encoded[:, 1:], (~padding[:, 1:]).to(encoded.dtype), encoded[:, 0]


class ConditionalLatentDiffusion(nn.Module):
    """UNet2DConditionModel(noisy z₁ [⊕ z₀]) cross-attending to the EHR tokens, the EHR encoder with its CheXpert
    head, and the DDPM noise schedule (LDM's "linear" schedule: betas linear in √β, diffusers' scaled_linear)."""

    def __init__(self, latent_shape: tuple[int, int, int], ehr_features: int, *, unet_channels: list[int],
                 layers_per_block: int, head_channels: int, norm_num_groups: int, hidden: int, heads: int,
                 ehr_layers: int, dropout: float, timesteps: int, beta_start: float, beta_end: float,
                 condition_x0: bool = True, condition_ehr: bool = True, n_labels: int = len(CHEXPERT_LABELS),
                 latent_scale: float = 1.0, clip_range: float | None = None):
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.config = {"latent_shape": [int(v) for v in latent_shape], "ehr_features": int(ehr_features),
                       "unet_channels": [int(c) for c in unet_channels], "layers_per_block": int(layers_per_block),
                       "head_channels": int(head_channels), "norm_num_groups": int(norm_num_groups),
                       "hidden": int(hidden), "heads": int(heads), "ehr_layers": int(ehr_layers),
                       "dropout": float(dropout), "timesteps": int(timesteps), "beta_start": float(beta_start),
                       "beta_end": float(beta_end), "condition_x0": bool(condition_x0),
                       "condition_ehr": bool(condition_ehr), "n_labels": int(n_labels),
                       "latent_scale": float(latent_scale),
                       "clip_range": None if clip_range is None else float(clip_range)}
        self.latent_scale, self.clip_range = float(latent_scale), self.config["clip_range"]
        channels = int(latent_shape[0])
        levels = len(unet_channels)
        self.unet = UNet2DConditionModel(
            sample_size=int(latent_shape[1]), in_channels=channels * (2 if condition_x0 else 1), out_channels=channels,
            block_out_channels=tuple(unet_channels), down_block_types=("CrossAttnDownBlock2D",) * levels,
            up_block_types=("CrossAttnUpBlock2D",) * levels, layers_per_block=layers_per_block,
            cross_attention_dim=hidden, norm_num_groups=norm_num_groups,
            attention_head_dim=tuple(max(c // head_channels, 1) for c in unet_channels))  # diffusers: heads per level
        self.condition_x0, self.condition_ehr = bool(condition_x0), bool(condition_ehr)
        if condition_ehr:
            self.ehr_encoder = EHRContextEncoder(ehr_features, hidden, heads, ehr_layers, dropout)
            self.label_head = nn.Linear(hidden, n_labels)
        else:
            self.null_context = nn.Parameter(torch.zeros(1, 1, hidden))
        self.noise_schedule = DDPMScheduler(num_train_timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                                            beta_schedule="scaled_linear", prediction_type="epsilon")
        self.register_buffer("alphas_cumprod", self.noise_schedule.alphas_cumprod.clone().float(), persistent=False)

    def context(self, ehr: torch.Tensor, lengths: torch.Tensor):
        """(tokens, keep-mask, CLS or None): the cross-attention context of the EHR windows."""
        if self.condition_ehr:
            return self.ehr_encoder(ehr, lengths)
        tokens = self.null_context.expand(ehr.shape[0], -1, -1)
        return tokens, tokens.new_ones(tokens.shape[:2]), None

    def denoise(self, noisy: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """ε̂ of the noisy latents at steps ``t``, given z₀ (ignored without x0 conditioning) and the context."""
        sample = torch.cat([noisy, z0], dim=1) if self.condition_x0 else noisy
        return self.unet(sample, t, encoder_hidden_states=tokens, encoder_attention_mask=keep).sample

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(z_t | z_0): √ᾱ_t z + √(1 − ᾱ_t) ε."""
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(latents.dtype)
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def contrastive_term(noise: torch.Tensor, eps_true: torch.Tensor, eps_corrupt: torch.Tensor, margin: float,
                     step_weights: torch.Tensor) -> torch.Tensor:
    """mean_b[w_b · mean(ReLU((ε − ε̂_E)² − (ε − ε̂_E′)² + margin))], elementwise as the original's triplet loss:
    zero once the corrupted context's error exceeds the true context's by the margin everywhere."""
    positive = (noise - eps_true).pow(2)
    negative = (noise - eps_corrupt).pow(2)
    return (F.relu(positive - negative + margin).mean(dim=(1, 2, 3)) * step_weights).mean()


def diffusion_losses(model: ConditionalLatentDiffusion, z0: torch.Tensor, z1: torch.Tensor, ehr: torch.Tensor,
                     lengths: torch.Tensor, labels: torch.Tensor, *, aux_weight: float, contrastive_weight: float,
                     margin: float, ramp: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The loss terms of one batch of pairs (module docstring); ``ramp`` = epoch / epochs."""
    steps = model.alphas_cumprod.shape[0]
    z0, z1 = z0 * model.latent_scale, z1 * model.latent_scale
    t = torch.randint(0, steps, (z1.shape[0],), device=z1.device, generator=generator)
    noise = torch.randn(z1.shape, device=z1.device, generator=generator, dtype=z1.dtype)
    noisy = model.add_noise(z1, noise, t)
    tokens, keep, cls = model.context(ehr, lengths)
    eps = model.denoise(noisy, z0, t, tokens, keep).float()
    simple = F.mse_loss(eps, noise)
    zero = simple.new_zeros(())
    aux = contrastive = zero
    if cls is not None and aux_weight > 0:
        aux = F.binary_cross_entropy_with_logits(model.label_head(cls).float(), labels)
    if model.condition_ehr and contrastive_weight > 0 and ramp > 0:
        corrupt = 0.5 * tokens + 0.5 * torch.randn(tokens.shape, device=tokens.device, generator=generator,
                                                   dtype=tokens.dtype)
        eps_corrupt = model.denoise(noisy, z0, t, corrupt, keep).float()
        contrastive = contrastive_term(noise, eps, eps_corrupt, margin, 1.0 - model.alphas_cumprod[t])
    total = simple + aux_weight * aux + contrastive_weight * ramp * contrastive
    return {"loss": total, "simple_loss": simple, "aux_loss": aux, "contrastive_loss": contrastive}


@dataclass
class PairTensors:
    """Training examples of the diffusion model: z₀, z₁ (N, C, h, w), the EHR window (N, W, F) with its valid
    length (N,), and the CheXpert targets of x₁ (N, 14)."""

    z0: torch.Tensor
    z1: torch.Tensor
    ehr: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.z0.shape[0])

    def take(self, index: np.ndarray | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(index, dtype=torch.long)
        width = max(int(self.lengths[index].max()), 1) if index.numel() else 1
        return tuple(tensor[index].to(device, non_blocking=device.type == "cuda") for tensor in
                     (self.z0, self.z1, self.ehr[:, :width], self.lengths, self.labels))


def context_windows(ehr: np.ndarray, stay_rows: np.ndarray, first: np.ndarray, stop: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The EHR hours [first, stop) of each row's stay (``stay_rows`` into ``ehr`` (stays, hours, F)), left-aligned
    and zero-padded to the longest window: (N, W, F) float32 and the lengths (N,) (at least 1: an empty window
    keeps the hour before ``stop``)."""
    first = np.minimum(first, np.maximum(stop - 1, 0))
    lengths = np.maximum(stop - first, 1)
    width = int(lengths.max()) if lengths.size else 1
    hours = first[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < lengths[:, None]
    windows = ehr[stay_rows[:, None], np.minimum(hours, ehr.shape[1] - 1)] * valid[..., None]
    return windows.astype(np.float32), lengths.astype(np.int64)


def pair_tensors(pairs: pd.DataFrame, latents: np.ndarray, latent_row: pd.Series, ehr: np.ndarray,
                 stay_row: pd.Series, ehr_length: np.ndarray) -> PairTensors:
    """Assemble :class:`PairTensors` of ``pairs`` (rows of pairs.parquet): latents by dicom_id (``latent_row``:
    dicom_id -> cache row), EHR windows [t₀, t₁] of each stay (``stay_row``: stay_id -> tensor row), x₁'s CheXpert
    targets (1 -> 1; 0, -1 and blank -> 0, as the CXR pretraining)."""
    rows0 = latent_row.reindex(pairs["x0_dicom_id"].astype(str)).to_numpy()
    rows1 = latent_row.reindex(pairs["x1_dicom_id"].astype(str)).to_numpy()
    stays = stay_row.reindex(pairs["stay_id"]).to_numpy()
    usable = ~(np.isnan(rows0) | np.isnan(rows1) | np.isnan(stays))
    pairs = pairs[usable]
    rows0, rows1, stays = rows0[usable].astype(np.int64), rows1[usable].astype(np.int64), stays[usable].astype(np.int64)
    first, stop = window_bins(pairs["x0_hours"].to_numpy(), pairs["x1_hours"].to_numpy(), ehr_length[stays])
    windows, lengths = context_windows(ehr, stays, first, stop)
    targets = (pairs[[f"x1_{label}" for label in CHEXPERT_LABELS]].apply(pd.to_numeric, errors="coerce") == 1)
    return PairTensors(torch.from_numpy(latents[rows0]), torch.from_numpy(latents[rows1]), torch.from_numpy(windows),
                       torch.from_numpy(lengths), torch.from_numpy(targets.to_numpy(np.float32)))


def _val_losses(model: nn.Module, data: PairTensors, batch_size: int, device: torch.device, seed: int,
                aux_weight: float) -> tuple[float, float]:
    """(simple loss, auxiliary BCE) of the EMA weights on the validation pairs, with fixed steps and noise."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    simple_total = aux_total = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            z0, z1, ehr, lengths, labels = data.take(np.arange(start, min(start + batch_size, len(data))), device)
            losses = diffusion_losses(model, z0, z1, ehr, lengths, labels, aux_weight=aux_weight,
                                      contrastive_weight=0.0, margin=0.0, ramp=0.0, generator=generator)
            simple_total += float(losses["simple_loss"]) * z0.shape[0]
            aux_total += float(losses["aux_loss"]) * z0.shape[0]
    n = max(len(data), 1)
    return (simple_total / n, aux_total / n) if len(data) else (float("nan"), float("nan"))


def train_diffusion(model: ConditionalLatentDiffusion, train: PairTensors, val: PairTensors, params: dict, *,
                    seed: int, device: torch.device) -> tuple[dict, pd.DataFrame]:
    """AdamW + EMA weights (``torch.optim.swa_utils``); keeps the EMA weights of the epoch with the lowest validation
    simple loss (the original's ``val/simple_loss_ema``). Returns (their state dict, history)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    seed_everything(seed)
    model.to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(params["ema_decay"]), use_buffers=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    generator = torch.Generator(device=device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    epochs, batch_size = int(params["epochs"]), int(params["batch_size"])
    history, best = [], (math.inf, None)
    for epoch in range(epochs):
        started = time.perf_counter()
        ramp = epoch / epochs
        model.train()
        order = torch.randperm(len(train), generator=order_generator)
        sums = dict.fromkeys(("loss", "simple_loss", "aux_loss", "contrastive_loss"), 0.0)
        for start in range(0, len(train), batch_size):
            z0, z1, ehr, lengths, labels = train.take(order[start:start + batch_size], device)
            with autocast(device):
                losses = diffusion_losses(model, z0, z1, ehr, lengths, labels, aux_weight=params["aux_weight"],
                                          contrastive_weight=params["contrastive_weight"], margin=params["margin"],
                                          ramp=ramp, generator=generator)
            optimiser.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimiser.step()
            ema.update_parameters(model)
            for key in sums:
                sums[key] += float(losses[key].detach()) * z0.shape[0]
        val_simple, val_aux = _val_losses(ema.module, val, max(batch_size, 256), device, seed + 1, params["aux_weight"])
        row = {"epoch": epoch + 1, **{f"train_{key}": value / max(len(train), 1) for key, value in sums.items()},
               "contrastive_ramp": ramp, "val_simple_loss_ema": val_simple, "val_aux_loss_ema": val_aux,
               "seconds": time.perf_counter() - started}
        history.append(row)
        log.info("diffusion epoch %d: train loss %.4f (simple %.4f, aux %.4f, contrastive %.4f x %.2f), "
                 "val simple (EMA) %.4f (%.1f s, %.0f pairs/s)", epoch + 1, row["train_loss"],
                 row["train_simple_loss"], row["train_aux_loss"], row["train_contrastive_loss"], ramp, val_simple,
                 row["seconds"], len(train) / max(row["seconds"], 1e-9))
        score = val_simple if math.isfinite(val_simple) else math.inf
        if best[1] is None or score < best[0]:
            best = (score, {key: value.detach().cpu().clone() for key, value in ema.module.state_dict().items()})
    return best[1], pd.DataFrame(history, columns=HISTORY_COLUMNS)


def load_diffusion(path: str | Path, device: torch.device | str = "cpu") -> ConditionalLatentDiffusion:
    """The EMA diffusion model saved by :func:`run_diffusion`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(saved["config"])
    model = ConditionalLatentDiffusion(tuple(config.pop("latent_shape")), config.pop("ehr_features"), **config)
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


def read_tensor(path: str | Path) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """(values ⊕ mask (stays, hours, F), lengths, stay_id -> row) of an EHR tensor: the model input layout."""
    from ehrcxr.data.ehr import load_ehr_tensor

    tensor = load_ehr_tensor(path)
    for name in ("values", "mask", "length", "stay_id"):
        if name not in tensor.variables:
            raise ValueError(f"{path}: missing variable {name!r}")
    ehr = np.concatenate([np.asarray(tensor["values"].values, dtype=np.float32), np.asarray(tensor["mask"].values, dtype=np.float32)], axis=2)
    stay_ids = np.asarray(tensor["stay_id"].values, dtype=np.int64)
    return ehr, np.asarray(tensor["length"].values, dtype=np.int64), pd.Series(np.arange(stay_ids.size), index=stay_ids)


def run_diffusion(pairs_path: str | Path, latents_path: str | Path, index_path: str | Path, ehr_path: str | Path,
                  out_model: str | Path, out_history: str | Path, params: dict, variant: dict, *, seed: int,
                  device: str = "auto", threads: int = 1) -> dict:
    """Train one diffusion variant (config ``ddl_cxr.diffusion`` + ``ddl_cxr.generators[name]``) on the train-split
    pairs, select on the val-split pairs, and save the EMA weights with their config."""
    absent = sorted({*MODEL_KEYS, "epochs", "batch_size", "lr", "weight_decay", "ema_decay", "margin", "scale_by_std",
                     "clip_quantile", *VARIANT_KEYS} - set(params) - set(variant))
    if absent:
        raise KeyError(f"ddl_cxr.diffusion lacks {absent}")
    settings = {**params, **variant}
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    latents = np.load(latents_path)
    ehr, lengths, stay_row = read_tensor(ehr_path)
    rows = usable_cache_rows(pd.read_parquet(index_path, columns=["dicom_id", "row", "status"]), index_path)
    pairs = pd.read_parquet(pairs_path)
    data = {split: pair_tensors(pairs[pairs["split"] == split], latents, rows, ehr, stay_row, lengths)
            for split in ("train", "val")}
    if len(data["train"]) == 0:
        raise ValueError(f"{pairs_path}: no train-split pair has both X-rays in the cache and an EHR row")
    log.info("diffusion (%s) on %d train / %d val pairs (%s), latent %s, EHR windows of up to %d hours",
             ", ".join(f"{key}={settings[key]}" for key in VARIANT_KEYS), len(data["train"]), len(data["val"]),
             resolved, tuple(latents.shape[1:]), data["train"].ehr.shape[1])
    seed_everything(seed)
    latent_scale = 1.0 / float(data["train"].z1.std()) if settings["scale_by_std"] else 1.0
    clip_range = (None if settings["clip_quantile"] is None else
                  float(np.quantile(np.abs(data["train"].z1.numpy()) * latent_scale, float(settings["clip_quantile"]))))
    model = ConditionalLatentDiffusion(latents.shape[1:], ehr.shape[2], condition_x0=settings["condition_x0"],
                                       condition_ehr=settings["condition_ehr"], latent_scale=latent_scale,
                                       clip_range=clip_range,
                                       **{key: settings[key] for key in MODEL_KEYS})
    state, history = train_diffusion(model, data["train"], data["val"], settings, seed=seed, device=resolved)
    Path(out_model).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(out_model), lambda path: torch.save({"config": model.config, "state_dict": state}, path))
    write_atomic(Path(out_history), lambda path: history.to_csv(path, index=False))
    return {"epochs": len(history), "best_val_simple_loss": float(history["val_simple_loss_ema"].min())}
