"""EHR-only Transformer baseline (CareBench's EHR encoder, `models/base/base_encoder.py`)."""
from __future__ import annotations

from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import EHRTransformerEncoder
from ehrcxr.models.registry import register


@register("ehr_transformer")
class EHRTransformer(nn.Module):
    """Linear + learnable positions + Transformer (boolean padding mask) -> valid-step mean -> Linear."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 heads: int = 4, layers: int = 1, dropout: float = 0.2, max_len: int = 512):
        super().__init__()
        self.ehr_encoder = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers,
                                                 dropout=dropout, max_len=max_len)
        self.head = nn.Linear(hidden, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the EHR alone; no auxiliary losses."""
        pooled, _ = self.ehr_encoder(batch.ehr, batch.ehr_length)
        return ModelOutput(self.head(pooled))
