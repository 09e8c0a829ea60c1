"""UTDE (Zhang et al., ICML 2023, "Improving Medical Predictions by Irregular Multimodal Electronic Health Records
Modeling"; XZhang97666/MultimodalMIMIC ``model.py`` MULTCrossModel, ``module.py`` multiTimeAttention), with the X-ray
in the place of the clinical notes as in CareBench ``models/utde/utde_components.py``: the X-ray is a token placed
in EHR time, and the two modalities meet in a bidirectional cross-modal Transformer.

Two faults of CareBench's version are avoided (METHODS.md §3.2): it pools the EHR into one vector and repeats it
over 500 positions, so the fusion never sees the EHR's time course, and it spreads the X-ray over query times in
[0, 1] with its time in hours as the only key, so the attention has one key, weight 1 everywhere, and the X-ray's
time never reaches the output. Here every time is in hours since ICU admission: the EHR stays a sequence of hourly
tokens and the X-ray token carries the embedding of its own hour.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ehrcxr.models.attention import BidirectionalCrossAttentionEncoder
from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, checked_ehr_layout, encode_paired_cxr, padding_mask
from ehrcxr.models.registry import register


class TimeEmbedding(nn.Module):
    """UTDE's learned time embedding φ(t) = [w₀·t + b₀, sin(W·t + b)]: one linear and ``dim`` − 1 sinusoidal
    components of the time t in hours."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, dim - 1)

    def forward(self, hours: torch.Tensor) -> torch.Tensor:
        """Times (...) in hours -> float32 embeddings (..., dim), also under autocast (bf16 keeps 8 bits: W·t at
        t ≈ 48 h would be off by ~0.2 rad)."""
        hours = hours.float().unsqueeze(-1)
        with torch.autocast(hours.device.type, enabled=False):
            return torch.cat([self.linear(hours), torch.sin(self.periodic(hours))], dim=-1)


SCORE_FLOOR = -80.0  # e^-80 ≈ 1.8e-35, still a normal float32


def multi_time_attention(scores: torch.Tensor, values: torch.Tensor, observed: torch.Tensor,
                         value_variable: torch.Tensor) -> torch.Tensor:
    """mTAND's attention with a key mask per variable.

    scores (H, Q, K): attention scores of H heads between Q query times and K key times (one grid for the whole
    batch); values (B, K, C); observed (B, K, V) bool, whether each of V variables was observed at each key;
    value_variable (C,): the variable of each value channel. Returns (B, H, Q, C): per head, query and channel, the
    values averaged with the softmax of the scores over the keys where the channel's variable was observed; 0 for
    a channel never observed. Computed in float32 (also under autocast): the scores are shifted by each query's
    largest score over all K keys and floored at ``SCORE_FLOOR`` below it, so a channel observed only at keys
    scoring far below that maximum still gets a nonzero denominator (their plain mean where all are floored)
    instead of an underflow to 0.
    """
    with torch.autocast(values.device.type, enabled=False):
        scores = scores.float()
        weights = (scores - scores.amax(dim=-1, keepdim=True)).clamp_min(SCORE_FLOOR).exp()
        observed = observed.float()
        numerator = torch.einsum("hqk,bkc->bhqc", weights, values.float() * observed[..., value_variable])
        denominator = torch.einsum("hqk,bkv->bhqv", weights, observed)[..., value_variable]
        return numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def masked_max(tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Maximum over the unpadded steps of ``tokens`` (B, T, D) -> (B, D); ``padding`` (B, T) is True at padding."""
    return tokens.masked_fill(padding.unsqueeze(-1), float("-inf")).amax(dim=1)


@register("utde")
class UTDE(nn.Module):
    """UTDE for hourly EHR + one X-ray.

    EHR: two embeddings of each hourly step, mixed by UTDE's gate. The *imputation* embedding is UTDE's bias-free
    1-D convolution (``kernel_size`` hours, odd, centred; 1 by default as in the original) over the forward-filled
    hourly input, values and masks. The *irregular* embedding is mTAND:
    every hour queries, through learned time embeddings (1 linear + sinusoidal), the observed values of each
    variable — keys are only the hours where that variable was observed (``ehr_mask``), the step times are the hour
    indices — plus a flag per variable saying whether it was observed at all. A sigmoid gate computed from both
    embeddings' maxima over the stay's hours gives one mixing weight per stay (UTDE's default "batch" level).
    Each EHR token then gets the projected time embedding of its hour.

    X-ray: one token, the projected CNN feature plus the projected time embedding of the X-ray's hour,
    ``ehr_length − cxr_hours`` (cxr_hours counts back from the prediction time at the end of the last hour).

    Fusion: a bidirectional cross-modal Transformer (self-attention per stream, EHR <-> X-ray cross-attention);
    [EHR state at the last valid hour ∥ X-ray state] -> residual MLP -> Linear.

    A stay without an X-ray gets a learned no-X-ray token instead (no time), so neither its zero image nor its
    cxr_hours can reach the output; only paired rows pass through the CNN.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 128,
                 heads: int = 4, layers: int = 1, dropout: float = 0.2, time_dim: int = 64, kernel_size: int = 1):
        super().__init__()
        layout = checked_ehr_layout("utde", ehr_features)
        self.n_values, self.n_variables = len(layout.feature_names), len(layout.variables)
        if time_dim % heads:
            raise ValueError(f"time_dim ({time_dim}) must be divisible by heads ({heads})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (the output keeps one token per hour); "
                             f"got {kernel_size}")
        self.heads = heads
        self.register_buffer("value_variable", torch.as_tensor(layout.feature_variable, dtype=torch.long),
                             persistent=False)
        self.time_embedding = TimeEmbedding(time_dim)
        self.time_query = nn.Linear(time_dim, time_dim)
        self.time_key = nn.Linear(time_dim, time_dim)
        self.irregular_projection = nn.Linear(heads * self.n_values + self.n_variables, hidden)
        self.ehr_projection = nn.Conv1d(ehr_features, hidden, kernel_size, padding=kernel_size // 2,
                                               bias=False)
        self.gate = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1), nn.Sigmoid())
        for layer in (self.gate[1], self.gate[3]):
            nn.init.xavier_normal_(layer.weight)
        self.time_projection = nn.Linear(time_dim, hidden)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.cxr_projection = nn.Sequential(nn.Linear(self.cxr_backbone.out_dim, hidden), nn.ReLU(),
                                            nn.Dropout(dropout))
        self.no_xray = nn.Parameter(torch.zeros(hidden))
        self.fusion = BidirectionalCrossAttentionEncoder(hidden, heads, layers, dropout)
        self.residual = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(2 * hidden, 2 * hidden))
        self.head = nn.Linear(2 * hidden, n_labels)

    @staticmethod
    def xray_hours(batch: Batch) -> torch.Tensor:
        """(B,) the X-ray's time in EHR hours since admission: the prediction time (``ehr_length``) − cxr_hours."""
        return batch.ehr_length.to(batch.cxr_hours.dtype) - batch.cxr_hours

    def irregular_embedding(self, batch: Batch, step_times: torch.Tensor) -> torch.Tensor:
        """mTAND embedding (B, T, hidden) of the observed EHR values, queried at every hour; ``step_times`` (T, D)
        are the time embeddings of the hours 0..T-1."""
        if batch.ehr_mask.shape[-1] != self.n_variables:
            raise ValueError(f"ehr_mask must have {self.n_variables} variables; got {tuple(batch.ehr_mask.shape)}")
        size, steps, _ = batch.ehr.shape
        head_dim = step_times.shape[-1] // self.heads
        queries = self.time_query(step_times).view(steps, self.heads, head_dim).transpose(0, 1)
        keys = self.time_key(step_times).view(steps, self.heads, head_dim).transpose(0, 1)
        scores = queries @ keys.transpose(1, 2) / math.sqrt(head_dim)
        observed_variable = (batch.ehr_mask > 0.5) & ~padding_mask(batch.ehr_length, steps).unsqueeze(-1)
        attended = multi_time_attention(scores, batch.ehr[..., :self.n_values], observed_variable,
                                        self.value_variable)
        ever_observed = observed_variable.any(dim=1).to(batch.ehr.dtype)
        features = torch.cat([attended.permute(0, 2, 1, 3).reshape(size, steps, -1),
                              ever_observed.unsqueeze(1).expand(-1, steps, -1)], dim=-1)
        return self.irregular_projection(features)

    def ehr_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """EHR stream (B, T, hidden) — gated mix of the imputation and mTAND embeddings plus the hour's time
        embedding — and its padding mask (B, T)."""
        steps = batch.ehr.shape[1]
        step_times = self.time_embedding(torch.arange(steps, device=batch.ehr.device, dtype=batch.ehr.dtype))
        padding = padding_mask(batch.ehr_length, steps)
        hourly = batch.ehr.masked_fill(padding.unsqueeze(-1), 0.0)  # a kernel > 1 must not read padded hours
        imputed = self.ehr_projection(hourly.transpose(1, 2)).transpose(1, 2)
        irregular = self.irregular_embedding(batch, step_times)
        weight = self.gate(torch.cat([masked_max(irregular, padding), masked_max(imputed, padding)], dim=1))
        mixed = weight.unsqueeze(1) * irregular + (1 - weight.unsqueeze(1)) * imputed
        return mixed + self.time_projection(step_times), padding

    def xray_token(self, batch: Batch) -> torch.Tensor:
        """X-ray stream (B, 1, hidden): CNN feature + embedding of the X-ray's hour, or the no-X-ray token."""
        features = self.cxr_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr))
        token = features + self.time_projection(self.time_embedding(self.xray_hours(batch)))
        paired = (batch.has_cxr > 0.5).unsqueeze(1)
        return torch.where(paired, token, self.no_xray.to(token.dtype)).unsqueeze(1)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels); no auxiliary losses."""
        ehr, padding = self.ehr_tokens(batch)
        ehr, xray = self.fusion(ehr, self.xray_token(batch), a_padding=padding)
        last = ehr[torch.arange(ehr.shape[0], device=ehr.device), batch.ehr_length.to(torch.long) - 1]
        state = torch.cat([last, xray[:, 0]], dim=1)
        return ModelOutput(self.head(state + self.residual(state)))
