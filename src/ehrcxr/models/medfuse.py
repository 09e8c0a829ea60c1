"""MedFuse (Hayat et al., MLHC 2022): an LSTM fuses the EHR and CXR features as a 2-step sequence."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import EHRLSTMEncoder, build_cxr_backbone, encode_paired_cxr
from ehrcxr.models.registry import register


@register("medfuse")
class MedFuse(nn.Module):
    """EHR LSTM feature, then the projected CXR feature, through a fusion LSTM -> dropout -> Linear.

    A stay without an X-ray has a fusion sequence of length 1 (packed), so only its EHR
    feature reaches the head. The original uses a 2-layer EHR LSTM (``ehr_layers``).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, ehr_layers: int = 2):
        super().__init__()
        self.ehr_encoder = EHRLSTMEncoder(ehr_features, hidden, layers=ehr_layers, dropout=dropout)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.cxr_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
        self.fusion = nn.LSTM(hidden, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the fusion LSTM's last valid state; no auxiliary losses."""
        ehr = self.ehr_encoder(batch.ehr, batch.ehr_length)
        cxr = self.cxr_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr))
        paired = batch.has_cxr > 0.5
        cxr = cxr * paired.to(cxr.dtype).unsqueeze(1)
        lengths = (1 + paired.long()).cpu()
        packed = pack_padded_sequence(torch.stack([ehr, cxr], dim=1), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, (h_n, _) = self.fusion(packed)
        return ModelOutput(self.head(self.dropout(h_n[-1])))
