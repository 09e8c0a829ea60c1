"""DrFuse (Yao et al., AAAI 2024): disentangled shared/distinct features + disease-wise attention.

Re-implements dorothy-yao/drfuse (`models/drfuse.py`, `models/drfuse_trainer.py`) as described
in METHODS.md §3.4. The losses follow the released trainer: the orthogonality terms compare the
*projected* shared feature with the distinct one, and each attention-ranking term is divided by its
number of violated entries. Two bugs of the original are fixed on purpose: the CXR bodies pool (GAP)
before their Linear head and use the standard ResNet stem, and the JSD (like every CXR term) only counts
paired stays (the original sums unpaired rows too but divides by the paired count).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (EHRTransformerEncoder, build_cxr_backbone, encode_paired_cxr,
                                    masked_mean, padding_mask, transformer_encoder)
from ehrcxr.models.registry import register

_LOG2 = math.log(2.0)


def logit_average_pool(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """logit((σ(h1) + σ(h2)) / 2), elementwise, computed stably in log-sum-exp form.

    = LSE(h1+h2, h1+h2, h1, h2) − LSE(0, 0, h1, h2).
    """
    both = h1 + h2
    numerator = torch.logsumexp(torch.stack([both, both, h1, h2]), dim=0)
    zero = torch.zeros_like(h1)
    return numerator - torch.logsumexp(torch.stack([zero, zero, h1, h2]), dim=0)


def masked_jsd(h1: torch.Tensor, h2: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between σ(h1) and σ(h2) (unnormalised vectors, summed over
    features), averaged over the rows where ``paired`` is True; 0 when no row is paired."""
    h1, h2 = h1[paired], h2[paired]
    log_p, log_q = F.logsigmoid(h1), F.logsigmoid(h2)
    log_m = torch.logaddexp(log_p, log_q) - _LOG2
    per_row = 0.5 * (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m)).sum(dim=1)
    return per_row.sum() / max(int(paired.sum()), 1)


def attention_rank_loss(attention: torch.Tensor, loss_ehr: torch.Tensor, loss_shared: torch.Tensor,
                        loss_cxr: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
    """DrFuse's disease-wise attention ranking loss (margin 0), paired rows only.

    attention (B, C, 3): weights of the [EHR-distinct, shared, CXR-distinct] tokens per disease;
    loss_* (B, C): detached per-disease losses of the three heads. For the pairs (CXR, EHR),
    (shared, EHR) and (shared, CXR) the first token should get more attention when its head has
    the lower loss (target +1, else −1). As in drfuse_trainer.py, each term is the sum of its
    paired entries' losses divided by the number of violated entries (loss > 0), so it does not
    fade as violations become rare; a term without violations is 0. The three terms are averaged.
    """
    attention = attention[paired]
    losses = {"ehr": loss_ehr[paired], "shared": loss_shared[paired], "cxr": loss_cxr[paired]}
    slots = {"ehr": 0, "shared": 1, "cxr": 2}
    terms = []
    for first, second in (("cxr", "ehr"), ("shared", "ehr"), ("shared", "cxr")):
        target = torch.where(losses[first] < losses[second], 1.0, -1.0).to(attention.dtype)
        entries = F.margin_ranking_loss(attention[..., slots[first]], attention[..., slots[second]],
                                        target, margin=0.0, reduction="none")
        terms.append(entries.sum() / (entries > 0).sum().clamp(min=1))
    return torch.stack(terms).mean()


def _masked_abs_cosine(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean |cos(x, y)| over the selected rows; 0 when none is selected."""
    return F.cosine_similarity(x[rows], y[rows], dim=1).abs().sum() / max(int(rows.sum()), 1)


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the selected rows and all labels; 0 when none is selected."""
    selected = F.binary_cross_entropy_with_logits(logits[rows], labels[rows], reduction="sum")
    return selected / max(int(rows.sum()) * labels.shape[1], 1)


@register("drfuse")
class DrFuse(nn.Module):
    """DrFuse with a Transformer EHR branch and a two-body ResNet CXR branch.

    EHR: a shared Transformer trunk, then two separate 1-layer encoders giving the shared
    (h_E^sh) and distinct (h_E^di) features, mean-pooled over valid steps. CXR: the backbone gives
    h_C^di and ``backbone.branch()`` (same frozen prefix, own later stages) gives h_C^sh, each
    GAP -> Linear(out_dim -> hidden). Both shared features go through one projection MLP and
    are pooled in logit space for paired stays. The final prediction is disease-wise attention
    over [h_E^di, s, h_C^di].
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, max_len: int = 512,
                 lambda_shared: float = 1.0, lambda_ehr: float = 1.0, lambda_cxr: float = 1.0,
                 lambda_jsd: float = 1.0, lambda_orth_ehr: float = 1.0, lambda_orth_cxr: float = 1.0,
                 lambda_attn: float = 1.0):
        super().__init__()
        self.n_labels, self.hidden = n_labels, hidden
        self.lambdas = {"shared": lambda_shared, "ehr": lambda_ehr, "cxr": lambda_cxr, "jsd": lambda_jsd,
                        "orth_ehr": lambda_orth_ehr, "orth_cxr": lambda_orth_cxr, "attn_rank": lambda_attn}
        self.ehr_trunk = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers,
                                               dropout=dropout, max_len=max_len)
        self.ehr_shared_encoder = transformer_encoder(hidden, heads, 1, dropout)
        self.ehr_distinct_encoder = transformer_encoder(hidden, heads, 1, dropout)
        self.cxr_distinct_backbone = build_cxr_backbone(cxr)
        self.cxr_shared_backbone = self.cxr_distinct_backbone.branch()
        out_dim = self.cxr_distinct_backbone.out_dim
        self.cxr_distinct_fc = nn.Linear(out_dim, hidden)
        self.cxr_shared_fc = nn.Linear(out_dim, hidden)
        self.shared_projection = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(),
                                               nn.Linear(2 * hidden, hidden), nn.ReLU(),
                                               nn.Linear(hidden, hidden))
        self.head_shared = nn.Linear(hidden, n_labels)
        self.head_ehr = nn.Linear(hidden, n_labels)
        self.head_cxr = nn.Linear(hidden, n_labels)
        self.attention_projection = nn.Linear(hidden, (2 + n_labels) * hidden)
        self.head_final = nn.Linear(hidden, n_labels)

    def encode_ehr(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_E^sh, h_E^di), each (B, hidden)."""
        _, tokens = self.ehr_trunk(batch.ehr, batch.ehr_length)
        mask = padding_mask(batch.ehr_length, tokens.shape[1])
        shared = masked_mean(self.ehr_shared_encoder(tokens, src_key_padding_mask=mask), batch.ehr_length)
        distinct = masked_mean(self.ehr_distinct_encoder(tokens, src_key_padding_mask=mask), batch.ehr_length)
        return shared, distinct

    def encode_cxr(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_C^sh, h_C^di), each (B, hidden); zeros for stays without an X-ray."""
        paired = (batch.has_cxr > 0.5).unsqueeze(1)
        shared = self.cxr_shared_fc(encode_paired_cxr(self.cxr_shared_backbone, batch.cxr, batch.has_cxr))
        distinct = self.cxr_distinct_fc(encode_paired_cxr(self.cxr_distinct_backbone, batch.cxr, batch.has_cxr))
        zero = shared.new_zeros(())
        return torch.where(paired, shared, zero), torch.where(paired, distinct, zero)

    def disease_attention(self, tokens: torch.Tensor, paired: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Disease-wise attention over tokens (B, 3, hidden) -> (final logits (B, C), weights (B, C, 3))."""
        batch_size, n_tokens, hidden = tokens.shape
        projected = self.attention_projection(tokens).view(batch_size, n_tokens, 2 + self.n_labels, hidden)
        query, value, keys = projected[:, :, 0], projected[:, :, 1], projected[:, :, 2:]
        available = torch.ones(batch_size, n_tokens, dtype=torch.bool, device=tokens.device)
        available[:, 2] = paired
        weights = available.to(tokens.dtype).unsqueeze(-1)
        query_mean = (query * weights).sum(1) / weights.sum(1)
        scores = torch.einsum("bh,bnch->bcn", query_mean, keys) / math.sqrt(hidden)
        scores = scores.masked_fill(~available.unsqueeze(1), float("-inf"))
        attention = scores.softmax(dim=-1)
        fused = torch.einsum("bcn,bnh->bch", attention, value)
        logits = torch.einsum("bch,ch->bc", fused, self.head_final.weight) + self.head_final.bias
        return logits, attention

    def forward(self, batch: Batch) -> ModelOutput:
        """Final (attention) logits plus the seven λ-weighted auxiliary losses."""
        paired = batch.has_cxr > 0.5
        ehr_shared, ehr_distinct = self.encode_ehr(batch)
        cxr_shared, cxr_distinct = self.encode_cxr(batch)
        ehr_projected = self.shared_projection(ehr_shared)
        cxr_projected = self.shared_projection(cxr_shared)
        pooled = torch.where(paired.unsqueeze(1), logit_average_pool(ehr_projected, cxr_projected),
                             ehr_projected)
        logits_shared = self.head_shared(pooled)
        logits_ehr = self.head_ehr(ehr_distinct)
        logits_cxr = self.head_cxr(cxr_distinct)
        tokens = torch.stack([ehr_distinct, pooled, cxr_distinct], dim=1)
        logits, attention = self.disease_attention(tokens, paired)

        labels = batch.labels.to(logits.dtype)
        all_rows = torch.ones_like(paired)
        with torch.no_grad():
            per_label = {name: F.binary_cross_entropy_with_logits(head_logits, labels, reduction="none")
                         for name, head_logits in (("ehr", logits_ehr), ("shared", logits_shared),
                                                   ("cxr", logits_cxr))}
        unweighted = {
            "shared": _masked_bce(logits_shared, labels, all_rows),
            "ehr": _masked_bce(logits_ehr, labels, all_rows),
            "cxr": _masked_bce(logits_cxr, labels, paired),
            "jsd": masked_jsd(ehr_projected, cxr_projected, paired),
            "orth_ehr": _masked_abs_cosine(ehr_projected, ehr_distinct, all_rows),
            "orth_cxr": _masked_abs_cosine(cxr_projected, cxr_distinct, paired),
            "attn_rank": attention_rank_loss(attention, per_label["ehr"], per_label["shared"],
                                             per_label["cxr"], paired),
        }
        aux = {name: self.lambdas[name] * value for name, value in unweighted.items()}
        return ModelOutput(logits, aux)
