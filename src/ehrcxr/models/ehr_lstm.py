"""EHR-only LSTM baseline (MedFuse's unimodal EHR model, Hayat et al. 2022)."""
from __future__ import annotations

from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import EHRLSTMEncoder
from ehrcxr.models.registry import register


@register("ehr_lstm")
class EHRLSTM(nn.Module):
    """Packed LSTM over the EHR time series -> last valid hidden state -> dropout -> Linear."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.ehr_encoder = EHRLSTMEncoder(ehr_features, hidden, layers=layers, dropout=dropout,
                                          bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the EHR alone; no auxiliary losses."""
        return ModelOutput(self.head(self.dropout(self.ehr_encoder(batch.ehr, batch.ehr_length))))
