"""DAFT, the Dynamic Affine Feature map Transform (Pölsterl et al., MLMI 2021, "Combining 3D image and tabular
data via the dynamic affine feature map transform"; code ai-med/DAFT daft/networks/vol_blocks.py DAFTBlock), as
benchmarked by CareBench (jakeykj/CareBench models/daft/daft_components.py, daft_lightning.py)."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (build_cxr_backbone, build_ehr_encoder, ehr_summary,
                                    encode_paired_cxr_with_exchange, squeeze_paired)
from ehrcxr.models.registry import register

MODULATED = ("feature_map", "ehr")


def affine_transform(features: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """scale * features + shift, one (scale, shift) per row and channel: features (N, C, ...), scale/shift (N, C)."""
    shape = scale.shape + (1,) * (features.dim() - 2)
    return scale.reshape(shape) * features + shift.reshape(shape)


class DAFTBlock(nn.Module):
    """(scale, shift), each (N, channels), from [GAP(image feature map) ∥ EHR embedding] through a bias-free
    Linear -> ReLU -> bias-free Linear with a linear output (DAFT's default activation, CareBench's 'linear').

    The bottleneck width is int((image_channels + ehr_dim) / bottleneck_factor), DAFT's ``bottleneck_factor``
    (7 in the paper's scripts)."""

    def __init__(self, image_channels: int, ehr_dim: int, channels: int, bottleneck_factor: float = 7.0):
        super().__init__()
        bottleneck = max(1, int((image_channels + ehr_dim) / bottleneck_factor))
        self.aux = nn.Sequential(nn.Linear(image_channels + ehr_dim, bottleneck, bias=False), nn.ReLU(),
                                 nn.Linear(bottleneck, 2 * channels, bias=False))

    def forward(self, image_squeeze: torch.Tensor, ehr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_squeeze (N, image_channels), ehr (N, ehr_dim) -> (scale, shift)."""
        scale, shift = self.aux(torch.cat([image_squeeze, ehr], dim=1)).chunk(2, dim=1)
        return scale, shift


@register("daft")
class DAFT(nn.Module):
    """EHR encoder (Transformer, or LSTM with ``ehr_encoder='lstm'``) + ResNet with a DAFT block at every exchange
    point of the CNN: the prefix output and the output of each trainable stage (all five with ``frozen_stages`` 0,
    as CareBench's ``layer_after: -1``).

    ``modulate='feature_map'`` (default, the paper's DAFT): each block turns [GAP(map) ∥ EHR] into a per-channel
    scale and shift of the image feature map, which then goes on to the next stage; the head reads
    [EHR ∥ Linear(GAP of the last modulated map) · has_cxr ∥ has_cxr]. The original's classifier reads the image
    alone (tabular data enters only through the blocks); here the EHR also reaches the head directly, because a
    stay without an X-ray has no map to modulate and is predicted by the same head from its EHR, with exact-zero
    image features.

    ``modulate='ehr'`` (CareBench's variant): the same blocks give a scale and shift of the EHR embedding,
    EHR <- scale · EHR + shift at every point in turn, and the head reads the modulated EHR alone; the CNN runs
    unmodulated and feeds the blocks only through its pooled maps. A stay without an X-ray goes through the same
    chain with a learned per-stage squeeze in place of GAP(map) (CareBench feeds the zero image, whose maps act
    as such a constant and also enter BatchNorm statistics).

    Either way only paired rows enter the CNN. As in CareBench's EHR encoder, dropout acts on the pooled EHR
    feature.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, ehr_encoder: str = "transformer", heads: int = 4, layers: int = 1,
                 max_len: int = 512, bottleneck_factor: float = 7.0, modulate: str = "feature_map"):
        super().__init__()
        if modulate not in MODULATED:
            raise ValueError(f"daft modulate must be one of {MODULATED}; got {modulate!r}")
        self.modulate = modulate
        self.ehr_encoder = build_ehr_encoder(ehr_encoder, ehr_features, hidden, heads=heads, layers=layers,
                                             dropout=dropout, max_len=max_len)
        self.dropout = nn.Dropout(dropout)
        self.cxr_backbone = build_cxr_backbone(cxr)
        stage_channels = self.cxr_backbone.stage_channels
        if modulate == "feature_map":
            self.blocks = nn.ModuleList(DAFTBlock(channels, hidden, channels, bottleneck_factor)
                                        for channels in stage_channels)
            self.cxr_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
            self.head = nn.Linear(2 * hidden + 1, n_labels)
        else:
            self.blocks = nn.ModuleList(DAFTBlock(channels, hidden, hidden, bottleneck_factor)
                                        for channels in stage_channels)
            self.no_image_squeeze = nn.ParameterList(nn.Parameter(torch.zeros(channels))
                                                     for channels in stage_channels)
            self.head = nn.Linear(hidden, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels); no auxiliary losses."""
        ehr = self.dropout(ehr_summary(self.ehr_encoder, batch.ehr, batch.ehr_length))
        if self.modulate == "feature_map":
            fused = self._modulated_image_features(batch, ehr)
        else:
            fused = self._modulated_ehr(batch, ehr)
        return ModelOutput(self.head(fused))

    def _modulated_image_features(self, batch: Batch, ehr: torch.Tensor) -> torch.Tensor:
        """[EHR ∥ projected GAP of the DAFT-modulated last map · has_cxr ∥ has_cxr] (B, 2 hidden + 1)."""
        def film(index: int, rows: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
            scale, shift = self.blocks[index](feature_map.mean(dim=(2, 3)), ehr[rows])
            return affine_transform(feature_map, scale, shift)

        image = encode_paired_cxr_with_exchange(self.cxr_backbone, batch.cxr, batch.has_cxr, film)
        has_cxr = (batch.has_cxr > 0.5).to(ehr.dtype).unsqueeze(1)
        return torch.cat([ehr, self.cxr_projection(image) * has_cxr, has_cxr], dim=1)

    def _modulated_ehr(self, batch: Batch, ehr: torch.Tensor) -> torch.Tensor:
        """The EHR embedding after the chain of DAFT blocks (B, hidden), CareBench's variant."""
        state = {"ehr": ehr}

        def film(index: int, rows: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
            squeeze = squeeze_paired(feature_map, rows, self.no_image_squeeze[index], len(batch))
            scale, shift = self.blocks[index](squeeze, state["ehr"])
            state["ehr"] = affine_transform(state["ehr"], scale, shift)
            return feature_map

        encode_paired_cxr_with_exchange(self.cxr_backbone, batch.cxr, batch.has_cxr, film)
        return state["ehr"]
