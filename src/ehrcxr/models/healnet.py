"""HEALNet: a Perceiver-style latent array that cross-attends to each modality's raw inputs in turn.

Hemker, Simidjievski & Jamnik, "HEALNet: Multimodal Fusion for Heterogeneous Biomedical Data", NeurIPS 2024. Public
code: konst-int-i/healnet ``healnet/models/healnet.py`` (``HealNet``, ``Attention``, ``FeedForward``,
``fourier_encode``), copied unchanged by CareBench (jakeykj/CareBench ``models/healnet/healnet_components.py``,
``healnet_lightning.py``, ``configs/healnet.yaml``, ``configs/train_configs/healnet_{phenotype,mortality}.yaml``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, padding_mask
from ehrcxr.models.registry import register

ATTENTION_TEMPERATURE = 0.5  # HEALNet's Attention: softmax(q·k / sqrt(dim_head) / 0.5)
FEEDFORWARD_MULT = 4  # HEALNet's FeedForward(mult=4)


def fourier_channels(axes: int, num_freq_bands: int) -> int:
    """Channels the Fourier encoding adds for ``axes`` position axes: per axis a sin and a cos per band, and p."""
    return axes * (2 * num_freq_bands + 1)


def fourier_encode(positions: torch.Tensor, max_freq: float, num_freq_bands: int) -> torch.Tensor:
    """Positions (..., A) in [-1, 1] -> (..., A·(2·bands + 1)): per axis a, [sin(π f_k p_a)]_k, [cos(π f_k p_a)]_k,
    p_a, with frequencies f = linspace(1, max_freq / 2, bands) (Perceiver / HEALNet ``fourier_encode``)."""
    frequencies = torch.linspace(1.0, max_freq / 2, num_freq_bands, device=positions.device, dtype=positions.dtype)
    angles = positions[..., None] * frequencies * math.pi
    encoded = torch.cat([angles.sin(), angles.cos(), positions[..., None]], dim=-1)
    return encoded.flatten(-2)


def grid_positions(*sizes: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions (prod(sizes), len(sizes)) of a row-major grid, each axis spanning linspace(-1, 1, size)."""
    axes = [torch.linspace(-1.0, 1.0, size, device=device) for size in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


class GatedFeedForward(nn.Module):
    """Pre-norm feed-forward of HEALNet: Linear(d -> 2·4d), values · act(gates), Linear(4d -> d), dropout. ``snn``:
    SELU gate and alpha dropout (self-normalising); otherwise GELU gate and ordinary dropout."""

    def __init__(self, dim: int, dropout: float, snn: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, 2 * FEEDFORWARD_MULT * dim)
        self.contract = nn.Linear(FEEDFORWARD_MULT * dim, dim)
        self.activation = F.selu if snn else F.gelu
        self.dropout = nn.AlphaDropout(dropout) if snn else nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> the update (B, N, dim), without the residual."""
        values, gates = self.expand(self.norm(x)).chunk(2, dim=-1)
        return self.dropout(self.contract(values * self.activation(gates)))


class LatentAttentionBlock(nn.Module):
    """latents += Attention(LayerNorm(latents), LayerNorm(context)); latents += FeedForward(latents).

    The attention is HEALNet's: bias-free query and key/value projections, softmax at temperature 0.5, dropout on
    the attention weights, Linear + LeakyReLU(0.01) out. ``context_dim`` None gives self-attention of the latents
    (keys and values from the normed latents)."""

    def __init__(self, latent_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float,
                 snn: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.scale = dim_head ** -0.5 / ATTENTION_TEMPERATURE
        self.norm = nn.LayerNorm(latent_dim)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim is not None else None
        self.to_query = nn.Linear(latent_dim, inner, bias=False)
        self.to_key_value = nn.Linear(context_dim or latent_dim, 2 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, latent_dim), nn.LeakyReLU(0.01))
        self.feedforward = GatedFeedForward(latent_dim, dropout, snn)

    def forward(self, latents: torch.Tensor, context: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, L, d), context (B, N, c) or None, key_padding (B, N) True where a key is padding ->
        updated latents (B, L, d)."""
        queries = self.norm(latents)
        context = queries if self.context_norm is None else self.context_norm(context)
        size = latents.shape[0]
        query = self.to_query(queries).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        key, value = (part.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                      for part in self.to_key_value(context).chunk(2, dim=-1))
        keep = None if key_padding is None else ~key_padding.view(size, 1, 1, -1)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=self.scale,
                                                  dropout_p=self.dropout if self.training else 0.0)
        latents = self.to_out(attended.transpose(1, 2).flatten(2)) + latents
        return self.feedforward(latents) + latents


@register("healnet")
class HEALNet(nn.Module):
    """A learned latent array (n_latents × hidden), updated ``depth`` times; each fusion layer runs, per modality in
    turn (EHR, then X-ray), a cross-attention block from the latents to that modality's raw inputs followed by
    ``self_per_cross_attn`` latent self-attention blocks (one set per layer, shared by both modality steps). The head
    reads the mean over latents (LayerNorm, Linear).

    Inputs: EHR — one key per hour, [the 76-d hourly input ∥ Fourier encoding of the hour's position in the served
    window, linspace(-1, 1, T)], padding hours masked; X-ray — one key per position of the CNN's last feature map
    (h·w), [the C channels ∥ Fourier encoding of its (row, column)]. Weight tying (``weight_tie_layers``): layer 1
    has its own weights, layers 2..depth share one set, so the size does not grow beyond depth 2.

    Missing X-ray: the X-ray step of every layer (cross-attention and the self-attention after it) is skipped for a
    stay without an X-ray, whose latents pass on unchanged; only paired rows enter the CNN.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, n_latents: int = 16, depth: int = 2, cross_heads: int = 4,
                 latent_heads: int = 4, cross_dim_head: int = 16, latent_dim_head: int = 16,
                 self_per_cross_attn: int = 1, weight_tie_layers: bool = True, snn: bool = True,
                 num_freq_bands: int = 2, max_freq: float = 10.0):
        super().__init__()
        if depth < 1 or n_latents < 1 or num_freq_bands < 1 or self_per_cross_attn < 0:
            raise ValueError("healnet: depth, n_latents and num_freq_bands must be >= 1, self_per_cross_attn >= 0")
        self.depth, self.num_freq_bands, self.max_freq = int(depth), int(num_freq_bands), float(max_freq)
        self.weight_tie_layers = bool(weight_tie_layers)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.latents = nn.Parameter(torch.randn(n_latents, hidden))
        distinct = min(self.depth, 2) if self.weight_tie_layers else self.depth

        def cross_block(context_dim: int) -> LatentAttentionBlock:
            return LatentAttentionBlock(hidden, context_dim, cross_heads, cross_dim_head, dropout, snn)

        ehr_dim = ehr_features + fourier_channels(1, self.num_freq_bands)
        cxr_dim = self.cxr_backbone.out_dim + fourier_channels(2, self.num_freq_bands)
        self.ehr_updates = nn.ModuleList(cross_block(ehr_dim) for _ in range(distinct))
        self.cxr_updates = nn.ModuleList(cross_block(cxr_dim) for _ in range(distinct))
        self.latent_blocks = nn.ModuleList(
            nn.ModuleList(LatentAttentionBlock(hidden, None, latent_heads, latent_dim_head, dropout, snn)
                          for _ in range(self_per_cross_attn))
            for _ in range(distinct))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_labels))

    def layer_weights(self, layer: int) -> int:
        """Index of the weight set fusion layer ``layer`` (0-based) uses: its own, or with tying the first layer's
        (layer 0) or the shared one (every later layer)."""
        return min(layer, 1) if self.weight_tie_layers else layer

    def ehr_context(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """EHR keys (B, T, features + 2·bands + 1) and their padding mask (B, T), True at hours >= ehr_length."""
        size, steps = batch.ehr.shape[:2]
        encoding = fourier_encode(grid_positions(steps, device=batch.ehr.device), self.max_freq, self.num_freq_bands)
        context = torch.cat([batch.ehr, encoding.to(batch.ehr.dtype).expand(size, -1, -1)], dim=-1)
        return context, padding_mask(batch.ehr_length, steps)

    def cxr_context(self, cxr: torch.Tensor) -> torch.Tensor:
        """Images or prefix features of paired stays (P, ...) -> X-ray keys (P, h·w, C + 2·(2·bands + 1)),
        row-major."""
        feature_map = self.cxr_backbone.feature_map(cxr)
        height, width = feature_map.shape[2:]
        encoding = fourier_encode(grid_positions(height, width, device=feature_map.device), self.max_freq,
                                  self.num_freq_bands).to(feature_map.dtype)
        patches = feature_map.flatten(2).transpose(1, 2)
        return torch.cat([patches, encoding.expand(patches.shape[0], -1, -1)], dim=-1)

    def modality_step(self, latents: torch.Tensor, cross: LatentAttentionBlock, weights: int, context: torch.Tensor,
                      key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """One modality's update of the latents: cross-attention to its keys, then the layer's self-attention."""
        latents = cross(latents, context, key_padding)
        for block in self.latent_blocks[weights]:
            latents = block(latents)
        return latents

    def fuse(self, batch: Batch) -> torch.Tensor:
        """The latent array (B, n_latents, hidden) after ``depth`` fusion layers."""
        ehr_context, ehr_padding = self.ehr_context(batch)
        rows = (batch.has_cxr > 0.5).nonzero(as_tuple=True)[0]
        cxr_context = self.cxr_context(batch.cxr[rows]) if rows.numel() else None
        latents = self.latents.expand(batch.ehr.shape[0], -1, -1)
        for layer in range(self.depth):
            weights = self.layer_weights(layer)
            latents = self.modality_step(latents, self.ehr_updates[weights], weights, ehr_context, ehr_padding)
            if cxr_context is not None:  # stays without an X-ray skip this step: their latents pass on unchanged
                paired = self.modality_step(latents[rows], self.cxr_updates[weights], weights, cxr_context)
                latents = latents.index_put((rows,), paired.to(latents.dtype))
        return latents

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the mean over the latents; no auxiliary losses."""
        return ModelOutput(self.head(self.fuse(batch).mean(dim=1)))
