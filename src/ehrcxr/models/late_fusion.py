"""Late fusion by feature concatenation (CareBench `models/simple/`, with missing CXRs zeroed)."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, build_ehr_encoder, ehr_summary, encode_paired_cxr
from ehrcxr.models.registry import register


@register("late_fusion")
class LateFusion(nn.Module):
    """[EHR feature ∥ projected CXR feature · has_cxr ∥ has_cxr] -> dropout -> Linear.

    CareBench's released code feeds the features of the zero image for missing
    X-rays; here they are exact zeros and the has_cxr flag is an extra input.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, ehr_encoder: str = "transformer", heads: int = 4, layers: int = 1,
                 max_len: int = 512):
        super().__init__()
        self.ehr_encoder = build_ehr_encoder(ehr_encoder, ehr_features, hidden, heads=heads, layers=layers,
                                             dropout=dropout, max_len=max_len)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.cxr_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden + 1, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the concatenated features; no auxiliary losses."""
        ehr = ehr_summary(self.ehr_encoder, batch.ehr, batch.ehr_length)
        has_cxr = (batch.has_cxr > 0.5).to(ehr.dtype).unsqueeze(1)
        cxr = self.cxr_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr)) * has_cxr
        return ModelOutput(self.head(self.dropout(torch.cat([ehr, cxr, has_cxr], dim=1))))
