"""CXR-only ResNet baseline (MedFuse / CareBench unimodal image model)."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, encode_paired_cxr
from ehrcxr.models.registry import register


@register("cxr_resnet")
class CXRResNet(nn.Module):
    """ResNet features -> Linear -> ReLU -> dropout -> Linear.

    Stays without an X-ray get a learned per-label bias (the prior) as logits; their image
    (a zero image) is never passed through the network.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2):
        super().__init__()
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.head = nn.Sequential(nn.Linear(self.cxr_backbone.out_dim, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_labels))
        self.prior = nn.Parameter(torch.zeros(n_labels))

    def forward(self, batch: Batch) -> ModelOutput:
        """Image logits where has_cxr == 1, the learned prior elsewhere."""
        features = encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr)
        paired = (batch.has_cxr > 0.5).unsqueeze(1)
        logits = torch.where(paired, self.head(features), self.prior.expand(features.shape[0], -1))
        return ModelOutput(logits)
