"""AUG: adaptive classifier assignment with sustained boosting (Jiang, Huang & Yang, "Rethinking Multimodal
Learning from the Perspective of Mitigating Classification Ability Disproportion", arXiv 2502.20120; public code
njustkmg/NeurIPS25-AUG ``train_CREMAD.py``, ``model/AudioVideo.py``), as CareBench re-implements it
(jakeykj/CareBench ``models/aug/aug_lighting.py``).

Trained through the trainer's hooks: ``training_step`` (two manual steps per batch), ``on_train_epoch_start`` /
``on_train_epoch_end`` (scores, classifier assignment) and ``hook_state_dict`` / ``load_hook_state_dict`` (the
added layers). CareBench builds its optimiser before any layer is added and never registers the new layers (nor
does the public AUG code), so they stay at their random initialisation; here they train.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.modality_balance import (UnimodalEncoders, optimiser_step, rows_label_loss,
                                            true_label_log_likelihood, true_label_score)
from ehrcxr.models.registry import register

MODALITIES = ("ehr", "cxr")
log = logging.getLogger(__name__)


def is_check_epoch(epoch: int, interval: int) -> bool:
    """Whether classifier assignment runs at the end of ``epoch`` (counted from 1): the first epoch and every
    ``interval``-th (CareBench: ``current_epoch == 0 or (current_epoch + 1) % T == 0``, counted from 0)."""
    return epoch == 1 or epoch % interval == 0


def weaker_modality(ratio: float, target_ratio: float, margin: float) -> str | None:
    """The modality that gets a boosting layer for ``ratio`` = EHR score / CXR score: 'cxr' above
    ``target_ratio + margin``, 'ehr' below ``target_ratio − margin``, None in between."""
    if ratio > target_ratio + margin:
        return "cxr"
    if ratio < target_ratio - margin:
        return "ehr"
    return None


def boosting_loss(logits: torch.Tensor, previous: torch.Tensor, newest: torch.Tensor | None, labels: torch.Tensor,
                  rows: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """AUG's sustained-boosting loss of one modality's classifier on ``rows``.

    Without boosting layers, the task loss of ``logits``. With them: loss(logits) + loss(previous) + the newest
    layer's residual term mean[−(1 − 0.5·p_prev) · log p_new], where ``previous`` is the classifier without its
    newest layer, ``newest`` that layer's own logits and p the probability of the true value (p_prev detached).
    For one-hot classes this is the public code's CE(new, y) − 0.5·CE(new, y·softmax(prev)); for independent
    labels it is the same per label (see the class docstring for CareBench's BCE form).
    """
    loss = rows_label_loss(logits, labels, rows, multiclass)
    if newest is None or not bool(rows.any()):
        return loss
    previous_true = true_label_log_likelihood(previous[rows].detach(), labels[rows], multiclass).exp()
    newest_log_likelihood = true_label_log_likelihood(newest[rows], labels[rows], multiclass)
    residual = -((1 - 0.5 * previous_true) * newest_log_likelihood).mean()
    return loss + rows_label_loss(previous, labels, rows, multiclass) + residual


@register("aug")
class AUG(UnimodalEncoders):
    """Two unimodal classifiers that share one output layer, trained separately and balanced by boosting.

    Each modality's classifier is Linear(hidden -> classifier_hidden) + ReLU, followed by the shared output
    Linear; a boosting layer is a further Linear(hidden -> classifier_hidden) + ReLU on the same feature whose
    output-layer logits are added (Xavier-normal weights, zero bias). Every batch takes two optimiser steps
    (``training_step``): the EHR classifier's boosting loss, then the CXR classifier's (:func:`boosting_loss`).
    Adaptive classifier assignment: during each epoch the summed probabilities of the true label values of the
    two classifiers are accumulated; at the end of the first epoch and of every ``check_interval``-th (epochs, as
    CareBench and the public code), ratio = EHR sum / CXR sum decides which classifier gets a boosting layer
    (:func:`weaker_modality`). The prediction is α·EHR logits + (1 − α)·CXR logits. The default interval, 4,
    checks a 12-epoch run at epochs 1, 4, 8 and 12, as CareBench's T = 15 checks its 50 epochs 4 times (1, 15, 30,
    45).

    Missing X-ray: the CXR classifier is neither trained nor scored on a stay without an X-ray (CXR loss and the
    ratio's sums run over paired stays only, so the ratio compares both classifiers on the same stays), and such
    a stay's prediction is its EHR logits alone (CareBench mixes in the logits of a zero image). Deviations:
    added layers are trained; a batch without X-rays takes the EHR step only; the boosting term for independent
    labels is the public code's residual weight per label (CareBench's −0.5·BCE(new, y·σ(prev)) also halves
    the loss of every negative label, which the one-hot original never does).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, max_len: int = 512,
                 classifier_hidden: int | None = None, alpha: float = 0.6, target_ratio: float = 1.0,
                 margin: float = 0.01, check_interval: int = 4):
        super().__init__(ehr_features, cxr, hidden, heads, layers, dropout, max_len)
        if not 0.0 <= alpha <= 1.0 or margin < 0 or int(check_interval) < 1:
            raise ValueError(f"aug needs 0 <= alpha <= 1, margin >= 0 and check_interval >= 1; got {alpha}, "
                             f"{margin}, {check_interval}")
        self.hidden, self.classifier_hidden = hidden, classifier_hidden or hidden
        self.alpha, self.target_ratio, self.margin = float(alpha), float(target_ratio), float(margin)
        self.check_interval = int(check_interval)
        self.ehr_embedding = nn.Sequential(nn.Linear(hidden, self.classifier_hidden), nn.ReLU())
        self.cxr_embedding = nn.Sequential(nn.Linear(hidden, self.classifier_hidden), nn.ReLU())
        self.ehr_boost = nn.ModuleList()
        self.cxr_boost = nn.ModuleList()
        self.output = nn.Linear(self.classifier_hidden, n_labels)
        self.epoch_scores = {modality: 0.0 for modality in MODALITIES}
        self.assignments: list[tuple[int, float, str | None]] = []  # (epoch, ratio, modality boosted)

    def classify(self, features: torch.Tensor, modality: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, logits without the newest boosting layer, the newest layer's own logits or None)."""
        embedding = self.ehr_embedding if modality == "ehr" else self.cxr_embedding
        logits = previous = self.output(embedding(features))
        newest = None
        for layer in self._boost(modality):
            previous, newest = logits, self.output(torch.relu(layer(features)))
            logits = logits + newest
        return logits, previous, newest

    def forward(self, batch: Batch) -> ModelOutput:
        """α·EHR + (1 − α)·CXR logits where the stay has an X-ray, the EHR logits elsewhere."""
        ehr, cxr, paired = self.encode(batch)
        ehr_logits = self.classify(ehr, "ehr")[0]
        cxr_logits = self.classify(cxr, "cxr")[0]
        mixed = self.alpha * ehr_logits + (1 - self.alpha) * cxr_logits
        return ModelOutput(torch.where(paired.unsqueeze(1), mixed, ehr_logits))

    def training_step(self, batch: Batch, step) -> torch.Tensor:
        """CareBench's manual optimisation: the EHR classifier's loss and step, then (on the batch's paired stays)
        the CXR classifier's, whose logits use the output layer the EHR step just updated; the epoch's scores
        accumulate. Returns α·EHR loss + (1 − α)·CXR loss."""
        multiclass = step.data.splits["train"].multiclass
        with step.autocast():
            ehr, cxr, paired = self.encode(batch)
            ehr_logits, ehr_previous, ehr_newest = self.classify(ehr, "ehr")
            every_row = torch.ones_like(paired)
            ehr_loss = boosting_loss(ehr_logits, ehr_previous, ehr_newest, batch.labels, every_row, multiclass)
        optimiser_step(step, ehr_loss)
        cxr_loss = torch.zeros((), device=ehr_loss.device)
        if bool(paired.any()):
            with step.autocast():
                cxr_logits, cxr_previous, cxr_newest = self.classify(cxr, "cxr")
                cxr_loss = boosting_loss(cxr_logits, cxr_previous, cxr_newest, batch.labels, paired, multiclass)
            optimiser_step(step, cxr_loss)
            self.epoch_scores["ehr"] += true_label_score(ehr_logits, batch.labels, paired, multiclass)
            self.epoch_scores["cxr"] += true_label_score(cxr_logits, batch.labels, paired, multiclass)
        return (self.alpha * ehr_loss + (1 - self.alpha) * cxr_loss).detach()

    def on_train_epoch_start(self, epoch: int, step) -> None:
        """Reset the epoch's score sums."""
        self.epoch_scores = {modality: 0.0 for modality in MODALITIES}

    def on_train_epoch_end(self, epoch: int, step) -> None:
        """Adaptive classifier assignment at the first and every ``check_interval``-th epoch (see the class
        docstring); an epoch without paired stays has no ratio and adds nothing."""
        if not is_check_epoch(epoch, self.check_interval) or self.epoch_scores["cxr"] <= 0:
            return
        ratio = self.epoch_scores["ehr"] / self.epoch_scores["cxr"]
        modality = weaker_modality(ratio, self.target_ratio, self.margin)
        self.assignments.append((epoch, ratio, modality))
        log.info("AUG epoch %d: EHR/CXR score ratio %.4f -> %s", epoch, ratio,
                 f"boosting layer {len(self._boost(modality)) + 1} for {modality}" if modality else "no layer")
        if modality is not None:
            self.add_boosting_layer(modality)
            self.group_boosting_parameters(step.optimizers[0])

    def _boost(self, modality: str) -> nn.ModuleList:
        return self.ehr_boost if modality == "ehr" else self.cxr_boost

    def add_boosting_layer(self, modality: str) -> None:
        """Append a boosting layer (Xavier-normal weight, zero bias) to ``modality``'s classifier."""
        layer = nn.Linear(self.hidden, self.classifier_hidden)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        self._boost(modality).append(layer.to(self.output.weight.device))

    def group_boosting_parameters(self, optimizer: torch.optim.Optimizer) -> None:
        """Hold every boosting layer's parameters in one last parameter group of ``optimizer`` (in module order, at
        the optimiser's initial settings, as the trainer registers new layers), replacing the group that held the
        earlier ones; their optimiser state stays. A resumed run, whose rebuilt layers the trainer registers as one
        new group, then has the same groups as an uninterrupted run (one group per added layer would not load)."""
        boosting = {id(p) for modality in MODALITIES for p in self._boost(modality).parameters()}
        optimizer.param_groups[:] = [group for group in optimizer.param_groups
                                     if not any(id(p) in boosting for p in group["params"])]
        optimizer.add_param_group({"params": [p for p in self.parameters() if id(p) in boosting]})

    def hook_state_dict(self) -> dict:
        """The number of boosting layers per modality and the assignment record."""
        return {"boosting_layers": {modality: len(self._boost(modality)) for modality in MODALITIES},
                "assignments": list(self.assignments)}

    def load_hook_state_dict(self, state: dict) -> None:
        """Rebuild (or drop) boosting layers to the saved counts, before the weights load."""
        for modality, count in state["boosting_layers"].items():
            layers = self._boost(modality)
            del layers[count:]
            while len(layers) < count:
                self.add_boosting_layer(modality)
        self.assignments = list(state["assignments"])
