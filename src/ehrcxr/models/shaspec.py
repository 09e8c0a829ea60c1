"""ShaSpec (Wang, Chen, Liu, Wang, Carneiro; "Multi-modal Learning with Missing Modality via Shared-Specific Feature
Modelling", CVPR 2023; public code billhhh/ShaSpec ``DualNet_SS.py`` (DualNet_SS, CompositionalLayer), ``train_SS.py``
(the L1 shared and domain-classification losses), ``loss_Dual.py`` (DomainClsLoss)), for EHR + X-ray as in CareBench
``models/shaspec/shaspec_components.py`` (MultiModalTransformerSharedEncoder, CompositionalLayer, FusionClassifier) and
``shaspec_lightning.py``.

One *shared* encoder reads every modality (the same Transformer, told the modality by a learned embedding); each
modality also has its own *specific* encoder. Per modality, fused = shared + Linear([shared ∥ specific]); the
prediction reads the mean of the fused features. A missing X-ray takes the EHR's shared feature as its shared and
fused feature. Two auxiliary losses: α·L1 between the two shared features (paired stays) pulls them together, and
β·CE of a modality classifier on the *specific* features keeps those modality-specific.

CareBench's domain loss classifies the shared features (its ``spec_gft`` is a copy of ``shared_gft``; METHODS.md
§3.2): here the classifier reads the specific features, as ``DualNet_SS.py`` does. docs/MODELS.md lists the
other deviations.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (CXRBackbone, EHRTransformerEncoder, GridPatchTokens, build_cxr_backbone,
                                    masked_mean, padding_mask, transformer_encoder)
from ehrcxr.models.registry import register

EHR_DOMAIN, CXR_DOMAIN = 0, 1


class ShaSpecFeatures(NamedTuple):
    """Per-stay features (B, hidden) of one batch; ``cxr_specific`` is zero and ``cxr_shared`` / ``cxr_fused`` are
    ``ehr_shared`` where ``paired`` (B,) bool is False."""

    ehr_shared: torch.Tensor
    cxr_shared: torch.Tensor
    ehr_specific: torch.Tensor
    cxr_specific: torch.Tensor
    ehr_fused: torch.Tensor
    cxr_fused: torch.Tensor
    paired: torch.Tensor


def shared_consistency_loss(ehr_shared: torch.Tensor, cxr_shared: torch.Tensor, paired: torch.Tensor
                            ) -> torch.Tensor:
    """ShaSpec's L1 term: mean |ehr_shared − cxr_shared| over the paired rows (bool (B,)) and all features, as
    ``nn.L1Loss`` on those rows; 0 when no row is paired. No host sync."""
    weights = paired.float()
    per_row = (ehr_shared.float() - cxr_shared.float()).abs().mean(dim=1)
    return (per_row * weights).sum() / weights.sum().clamp_min(1.0)


def domain_classification_loss(classifier: nn.Module, ehr_specific: torch.Tensor, cxr_specific: torch.Tensor,
                               paired: torch.Tensor) -> torch.Tensor:
    """ShaSpec's modality-classification term: cross-entropy of ``classifier`` (features -> 2 logits) predicting
    which modality each *specific* feature came from (EHR 0, X-ray 1), averaged over the EHR features of every
    row and the X-ray features of the paired rows (bool (B,)). No host sync."""
    logits = classifier(torch.cat([ehr_specific, cxr_specific.to(ehr_specific.dtype)])).float()
    size = ehr_specific.shape[0]
    targets = torch.cat([torch.full((size,), EHR_DOMAIN, device=logits.device),
                         torch.full((size,), CXR_DOMAIN, device=logits.device)])
    weights = torch.cat([torch.ones_like(paired, dtype=logits.dtype), paired.to(logits.dtype)])
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()


class SharedEncoder(nn.Module):
    """ShaSpec's shared encoder (CareBench MultiModalTransformerSharedEncoder): one Transformer for both modalities.

    EHR input: the hourly steps embedded (Linear + learned position, ``EHRTransformerEncoder`` with no layers).
    X-ray input: the h·w positions of the last feature map of its own CNN (``backbone``: CareBench's shared encoder
    has its own ResNet), each Linear(channels -> hidden) + a learned row + column position (maps up to
    ``max_grid`` per side); one token with the demo's frozen, pooled features. Each modality's tokens get its
    modality embedding and go through the same Transformer; the mean over valid tokens then a Linear gives the
    shared feature.
    """

    def __init__(self, ehr_features: int, backbone: CXRBackbone, hidden: int, heads: int, layers: int,
                 dropout: float, max_grid: int, max_len: int):
        super().__init__()
        self.ehr_embedding = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=0, max_len=max_len)
        self.cxr_backbone = backbone
        self.grid_tokens = GridPatchTokens(backbone.out_dim, hidden, max_grid)
        self.modality_embedding = nn.Parameter(torch.empty(2, hidden).normal_(std=0.02))
        self.transformer = transformer_encoder(hidden, heads, layers, dropout)
        self.output = nn.Linear(hidden, hidden)

    def encode_ehr(self, ehr: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """EHR (B, T, features), lengths (B,) -> shared feature (B, hidden); padding hours never matter."""
        _, tokens = self.ehr_embedding(ehr, lengths)
        tokens = tokens + self.modality_embedding[EHR_DOMAIN].to(tokens.dtype)
        tokens = self.transformer(tokens, src_key_padding_mask=padding_mask(lengths, tokens.shape[1]))
        return self.output(masked_mean(tokens, lengths))

    def patch_tokens(self, cxr: torch.Tensor) -> torch.Tensor:
        """Images or prefix features of paired stays (P, ...) -> X-ray tokens (P, h·w, hidden), row-major."""
        return self.grid_tokens(self.cxr_backbone.feature_map(cxr), offset=self.modality_embedding[CXR_DOMAIN])

    def encode_cxr(self, cxr: torch.Tensor) -> torch.Tensor:
        """Images or prefix features of paired stays (P, ...) -> shared feature (P, hidden)."""
        return self.output(self.transformer(self.patch_tokens(cxr)).mean(dim=1))


@register("shaspec")
class ShaSpec(nn.Module):
    """ShaSpec for EHR + one X-ray.

    Specific encoders: the EHR Transformer (mean over valid hours) and a ResNet whose pooled feature a Linear
    projects to ``hidden``. Shared encoder: ``SharedEncoder`` (its own ResNet: ``backbone.branch()``, the same frozen
    prefix, its own trainable stages). fused_m = shared_m + Linear([shared_m ∥ specific_m]) (one Linear for both
    modalities). Head: mean of the EHR and X-ray fused features -> Dropout -> Linear(hidden -> hidden/2) -> ReLU ->
    Dropout -> Linear. A stay without an X-ray uses its EHR shared feature as the X-ray side's shared and fused
    feature (the original's ``general_shared_ft``; no specific feature exists); only paired stays enter the CNNs.

    Auxiliary losses: ``shared`` = α · L1(EHR shared, X-ray shared) over paired stays; ``domain`` = β · CE of a
    Linear(hidden -> 2) modality classifier on the specific features (every stay's EHR, the paired stays' X-ray).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, alpha: float = 0.1, beta: float = 0.02,
                 max_grid: int = 8, max_len: int = 512):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.ehr_specific = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers, dropout=dropout,
                                                  max_len=max_len)
        self.cxr_specific_backbone = build_cxr_backbone(cxr)
        self.cxr_specific_projection = nn.Linear(self.cxr_specific_backbone.out_dim, hidden)
        self.shared_encoder = SharedEncoder(ehr_features, self.cxr_specific_backbone.branch(), hidden, heads, layers,
                                            dropout, max_grid, max_len)
        self.composition = nn.Linear(2 * hidden, hidden)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden // 2, n_labels))
        self.domain_classifier = nn.Linear(hidden, 2)

    def compose(self, shared: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        """ShaSpec's residual fusion: shared + Linear([shared ∥ specific])."""
        return shared + self.composition(torch.cat([shared, specific.to(shared.dtype)], dim=1))

    def features(self, batch: Batch) -> ShaSpecFeatures:
        """Shared, specific and fused features of both modalities for every stay."""
        paired = batch.has_cxr > 0.5
        rows = paired.nonzero(as_tuple=True)[0]
        ehr_specific, _ = self.ehr_specific(batch.ehr, batch.ehr_length)
        ehr_shared = self.shared_encoder.encode_ehr(batch.ehr, batch.ehr_length)
        ehr_fused = self.compose(ehr_shared, ehr_specific)
        cxr_specific = ehr_shared.new_zeros(ehr_shared.shape)
        if rows.numel() == 0:
            return ShaSpecFeatures(ehr_shared, ehr_shared, ehr_specific, cxr_specific, ehr_fused, ehr_shared, paired)
        images = batch.cxr[rows]
        specific = self.cxr_specific_projection(self.cxr_specific_backbone(images)).to(ehr_shared.dtype)
        shared = self.shared_encoder.encode_cxr(images).to(ehr_shared.dtype)
        fused = self.compose(shared, specific)
        index = (rows,)
        return ShaSpecFeatures(ehr_shared, ehr_shared.index_put(index, shared), ehr_specific,
                               cxr_specific.index_put(index, specific), ehr_fused, ehr_shared.index_put(index, fused),
                               paired)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) plus the α-weighted shared-consistency and β-weighted domain losses."""
        parts = self.features(batch)
        logits = self.head((parts.ehr_fused + parts.cxr_fused) / 2)
        shared = shared_consistency_loss(parts.ehr_shared, parts.cxr_shared, parts.paired)
        domain = domain_classification_loss(self.domain_classifier, parts.ehr_specific, parts.cxr_specific,
                                            parts.paired)
        return ModelOutput(logits, {"shared": self.alpha * shared, "domain": self.beta * domain})
