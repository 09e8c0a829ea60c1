"""Token-level cross-attention fusion: EHR hour tokens and X-ray patch tokens (the CNN's last feature map) in one
Transformer whose layers attend within each modality and across both ways. A generic baseline built on ViLBERT's
co-attention (Lu et al., NeurIPS 2019) and MulT's crossmodal attention (Tsai et al., ACL 2019); no published EHR +
X-ray model, so no public code to follow."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.attention import BidirectionalCrossAttentionEncoder
from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (EHRTransformerEncoder, GridPatchTokens, build_cxr_backbone, masked_mean,
                                    padding_mask)
from ehrcxr.models.registry import register


@register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """EHR tokens (one per hour: Linear + learned position, no attention of their own) and X-ray tokens (the h·w positions of the CNN's last feature map,
    Linear(channels -> hidden) + a learned 2-D position embedding, row + column, for maps up to ``max_grid`` ×
    ``max_grid``) -> bidirectional cross-attention Transformer (self-attention per stream, EHR queries attend to
    the X-ray tokens and X-ray queries to the EHR tokens) -> [mean of the EHR stream over valid hours ∥ mean of the
    X-ray stream] -> dropout -> Linear.

    A stay without an X-ray gets one learned missing-modality token as its X-ray stream (the other h·w − 1 slots
    are padding, never attended to); only paired rows pass through the CNN. The last feature map comes from
    ``CXRBackbone.feature_map``: with trainable stages (``frozen_stages`` < 4) the last stage's map, with a fully
    frozen CNN the precomputed prefix features as served, (C, h, w) or pooled (C, 1, 1).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 heads: int = 4, layers: int = 1, dropout: float = 0.2, max_grid: int = 8, max_len: int = 512):
        super().__init__()
        self.hidden = hidden
        self.ehr_tokens = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=0, max_len=max_len)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.grid_tokens = GridPatchTokens(self.cxr_backbone.out_dim, hidden, max_grid)
        self.missing_xray = nn.Parameter(torch.empty(hidden).normal_(std=0.02))
        self.fusion = BidirectionalCrossAttentionEncoder(hidden, heads, layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, n_labels)

    def patch_tokens(self, cxr: torch.Tensor) -> torch.Tensor:
        """Images or prefix features of paired stays (P, ...) -> tokens (P, h·w, hidden), row-major."""
        return self.grid_tokens(self.cxr_backbone.feature_map(cxr))

    def xray_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """X-ray stream (B, N, hidden) and its padding mask (B, N): the patch tokens of paired stays; the
        missing-modality token then padding for the others (N = 1 when no stay in the batch is paired)."""
        paired = batch.has_cxr > 0.5
        rows = paired.nonzero(as_tuple=True)[0]
        size = paired.shape[0]
        if rows.numel() == 0:
            return self.missing_xray.expand(size, 1, -1), torch.zeros(size, 1, dtype=torch.bool,
                                                                      device=paired.device)
        patches = self.patch_tokens(batch.cxr[rows])
        count = patches.shape[1]
        tokens = patches.new_zeros(size, count, self.hidden)
        tokens[:, 0] = self.missing_xray.to(tokens.dtype)
        tokens = tokens.index_put((rows,), patches)
        padding = torch.arange(count, device=paired.device)[None, :] >= torch.where(paired, count, 1)[:, None]
        return tokens, padding

    def fuse(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused EHR stream (B, T, hidden), fused X-ray stream (B, N, hidden) and their padding masks."""
        _, ehr = self.ehr_tokens(batch.ehr, batch.ehr_length)
        ehr_padding = padding_mask(batch.ehr_length, ehr.shape[1])
        xray, xray_padding = self.xray_tokens(batch)
        ehr, xray = self.fusion(ehr, xray, ehr_padding, xray_padding)
        return ehr, xray, ehr_padding, xray_padding

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from both pooled streams; no auxiliary losses."""
        ehr, xray, _, xray_padding = self.fuse(batch)
        xray_lengths = (~xray_padding).sum(dim=1)
        pooled = torch.cat([masked_mean(ehr, batch.ehr_length), masked_mean(xray, xray_lengths)], dim=1)
        return ModelOutput(self.head(self.dropout(pooled)))
