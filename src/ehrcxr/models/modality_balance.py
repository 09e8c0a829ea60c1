"""Pieces shared by the modality-balancing methods (AUG, ``aug.py``; InfoReg, ``inforeg.py``): CareBench's two
unimodal encoders, the true-label likelihood by which both judge which modality is ahead, the label loss on a
subset of rows (the CXR terms count paired stays only) and one manual optimiser step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ehrcxr.models.base import Batch
from ehrcxr.models.encoders import EHRTransformerEncoder, build_cxr_backbone, encode_paired_cxr


class UnimodalEncoders(nn.Module):
    """CareBench's per-modality encoders (``models/base/base_encoder.py``): the EHR Transformer (mean over valid
    hours) and the ResNet whose pooled feature a Linear projects to ``hidden`` (CareBench's fc 2048 -> 256).
    The ResNet sees paired rows only; a stay without an X-ray has an exact-zero CXR feature."""

    def __init__(self, ehr_features: int, cxr: dict | None, hidden: int, heads: int, layers: int, dropout: float,
                 max_len: int):
        super().__init__()
        self.ehr_encoder = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers, dropout=dropout,
                                                 max_len=max_len)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.cxr_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(EHR feature (B, hidden), CXR feature (B, hidden), zero where unpaired, paired mask (B,) bool)."""
        ehr, _ = self.ehr_encoder(batch.ehr, batch.ehr_length)
        paired = batch.has_cxr > 0.5
        cxr = self.cxr_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr))
        return ehr, cxr * paired.to(cxr.dtype).unsqueeze(1), paired

    def encoder_parameters(self, modality: str) -> list[nn.Parameter]:
        """The trainable parameters of one modality's encoder ('ehr': the Transformer; 'cxr': the ResNet's
        trainable stages and the projection)."""
        if modality == "ehr":
            modules = [self.ehr_encoder]
        elif modality == "cxr":
            modules = [self.cxr_backbone, self.cxr_projection]
        else:
            raise ValueError(f"modality must be 'ehr' or 'cxr'; got {modality!r}")
        return [p for module in modules for p in module.parameters() if p.requires_grad]


def true_label_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool = False
                              ) -> torch.Tensor:
    """log p(true value) in fp32: per label, log σ(x) where y = 1 and log σ(−x) where y = 0 (B, L); for a
    multiclass task the log-softmax of the labelled class (B, 1). Its negative mean is the task loss (BCE / CE)."""
    logits, labels = logits.float(), labels.float()
    if multiclass:
        return torch.log_softmax(logits, dim=1).gather(1, labels.argmax(dim=1, keepdim=True))
    return labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)


def rows_label_loss(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, multiclass: bool = False
                    ) -> torch.Tensor:
    """The task loss (mean BCE, or CE) over the selected ``rows`` (bool (B,)); a graph-connected 0 when none is
    selected (a batch without X-rays has no CXR loss)."""
    if not bool(rows.any()):
        return logits.float().sum() * 0.0
    return -true_label_log_likelihood(logits[rows], labels[rows], multiclass).mean()


def true_label_score(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, multiclass: bool = False
                     ) -> float:
    """Σ p(true value) over the selected rows (and labels): CareBench's modality score (AUG ``_score_modality``,
    InfoReg ``_compute_scores``); without gradient."""
    with torch.no_grad():
        return float(true_label_log_likelihood(logits[rows], labels[rows], multiclass).exp().sum())


def optimiser_step(step, loss: torch.Tensor) -> None:
    """One manual step in a ``training_step``: zero the gradients, backward through the trainer (which runs the
    model's ``on_after_backward``), step every optimiser."""
    step.zero_grad()
    step.backward(loss)
    for optimizer in step.optimizers:
        optimizer.step()
