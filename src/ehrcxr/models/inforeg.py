"""InfoReg: adaptive unimodal regulation in the prime learning window (Huang et al., "Adaptive Unimodal Regulation
for Balanced Multimodal Information Acquisition", CVPR 2025, arXiv 2503.18595; public code GeWu-Lab/InfoReg_CVPR2025
``main.py``), as CareBench re-implements it (jakeykj/CareBench ``models/inforeg/inforeg_lighting.py``).

Trained through the trainer's hooks: ``training_step`` (the three losses, the batch's modality scores) and
``on_after_backward`` (the regulation of the gradients, the Fisher traces), with the trace history kept by
``hook_state_dict`` so that a resumed run regulates exactly as an uninterrupted one.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.modality_balance import UnimodalEncoders, optimiser_step, rows_label_loss, true_label_score
from ehrcxr.models.registry import register

MODALITIES = ("ehr", "cxr")
MAX_SLOWDOWN = 0.9  # the regulation removes at most this share of the dominant encoder's gradient


def fisher_trace(parameters) -> float:
    """Σ over parameter tensors of mean(grad²): CareBench's diagonal Fisher-information trace of an encoder
    (parameters without a gradient count 0)."""
    means = [p.grad.detach().float().pow(2).mean() for p in parameters if p.grad is not None]
    return float(torch.stack(means).sum()) if means else 0.0


def trace_change(history, window: int) -> float:
    """k = (mean of the last ``window`` traces − mean of the ``window`` before the newest) / mean of the last
    ``window`` (CareBench ``_compute_k_value``, the public code's ``(tr1 - tr2) / tr1``); 1 until ``window`` + 1
    traces exist (the start of training counts as the prime learning window), 0 when the recent traces are 0."""
    history = list(history)
    if len(history) < window + 1:
        return 1.0
    recent = sum(history[-window:]) / window
    previous = sum(history[-window - 1:-1]) / window
    return 0.0 if recent == 0 else (recent - previous) / recent


def slowdown(score_ehr: float, score_cxr: float, gamma_ehr: float, gamma_cxr: float
             ) -> tuple[str | None, float]:
    """(dominant modality, gradient factor 1 − min(γ_mod·gap, 0.9)) with gap = |s_E − s_C| / (s_E + s_C); (None,
    1.0) when the scores tie."""
    if score_ehr == score_cxr:
        return None, 1.0
    gap = abs(score_ehr - score_cxr) / (score_ehr + score_cxr)
    dominant, gamma = ("ehr", gamma_ehr) if score_ehr > score_cxr else ("cxr", gamma_cxr)
    return dominant, 1.0 - min(gamma * gap, MAX_SLOWDOWN)


@register("inforeg")
class InfoReg(UnimodalEncoders):
    """Joint head on [EHR ∥ CXR] (the prediction) plus one head per modality; the dominant modality's encoder
    learns more slowly while its Fisher information still rises fast.

    Loss = task loss of the joint head + of the EHR head + of the CXR head. After each backward pass
    (``on_after_backward``): the dominant modality is the one whose head gives the batch's true label values the
    higher summed probability (s_E vs s_C); if the relative change k of its Fisher trace over the last
    ``trace_window`` steps (:func:`trace_change`) exceeds ``k_threshold`` (its prime learning window), its encoder
    gradients are multiplied by 1 − min(γ_mod·gap, 0.9) (:func:`slowdown`). Then each encoder's Fisher trace
    (mean squared gradient, after the regulation, as in both originals) joins its history. ``trace_window``
    counts training steps, as in CareBench (the public code keeps one trace per epoch).

    Missing X-ray: the joint head reads a zero CXR feature (the projection's bias is masked too), the CXR head's
    loss and both scores count paired stays only (so the scores compare the heads on the same stays), and a
    batch without X-rays is not regulated and adds no CXR trace (its CXR encoder got no information).
    Deviations: k is that of the dominant modality's own trace (CareBench always uses the EHR trace, a literal
    port of the public code, which computes k from the trace of CREMA-D's audio, its dominant modality); the
    regulation scales the gradient as CareBench does (the public code adds β·(θ − θ at epoch start) to it).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, max_len: int = 512,
                 k_threshold: float = 0.05, gamma_ehr: float = 0.95, gamma_cxr: float = 0.10,
                 trace_window: int = 5):
        super().__init__(ehr_features, cxr, hidden, heads, layers, dropout, max_len)
        if int(trace_window) < 1 or gamma_ehr < 0 or gamma_cxr < 0:
            raise ValueError(f"inforeg needs trace_window >= 1 and gammas >= 0; got {trace_window}, {gamma_ehr}, "
                             f"{gamma_cxr}")
        self.k_threshold, self.trace_window = float(k_threshold), int(trace_window)
        self.gamma = {"ehr": float(gamma_ehr), "cxr": float(gamma_cxr)}
        self.joint_head = nn.Linear(2 * hidden, n_labels)
        self.ehr_head = nn.Linear(hidden, n_labels)
        self.cxr_head = nn.Linear(hidden, n_labels)
        self.traces = {modality: deque(maxlen=self.trace_window + 1) for modality in MODALITIES}
        self.batch_scores: dict[str, float] | None = None  # set by training_step for on_after_backward

    def head_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(joint logits, EHR-head logits, CXR-head logits, paired mask)."""
        ehr, cxr, paired = self.encode(batch)
        return self.joint_head(torch.cat([ehr, cxr], dim=1)), self.ehr_head(ehr), self.cxr_head(cxr), paired

    def forward(self, batch: Batch) -> ModelOutput:
        """The joint head's logits."""
        return ModelOutput(self.head_logits(batch)[0])

    def training_step(self, batch: Batch, step) -> torch.Tensor:
        """One step on the three losses; the batch's scores (paired stays) go to ``on_after_backward``."""
        multiclass = step.data.splits["train"].multiclass
        with step.autocast():
            joint, ehr_logits, cxr_logits, paired = self.head_logits(batch)
            every_row = torch.ones_like(paired)
            loss = (step.loss(ModelOutput(joint), batch)
                    + rows_label_loss(ehr_logits, batch.labels, every_row, multiclass)
                    + rows_label_loss(cxr_logits, batch.labels, paired, multiclass))
        self.batch_scores = None
        if bool(paired.any()):
            self.batch_scores = {"ehr": true_label_score(ehr_logits, batch.labels, paired, multiclass),
                                 "cxr": true_label_score(cxr_logits, batch.labels, paired, multiclass)}
        optimiser_step(step, loss)
        return loss.detach()

    def on_after_backward(self) -> None:
        """Slow the dominant encoder down in its prime learning window, then record both Fisher traces."""
        scores, self.batch_scores = self.batch_scores, None
        if scores is not None:
            dominant, factor = slowdown(scores["ehr"], scores["cxr"], self.gamma["ehr"], self.gamma["cxr"])
            if dominant is not None and trace_change(self.traces[dominant], self.trace_window) > self.k_threshold:
                for parameter in self.encoder_parameters(dominant):
                    if parameter.grad is not None:
                        parameter.grad.mul_(factor)
        informed = MODALITIES if scores is not None else ("ehr",)
        for modality in informed:
            self.traces[modality].append(fisher_trace(self.encoder_parameters(modality)))

    def hook_state_dict(self) -> dict:
        """The recent Fisher traces of each encoder."""
        return {"traces": {modality: list(history) for modality, history in self.traces.items()}}

    def load_hook_state_dict(self, state: dict) -> None:
        """Restore the Fisher trace histories."""
        for modality, history in state["traces"].items():
            self.traces[modality] = deque(history, maxlen=self.trace_window + 1)
