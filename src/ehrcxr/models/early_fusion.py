"""Early fusion: the X-ray feature vector joins the EHR input at every time step, and one sequence encoder reads both.
A generic baseline, the "early fusion" of Huang et al., npj Digit. Med. 2020 (fusion review: extracted image
features concatenated with the other inputs before one model); no published EHR + X-ray model, so no public code."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, build_ehr_encoder, ehr_summary, encode_paired_cxr
from ehrcxr.models.registry import register


@register("early_fusion")
class EarlyFusion(nn.Module):
    """[EHR step (C) ∥ Linear(CNN feature) (hidden) ∥ has_cxr (1)] at every hour -> EHR Transformer (mean over
    valid hours) or LSTM (last valid state) -> dropout -> Linear.

    The projected X-ray feature is the same at every step: the image is static, the EHR sequence carries the time.
    A stay without an X-ray gets exact zeros in the X-ray channels and 0 in the flag channel; only paired rows pass
    through the CNN.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, ehr_encoder: str = "transformer", heads: int = 4, layers: int = 1,
                 max_len: int = 512):
        super().__init__()
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.cxr_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
        self.ehr_encoder = build_ehr_encoder(ehr_encoder, ehr_features + hidden + 1, hidden, heads=heads,
                                             layers=layers, dropout=dropout, max_len=max_len)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels)

    def sequence_input(self, batch: Batch) -> torch.Tensor:
        """The sequence encoder's input (B, T, C + hidden + 1): each EHR step with the X-ray channels appended."""
        has_cxr = (batch.has_cxr > 0.5).to(batch.ehr.dtype).unsqueeze(1)
        xray = self.cxr_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr)) * has_cxr
        steps = batch.ehr.shape[1]
        static = torch.cat([xray, has_cxr], dim=1).unsqueeze(1).expand(-1, steps, -1)
        return torch.cat([batch.ehr, static.to(batch.ehr.dtype)], dim=2)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the sequence encoder's summary; no auxiliary losses."""
        summary = ehr_summary(self.ehr_encoder, self.sequence_input(batch), batch.ehr_length)
        return ModelOutput(self.head(self.dropout(summary)))
