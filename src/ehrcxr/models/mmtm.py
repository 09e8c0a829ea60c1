"""MMTM, the Multimodal Transfer Module (Joze et al., CVPR 2020, "MMTM: Multimodal Transfer Module for CNN Fusion";
code haamoon/mmtm mmtm.py), as benchmarked by CareBench (jakeykj/CareBench models/mmtm/mmtm_components.py
MMTMLayer, mmtm_lightning.py)."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (build_cxr_backbone, build_ehr_encoder, ehr_summary,
                                    encode_paired_cxr_with_exchange, squeeze_paired)
from ehrcxr.models.registry import register


class MMTMLayer(nn.Module):
    """Multimodal squeeze-excitation: [image squeeze ∥ EHR squeeze] -> Linear(C + H -> int(2 (C + H) / ratio))
    -> ReLU -> one Linear per modality -> sigmoid, giving a gate in (0, 1) per CXR channel and per EHR feature.

    Width and sigmoid follow the public code (haamoon/mmtm and CareBench); the paper writes the joint width as
    (C + H) / 4 and the gate as 2 · sigmoid."""

    def __init__(self, image_channels: int, ehr_dim: int, ratio: float = 4):
        super().__init__()
        joint = int(2 * (image_channels + ehr_dim) / ratio)
        self.squeeze = nn.Linear(image_channels + ehr_dim, joint)
        self.image_excitation = nn.Linear(joint, image_channels)
        self.ehr_excitation = nn.Linear(joint, ehr_dim)

    def forward(self, image_squeeze: torch.Tensor, ehr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_squeeze (N, C), ehr (N, H) -> (image gate (N, C), EHR gate (N, H))."""
        joint = torch.relu(self.squeeze(torch.cat([image_squeeze, ehr], dim=1)))
        return torch.sigmoid(self.image_excitation(joint)), torch.sigmoid(self.ehr_excitation(joint))


@register("mmtm")
class MMTM(nn.Module):
    """EHR encoder (Transformer, or LSTM with ``ehr_encoder='lstm'``) + ResNet with an MMTM at every exchange
    point of the CNN: the prefix output and the output of each trainable stage (all five with ``frozen_stages`` 0,
    as CareBench's ``layer_after: -1``). There the joint squeeze of [GAP(map) ∥ EHR] gates the map's channels,
    and the gated map goes on to the next stage, and gates the EHR embedding, which goes on to the next MMTM.
    The EHR squeeze is the pooled embedding: the gates act per feature, so gating the Transformer's tokens and
    then taking their masked mean equals gating the mean (CareBench repeats the pooled vector over the hours and
    averages it back). The head reads [Linear(EHR -> CNN width) ∥ GAP of the last gated map ∥ has_cxr]
    (CareBench's joint head plus the flag).

    A stay without an X-ray takes a learned per-stage squeeze in place of GAP(map), so its EHR is gated as a
    paired stay's (CareBench feeds the zero image, whose maps act as such a constant and also enter BatchNorm
    statistics); its image features are exact zeros. Only paired rows enter the CNN. As in CareBench's EHR
    encoder, dropout acts on the pooled EHR feature.

    Trained by the loop's one optimiser on the joint loss. CareBench steps four AdamW optimisers per batch (CXR
    branch, EHR branch, all parameters, head), each on this same joint loss: a remnant of MedFuse's MMTM trainer,
    where each optimiser has its own (CXR-only, EHR-only, joint) loss, that only re-steps shared parameters.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, ehr_encoder: str = "transformer", heads: int = 4, layers: int = 1,
                 max_len: int = 512, ratio: float = 4):
        super().__init__()
        self.ehr_encoder = build_ehr_encoder(ehr_encoder, ehr_features, hidden, heads=heads, layers=layers,
                                             dropout=dropout, max_len=max_len)
        self.dropout = nn.Dropout(dropout)
        self.cxr_backbone = build_cxr_backbone(cxr)
        stage_channels = self.cxr_backbone.stage_channels
        self.exchanges = nn.ModuleList(MMTMLayer(channels, hidden, ratio) for channels in stage_channels)
        self.no_image_squeeze = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for channels in stage_channels)
        out_dim = self.cxr_backbone.out_dim
        self.ehr_projection = nn.Linear(hidden, out_dim)
        self.head = nn.Linear(2 * out_dim + 1, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) of the joint head; no auxiliary losses."""
        state = {"ehr": self.dropout(ehr_summary(self.ehr_encoder, batch.ehr, batch.ehr_length))}

        def transfer(index: int, rows: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
            squeeze = squeeze_paired(feature_map, rows, self.no_image_squeeze[index], len(batch))
            image_gate, ehr_gate = self.exchanges[index](squeeze, state["ehr"])
            state["ehr"] = state["ehr"] * ehr_gate
            return feature_map * image_gate[rows, :, None, None]

        image = encode_paired_cxr_with_exchange(self.cxr_backbone, batch.cxr, batch.has_cxr, transfer)
        has_cxr = (batch.has_cxr > 0.5).to(image.dtype).unsqueeze(1)
        return ModelOutput(self.head(torch.cat([self.ehr_projection(state["ehr"]), image, has_cxr], dim=1)))
