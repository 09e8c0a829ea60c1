"""SMIL: Bayesian meta-learning for a severely missing modality (Ma, Ren, Zhao, Tulyakov, Wu & Peng, "SMIL:
Multimodal Learning with Severely Missing Modality", AAAI 2021; public code mengmenm/SMIL
``src/train_missing_eval_missing.py``, ``src/models/soundlenet5.py`` (``SoundLenet5New``), ``src/models/encoder_new.py``
(``InferNetNew``), ``src/models/loss.py`` (``KDLossAlignTwo``), ``src/get_sound_mean_kmean.py``), as CareBench
re-implements it for a missing X-ray (jakeykj/CareBench ``models/smil/smil_lighting.py``, ``smil_components.py``,
``compute_cxr_mean_kmeans.py``).

A missing X-ray feature is reconstructed from the EHR as a weighted mean of k-means prototypes of training X-ray
features; each batch is one meta-learning step (``training_step``): inner SGD steps on a meta-train split, then an
outer loss on a meta-validation split with the adapted parameters, where the paired stays' X-rays are hidden and
reconstructed and the predictions and features are distilled towards those with the real X-ray. The prototypes
are re-clustered from the current X-ray encoder on the training split's paired stays at the start of training and
of every epoch (``on_fit_start``, ``on_train_epoch_start``) and kept in a buffer (checkpoints, evaluation).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ehrcxr.data.datasets import StaySet
from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import EHRTransformerEncoder, build_cxr_backbone, encode_paired_cxr
from ehrcxr.models.modality_balance import optimiser_step, true_label_log_likelihood
from ehrcxr.models.registry import register
from ehrcxr.train.loop import prepare_batch

KMEANS_SEED = 42  # CareBench compute_cxr_mean_kmeans.py --random_state 42
META_VAL_DIVISOR = 5  # CareBench: batch_size // 5 rows (20%) form the meta-validation split
log = logging.getLogger(__name__)


def kmeans(points: torch.Tensor, clusters: int, seed: int = KMEANS_SEED, iterations: int = 100) -> torch.Tensor:
    """Centres (clusters, D) of Lloyd's k-means on ``points`` (N, D), started by k-means++ drawn from a generator
    seeded with ``seed``: the same points always give the same centres. An emptied cluster keeps its centre; with
    no more points than clusters the centres are the points, repeated; with none, zeros."""
    count = points.shape[0]
    if count == 0:
        return points.new_zeros(clusters, points.shape[1])
    if count <= clusters:
        return points[torch.arange(clusters) % count]
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(count, (1,), generator=generator)]
    nearest = (points - centres[0]).pow(2).sum(1)
    for _ in range(1, clusters):
        total = nearest.sum()
        chances = nearest / total if total > 0 else torch.full_like(nearest, 1.0 / count)
        chosen = points[torch.multinomial(chances, 1, generator=generator)]
        centres = torch.cat([centres, chosen])
        nearest = torch.minimum(nearest, (points - chosen).pow(2).sum(1))
    assignment = None
    for _ in range(iterations):
        closest = (centres.pow(2).sum(1) - 2 * points @ centres.T).argmin(1)  # nearest: |x|² is the same for all
        if assignment is not None and torch.equal(closest, assignment):
            break
        assignment = closest
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=clusters).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp_min(1), centres)
    return centres


def reconstruct(mean_weights: torch.Tensor, prototypes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """SMIL's reconstruction: w = softplus(mean_weights + noise) (noise (S, B, K), broadcast over the batch's
    (B, K) weights), and the w-weighted mean of the prototypes (K, D), Σ_k w_k p_k / Σ_k w_k -> (S, B, D)."""
    weights = F.softplus(mean_weights.float() + noise)
    return (weights @ prototypes.to(weights.dtype)) / weights.sum(-1, keepdim=True)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """The task loss (mean BCE, or CE) of (S, R, L) logits, one set per Monte-Carlo sample, against (R, L) labels:
    the mean over the samples."""
    repeated = labels.repeat(logits.shape[0], 1)
    return -true_label_log_likelihood(logits.flatten(0, 1), repeated, multiclass).mean()


def paired_mse(first: torch.Tensor, second: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two (S, R, D) tensors (or broadcastable to it) over the samples, the features and
    the rows R where ``paired`` (R,) holds; 0 when none does."""
    difference = first.float() - second.float()
    weight = paired.to(difference.dtype).unsqueeze(-1)
    per_row = difference.numel() // difference.shape[-2]  # S * D entries per row
    return (difference.pow(2) * weight).sum() / (weight.sum() * per_row).clamp_min(1.0)


def meta_validation_loss(noised: torch.Tensor, clean: torch.Tensor, noised_hidden: torch.Tensor,
                         clean_hidden: torch.Tensor, reconstruction: torch.Tensor, real: torch.Tensor,
                         paired: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, temperature: float,
                         multiclass: bool = False) -> torch.Tensor:
    """SMIL's outer loss on the meta-validation rows (CareBench ``SMILLoss.forward``), from the logits and fused
    hidden features (S, R, ·) of the noised pass (every X-ray reconstructed) and the clean pass (the real X-ray
    where the stay has one), the reconstructions (S, R, D) and the real X-ray features (R, D):

    task loss of the noised logits
    + MSE(p_noised / τ, p_clean / τ)                        (p: probabilities, as CareBench's sigmoid outputs)
    + α · MSE(fused hidden noised, fused hidden clean)      (CareBench's feature distillation)
    + β · MSE(reconstruction, real X-ray feature)           (CareBench's "mean" term; the real feature detached)

    Each distillation term counts the ``paired`` rows only: elsewhere the two passes share the reconstruction."""
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1) if multiclass else torch.sigmoid(logits.float())

    prediction = paired_mse(probabilities(noised) / temperature, probabilities(clean) / temperature, paired)
    features = paired_mse(noised_hidden, clean_hidden, paired)
    recovered = paired_mse(reconstruction, real.detach(), paired)
    return task_loss(noised, labels, multiclass) + prediction + alpha * features + beta * recovered


class PairedCXREncoder(nn.Module):
    """CareBench's X-ray encoder: the ResNet's pooled feature through Linear(-> hidden); only paired rows enter the
    CNN, and a row without an X-ray gets exact zeros."""

    def __init__(self, cxr: dict | None, hidden: int):
        super().__init__()
        self.backbone = build_cxr_backbone(cxr)
        self.projection = nn.Linear(self.backbone.out_dim, hidden)

    def forward(self, cxr: torch.Tensor, has_cxr: torch.Tensor) -> torch.Tensor:
        features = self.projection(encode_paired_cxr(self.backbone, cxr, has_cxr))
        return features * (has_cxr > 0.5).to(features.dtype).unsqueeze(1)


class FusionHead(nn.Module):
    """[EHR ∥ X-ray feature] -> Linear -> ReLU (the fused hidden feature) -> dropout -> Linear (CareBench's fc1,
    fc2)."""

    def __init__(self, hidden: int, head_hidden: int, n_labels: int, dropout: float):
        super().__init__()
        self.fuse = nn.Linear(2 * hidden, head_hidden)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(head_hidden, n_labels)

    def forward(self, ehr: torch.Tensor, cxr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused hidden feature, logits) of (..., hidden) EHR and X-ray features."""
        fused = torch.relu(self.fuse(torch.cat([ehr, cxr], dim=-1)))
        return fused, self.output(self.dropout(fused))


@register("smil")
class SMIL(nn.Module):
    """EHR Transformer and ResNet -> Linear encoders, a fusion head on [EHR ∥ X-ray], and for a stay without an
    X-ray a reconstructed X-ray feature: an inference network (EHR feature -> Linear(hidden) -> ReLU -> dropout ->
    Linear(hidden / 2) -> ReLU -> Linear(n_clusters), CareBench's 256 -> 128 at hidden 256) gives the mean weights
    μ of the ``n_clusters`` prototypes; the weights are softplus(μ + ε) and the reconstruction is their weighted
    mean of the prototypes (:func:`reconstruct`). Training draws ``mc_size`` samples ε ~ N(0, I) (SMIL's Bayesian
    weights, the public code's ``softplus(randn_like(x) + x)``) and averages the losses over them; prediction uses
    ε = 0. The reconstruction stands in for every missing X-ray, in training and in evaluation.

    Training (``training_step``, CareBench's ``training_step``): each batch is split at random into meta-train
    (80%) and meta-validation (20%) rows. ``inner_steps`` SGD steps at ``inner_lr`` on the meta-train loss (the task
    loss with each stay's own X-ray, reconstructed where missing) adapt every trainable parameter except the EHR
    encoder's, functionally and with the graph kept (second order); the outer loss is the meta-validation loss
    at the adapted parameters (:func:`meta_validation_loss`: every meta-validation X-ray reconstructed, distilled
    towards the pass with the real ones); the step minimises meta-train + meta-validation loss.

    Prototypes: k-means (:func:`kmeans`, fixed seed) of the X-ray features (encoder in eval mode) of the training
    split's paired stays, computed in ``on_fit_start`` and again at the start of every epoch from the current
    encoder; a buffer, so checkpoints and evaluation hold the ones the weights were trained with.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, max_len: int = 512, head_hidden: int = 64,
                 n_clusters: int = 10, mc_size: int = 5, inner_steps: int = 1, inner_lr: float = 0.01,
                 alpha: float = 0.05, beta: float = 0.05, temperature: float = 3.0):
        super().__init__()
        if int(n_clusters) < 1 or int(mc_size) < 1 or int(inner_steps) < 0 or inner_lr < 0 or temperature <= 0:
            raise ValueError(f"smil needs n_clusters >= 1, mc_size >= 1, inner_steps >= 0, inner_lr >= 0 and "
                             f"temperature > 0; got {n_clusters}, {mc_size}, {inner_steps}, {inner_lr}, {temperature}")
        self.mc_size, self.inner_steps, self.inner_lr = int(mc_size), int(inner_steps), float(inner_lr)
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.ehr_encoder = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers, dropout=dropout,
                                                 max_len=max_len)
        self.cxr_encoder = PairedCXREncoder(cxr, hidden)
        self.inference = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                       nn.Linear(hidden, max(hidden // 2, 1)), nn.ReLU(),
                                       nn.Linear(max(hidden // 2, 1), int(n_clusters)))
        self.head = FusionHead(hidden, head_hidden, n_labels, dropout)
        self.register_buffer("prototypes", torch.zeros(int(n_clusters), hidden))

    # ------------------------------------------------------------------------------------------- prediction
    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from [EHR ∥ real X-ray feature, or its reconstruction (ε = 0) where missing]."""
        ehr, _ = self.ehr_encoder(batch.ehr, batch.ehr_length)
        real = self.cxr_encoder(batch.cxr, batch.has_cxr)
        reconstruction = self.reconstruction(None, ehr, samples=0)[0]
        cxr = torch.where((batch.has_cxr > 0.5).unsqueeze(1), real, reconstruction)
        return ModelOutput(self.head(ehr, cxr)[1])

    def reconstruction(self, params: dict | None, ehr: torch.Tensor, samples: int) -> torch.Tensor:
        """(samples, B, hidden) reconstructed X-ray features of (B, hidden) EHR features, one per draw of ε ~ N(0, I);
        ``samples`` 0: one, at ε = 0. ``params``: functional parameters (None: the module's own)."""
        mean_weights = self._call(params, "inference", ehr)
        shape = (max(samples, 1), *mean_weights.shape)
        noise = (torch.randn(shape, device=ehr.device) if samples
                 else torch.zeros(shape, device=ehr.device))
        return reconstruct(mean_weights, self.prototypes, noise)

    def _call(self, params: dict | None, name: str, *args):
        """Child module ``name`` on ``args``, with the functional ``params`` (named from the model) it holds."""
        module = getattr(self, name)
        if params is None:
            return module(*args)
        prefix = f"{name}."
        own = {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}
        return functional_call(module, own, args)

    # ------------------------------------------------------------------------------------------- training
    def adaptable_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters the inner loop adapts: every trainable one outside the EHR encoder (CareBench)."""
        return {name: parameter for name, parameter in self.named_parameters()
                if parameter.requires_grad and not name.startswith("ehr_encoder.")}

    def _logits_with_own_xrays(self, params: dict, ehr: torch.Tensor, cxr: torch.Tensor, has_cxr: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fused hidden (S, R, ·), logits (S, R, L), reconstructions (S, R, D), real X-ray features (R, D)) of rows
        with their own X-rays, reconstructed (S = mc_size draws) where missing."""
        real = self._call(params, "cxr_encoder", cxr, has_cxr)
        reconstruction = self.reconstruction(params, ehr, self.mc_size)
        observed = torch.where((has_cxr > 0.5).unsqueeze(1), real, reconstruction)
        hidden, logits = self._call(params, "head", ehr.expand(observed.shape[0], -1, -1), observed)
        return hidden, logits, reconstruction, real

    def meta_losses(self, batch: Batch, train_rows: torch.Tensor, val_rows: torch.Tensor, multiclass: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta-train loss, meta-validation loss) of one batch split into ``train_rows`` and ``val_rows`` (index
        tensors). The meta-train loss is the one the last inner step descended (at the parameters before it; with
        ``inner_steps`` 0 it is the loss at the model's own parameters, and nothing is adapted); the
        meta-validation loss is taken at the adapted parameters. Without meta-validation rows it is 0."""
        ehr, _ = self.ehr_encoder(batch.ehr, batch.ehr_length)
        params = self.adaptable_parameters()
        inner_steps = self.inner_steps if val_rows.numel() else 0
        for inner in range(max(inner_steps, 1)):
            _, logits, _, _ = self._logits_with_own_xrays(params, ehr[train_rows], batch.cxr[train_rows],
                                                         batch.has_cxr[train_rows])
            meta_train_loss = task_loss(logits, batch.labels[train_rows], multiclass)
            if inner < inner_steps:
                gradients = torch.autograd.grad(meta_train_loss, list(params.values()), allow_unused=True,
                                                create_graph=True)
                params = {name: value if gradient is None else value - self.inner_lr * gradient
                          for (name, value), gradient in zip(params.items(), gradients)}
        if not val_rows.numel():
            return meta_train_loss, meta_train_loss.new_zeros(())
        has_cxr, ehr = batch.has_cxr[val_rows], ehr[val_rows]
        clean_hidden, clean, reconstruction, real = self._logits_with_own_xrays(params, ehr, batch.cxr[val_rows],
                                                                                has_cxr)
        noised_hidden, noised = self._call(params, "head", ehr.expand(reconstruction.shape[0], -1, -1),
                                           reconstruction)
        meta_val_loss = meta_validation_loss(noised, clean, noised_hidden, clean_hidden, reconstruction, real,
                                             has_cxr > 0.5, batch.labels[val_rows], self.alpha, self.beta,
                                             self.temperature, multiclass)
        return meta_train_loss, meta_val_loss

    def training_step(self, batch: Batch, step) -> torch.Tensor:
        """One meta-learning step: a random 80/20 meta-train / meta-validation split (at least one row each from
        two rows on), :meth:`meta_losses`, one optimiser step on their sum, which is returned."""
        size = len(batch)
        order = torch.randperm(size, device=batch.labels.device)
        val_count = min(max(size // META_VAL_DIVISOR, 1), size - 1)
        with step.autocast():
            meta_train_loss, meta_val_loss = self.meta_losses(batch, order[val_count:], order[:val_count],
                                                              step.data.splits["train"].multiclass)
            loss = meta_train_loss + meta_val_loss
        optimiser_step(step, loss)
        return loss.detach()

    # ------------------------------------------------------------------------------------------- prototypes
    def on_fit_start(self, data, inputs: dict) -> None:
        """Cluster the training split's X-ray features (after the trainer's frozen-prefix precomputation)."""
        self.refresh_prototypes(data.splits["train"])

    def on_train_epoch_start(self, epoch: int, step) -> None:
        """Re-cluster from the X-ray encoder as trained so far."""
        self.refresh_prototypes(step.data.splits["train"])

    @torch.no_grad()
    def refresh_prototypes(self, train: StaySet, batch_size: int = 512) -> None:
        """Set the prototypes to the k-means centres of the X-ray features of ``train``'s paired stays, encoded in
        eval mode (fp32) as the trainer serves them (images or precomputed prefix features); zeros without any."""
        rows = np.flatnonzero(train.has_cxr.numpy() > 0.5)
        device = self.prototypes.device
        was_training = self.cxr_encoder.training
        self.cxr_encoder.eval()
        chunks = []
        for start in range(0, rows.size, batch_size):
            batch = prepare_batch(train.collate(rows[start:start + batch_size].tolist()), device)
            chunks.append(self.cxr_encoder(batch.cxr, batch.has_cxr).double().cpu())
        self.cxr_encoder.train(was_training)
        features = torch.cat(chunks) if chunks else torch.zeros(0, self.prototypes.shape[1], dtype=torch.float64)
        self.prototypes.copy_(kmeans(features, self.prototypes.shape[0]).to(self.prototypes))
        log.info("SMIL: %d prototypes from the X-ray features of %d training stays", self.prototypes.shape[0],
                 rows.size)
