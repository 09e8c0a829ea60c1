"""UMSE (Lee et al., MLHC 2023, "Learning Missing Modal Electronic Health Records with Unified Multi-modal Data
Embedding and Modality-Aware Attention"): every EHR measurement is one (time, variable, value) token, the X-ray's
patch tokens carry the embedding of the X-ray's time in the same hours, and the two modalities meet only through
MBT bottleneck tokens (Nagrani et al., NeurIPS 2021) whose update skips the modality a stay lacks ("skip
bottleneck"). Public code: the authors' ``builder/models/src/transformer/mbt_encoder.py``
(``BimodalTransformerEncoder_MBT``) and ``builder/models/*`` (``ie_vslt``/``ie_time``/``ie_feat`` embeddings); the
EHR + X-ray version of CareBench ``models/umse/umse_components.py`` (``MLHC``, ``LearnableAttentionWeighting``),
``umse_lightning.py``, ``datasets/dataset.py`` (``use_triplet``).

Deviations (docs/MODELS.md, ``### umse``): the X-ray patches are the positions of the CNN's last feature map
(CareBench: a MONAI patch embedding of the raw image); a categorical variable's value is a learned embedding of its
category; the triplet set gets no sequence positions (the original UMSE; CareBench adds the triplet's index in the
time-sorted list); an unpaired stay's summary is its EHR summary alone and only paired rows enter the X-ray stream
(CareBench encodes the zero image and weights its summary in).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import build_cxr_backbone, checked_ehr_layout, padding_mask
from ehrcxr.models.registry import register


class ScalarEmbedding(nn.Module):
    """UMSE's embedding of one number (a value or a time in hours): Linear(1 -> dim) -> LayerNorm -> ReLU."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1, dim), nn.LayerNorm(dim), nn.ReLU())

    def forward(self, scalars: torch.Tensor) -> torch.Tensor:
        """(...) numbers -> float32 embeddings (..., dim), also under autocast (bf16 keeps 8 bits of an hour)."""
        with torch.autocast(scalars.device.type, enabled=False):
            return self.layers(scalars.float().unsqueeze(-1))


def sinusoidal_positions(count: int, dim: int, device: torch.device) -> torch.Tensor:
    """The Transformer's sine/cosine position table (count, dim): sin at even, cos at odd channels."""
    position = torch.arange(count, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(count, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, :dim // 2]
    return table


def observed_triplets(ehr_mask: torch.Tensor, lengths: torch.Tensor, max_tokens: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The observed measurements of each stay as triplet coordinates, the most recent ``max_tokens`` kept.

    ehr_mask (B, T, V) observation flags, lengths (B,) valid hours. A measurement is (hour t, variable v) with
    ``ehr_mask > 0.5`` and t < length. Per stay they are ordered by hour, then variable; when a stay has more than
    ``max_tokens`` the oldest are dropped. Returns (row, hour, variable, slot) of the N kept measurements — slot is
    the token's place in its stay's sequence, 0..kept−1 — and the kept count per stay (B,).
    """
    size, steps, variables = ehr_mask.shape
    observed = (ehr_mask > 0.5) & ~padding_mask(lengths, steps).unsqueeze(-1)
    flat = observed.reshape(size, steps * variables)  # hour-major: index = t * V + v
    count = flat.sum(dim=1)
    kept = count.clamp(max=max_tokens)
    slot = flat.cumsum(dim=1) - 1 - (count - kept).unsqueeze(1)  # rank among the stay's measurements − dropped
    row, index = (flat & (slot >= 0)).nonzero(as_tuple=True)
    return row, index // variables, index % variables, slot[row, index], kept


@register("umse")
class UMSE(nn.Module):
    """UMSE for hourly EHR + one X-ray.

    EHR: one token per observed measurement (``ehr_mask``, hours before ``ehr_length``), at most ``max_ehr_len``
    per stay (the most recent): embedding of its variable + embedding of its value (UMSE's Linear -> LayerNorm ->
    ReLU of the z-scored value; a learned embedding per category for the 5 categorical variables, read from their
    one-hot channels) + embedding of its hour (the same form, hours since admission, hour k for the bin [k, k+1)).

    X-ray: the h·w positions of the CNN's last feature map, Linear(channels -> hidden) + the embedding of the
    X-ray's hour (``ehr_length − cxr_hours``, by the EHR's time embedding) + an "X-ray" variable embedding.

    Fusion (MBT with UMSE's skip bottleneck): each modality's sequence is [CLS ∥ tokens], LayerNorm (+ sinusoidal
    positions for the patches) and dropout. In each of ``layers`` layers each modality's own post-norm Transformer
    layer reads [bottleneck tokens ∥ its sequence]; the next bottleneck is the mean of the two modalities'
    bottleneck outputs for a stay with an X-ray, the EHR's output alone for one without. The prediction reads
    softmax(w)-weighted CLS outputs, w learned (for a stay without an X-ray: its EHR CLS alone), through
    Linear -> ReLU -> dropout -> Linear.

    Only paired rows (``has_cxr > 0.5``) enter the CNN and the X-ray stream, so an unpaired stay's output is the
    EHR-only path exactly. With ``layers=1`` the updated bottleneck is never read (as in CareBench's setting) and the
    modalities meet only in the weighted summaries.
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 heads: int = 4, layers: int = 2, bottlenecks: int = 1, dropout: float = 0.2,
                 max_ehr_len: int = 48):
        super().__init__()
        layout = checked_ehr_layout("umse", ehr_features)
        self.n_values, self.n_variables = len(layout.feature_names), len(layout.variables)
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if layers < 1 or bottlenecks < 1 or max_ehr_len < 1:
            raise ValueError(f"layers, bottlenecks and max_ehr_len must be >= 1; got {layers}, {bottlenecks}, "
                             f"{max_ehr_len}")
        self.max_ehr_len = int(max_ehr_len)
        self.register_layout(layout)

        self.ehr_variable = nn.Embedding(self.n_variables + 1, hidden)  # + 1: the X-ray's "variable"
        self.ehr_value = ScalarEmbedding(hidden)
        self.ehr_category = nn.Embedding(int(self.category_row.max()) + 1, hidden)
        self.time_embedding = ScalarEmbedding(hidden)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.patch_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)

        self.ehr_cls = nn.Parameter(torch.randn(1, 1, hidden))
        self.xray_cls = nn.Parameter(torch.randn(1, 1, hidden))
        self.bottleneck = nn.Parameter(torch.randn(1, bottlenecks, hidden))
        self.ehr_input_norm = nn.LayerNorm(hidden)
        self.xray_input_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.ehr_layers = nn.ModuleList([self.encoder_layer(hidden, heads, dropout) for _ in range(layers)])
        self.xray_layers = nn.ModuleList([self.encoder_layer(hidden, heads, dropout) for _ in range(layers)])
        self.summary_logits = nn.Parameter(torch.ones(2))  # CareBench LearnableAttentionWeighting: w1 = w2 = 1
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_labels))

    @staticmethod
    def encoder_layer(hidden: int, heads: int, dropout: float) -> nn.TransformerEncoderLayer:
        """One post-norm Transformer layer (FFN 4·hidden, ReLU), as CareBench's torch TransformerEncoderLayer."""
        return nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                          batch_first=True)

    def register_layout(self, layout) -> None:
        """Per-variable lookups of the 59 value channels: ``value_column`` (V,) a variable's first channel (its
        z-scored value if continuous), ``category_columns`` (V, K) a categorical variable's one-hot channels (−1
        padded), ``category_row`` (V, K) their rows in the category table (−1 elsewhere), ``categorical`` (V,)."""
        columns = [torch.nonzero(torch.as_tensor(layout.feature_variable) == v).flatten()
                   for v in range(self.n_variables)]
        width = max(len(c) for c in columns)
        category_columns = torch.full((self.n_variables, width), -1, dtype=torch.long)
        category_row = torch.full((self.n_variables, width), -1, dtype=torch.long)
        next_row = 0
        for variable, variable_columns in enumerate(columns):
            if layout.categorical[variable]:
                category_columns[variable, :len(variable_columns)] = variable_columns
                category_row[variable, :len(variable_columns)] = torch.arange(next_row,
                                                                              next_row + len(variable_columns))
                next_row += len(variable_columns)
        self.register_buffer("value_column", torch.stack([c[0] for c in columns]), persistent=False)
        self.register_buffer("category_columns", category_columns, persistent=False)
        self.register_buffer("category_row", category_row, persistent=False)
        self.register_buffer("categorical", torch.as_tensor(layout.categorical, dtype=torch.bool), persistent=False)

    def ehr_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Triplet tokens (B, L, hidden), L the longest kept sequence of the batch, and their padding mask (B, L)."""
        if batch.ehr_mask.shape[-1] != self.n_variables:
            raise ValueError(f"ehr_mask must have {self.n_variables} variables; got {tuple(batch.ehr_mask.shape)}")
        row, hour, variable, slot, kept = observed_triplets(batch.ehr_mask, batch.ehr_length, self.max_ehr_len)
        values = batch.ehr[row, hour, :self.n_values]  # (N, 59) the hour's value channels
        category_columns = self.category_columns[variable]  # (N, K)
        one_hot = values.gather(1, category_columns.clamp_min(0)).masked_fill(category_columns < 0, -1.0)
        category = self.category_row[variable].gather(1, one_hot.argmax(dim=1, keepdim=True)).squeeze(1)
        continuous = self.ehr_value(values.gather(1, self.value_column[variable].unsqueeze(1)).squeeze(1))
        value = torch.where(self.categorical[variable].unsqueeze(1), self.ehr_category(category.clamp_min(0)),
                            continuous)
        embedded = self.ehr_variable(variable) + value + self.time_embedding(hour)
        length = int(kept.max())
        tokens = embedded.new_zeros(batch.ehr.shape[0], length, embedded.shape[1])
        return tokens.index_put((row, slot), embedded), padding_mask(kept, length)

    def xray_tokens(self, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Patch tokens (P, h·w, hidden) of the paired ``rows``: projected feature-map positions + the embedding of
        the X-ray's hour + the X-ray variable embedding."""
        feature_map = self.cxr_backbone.feature_map(batch.cxr[rows])
        patches = self.patch_projection(feature_map.flatten(2).transpose(1, 2))
        hours = batch.ehr_length[rows].to(batch.cxr_hours.dtype) - batch.cxr_hours[rows]
        marker = self.ehr_variable.weight[self.n_variables]
        return patches + (self.time_embedding(hours) + marker).unsqueeze(1).to(patches.dtype)

    def fuse(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """MBT with the skip bottleneck. Returns the EHR CLS outputs (B, hidden), the paired rows (P,), their
        X-ray CLS outputs (P, hidden) and the bottleneck after each layer [(B, n_bottlenecks, hidden)]."""
        size = batch.ehr.shape[0]
        tokens, token_padding = self.ehr_tokens(batch)
        ehr = torch.cat([self.ehr_cls.expand(size, -1, -1).to(tokens.dtype), tokens], dim=1)
        ehr = self.dropout(self.ehr_input_norm(ehr))
        bottleneck = self.bottleneck.expand(size, -1, -1)
        n_bottlenecks = bottleneck.shape[1]
        unpadded = token_padding.new_zeros(size, n_bottlenecks + 1)  # bottlenecks and CLS are always keys
        ehr_padding = torch.cat([unpadded, token_padding], dim=1)

        rows = (batch.has_cxr > 0.5).nonzero(as_tuple=True)[0]
        paired = rows.numel() > 0
        if paired:
            patches = self.xray_tokens(batch, rows)
            xray = torch.cat([self.xray_cls.expand(rows.numel(), -1, -1).to(patches.dtype), patches], dim=1)
            positions = sinusoidal_positions(xray.shape[1], xray.shape[2], xray.device)
            xray = self.dropout(self.xray_input_norm(xray) + positions)

        bottlenecks = []
        for ehr_layer, xray_layer in zip(self.ehr_layers, self.xray_layers):
            ehr = ehr_layer(torch.cat([bottleneck.to(ehr.dtype), ehr], dim=1), src_key_padding_mask=ehr_padding)
            ehr_update, ehr = ehr[:, :n_bottlenecks], ehr[:, n_bottlenecks:]
            if paired:
                xray = xray_layer(torch.cat([bottleneck[rows].to(xray.dtype), xray], dim=1))
                xray_update, xray = xray[:, :n_bottlenecks], xray[:, n_bottlenecks:]
                both = (ehr_update[rows] + xray_update.to(ehr_update.dtype)) / 2
                ehr_update = ehr_update.index_put((rows,), both)  # skip bottleneck: the mean only where paired
            bottleneck = ehr_update
            bottlenecks.append(bottleneck)
        xray_summary = xray[:, 0] if paired else ehr.new_zeros(0, ehr.shape[2])
        return ehr[:, 0], rows, xray_summary, bottlenecks

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels); no auxiliary losses."""
        ehr_summary, rows, xray_summary, _ = self.fuse(batch)
        weight = torch.softmax(self.summary_logits, dim=0)
        mixed = weight[0] * ehr_summary[rows] + weight[1] * xray_summary.to(ehr_summary.dtype)
        return ModelOutput(self.head(ehr_summary.index_put((rows,), mixed)))
