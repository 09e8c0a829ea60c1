"""Attention blocks shared by the fusion models: a Transformer over two token streams that exchange information by
cross-attention both ways (MulT's cross-modal layer as UTDE uses it; the EHR <-> X-ray fusion of cross_attention)."""
from __future__ import annotations

import torch
from torch import nn


def _attention(hidden: int, heads: int, dropout: float) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)


class BidirectionalCrossAttentionLayer(nn.Module):
    """One pre-norm layer over two token streams ``a`` (B, Na, D) and ``b`` (B, Nb, D).

    1. self-attention within each stream;
    2. cross-attention both ways, computed from the same normalised states: a's queries attend to b's tokens and
       b's queries to a's tokens;
    3. a position-wise feed-forward network per stream.

    Every sub-layer is residual, with dropout on its output (and on the attention weights). Key padding masks
    (True = padding) keep a stream's padded tokens out of every attention as keys; each row needs at least one
    unpadded token per stream. Padded positions still get (unused) outputs.
    """

    def __init__(self, hidden: int, heads: int, dropout: float = 0.1, feedforward: int | None = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        width = feedforward or 4 * hidden
        self.self_attention = nn.ModuleList([_attention(hidden, heads, dropout) for _ in range(2)])
        self.cross_attention = nn.ModuleList([_attention(hidden, heads, dropout) for _ in range(2)])  # a<-b, b<-a
        self.self_norm = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])
        self.cross_norm = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])
        self.feedforward_norm = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])
        self.feedforward = nn.ModuleList([
            nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, hidden))
            for _ in range(2)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_padding: torch.Tensor | None = None,
                b_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated streams (a, b), same shapes as the inputs."""
        streams, paddings = [a, b], [a_padding, b_padding]
        updated = []
        for stream, padding, norm, attention in zip(streams, paddings, self.self_norm, self.self_attention):
            normed = norm(stream)
            updated.append(stream + self.dropout(attention(normed, normed, normed, key_padding_mask=padding,
                                                           need_weights=False)[0]))
        normed = [norm(stream) for norm, stream in zip(self.cross_norm, updated)]
        a_from_b = self.cross_attention[0](normed[0], normed[1], normed[1], key_padding_mask=paddings[1],
                                           need_weights=False)[0]
        b_from_a = self.cross_attention[1](normed[1], normed[0], normed[0], key_padding_mask=paddings[0],
                                           need_weights=False)[0]
        updated = [updated[0] + self.dropout(a_from_b), updated[1] + self.dropout(b_from_a)]
        a, b = (stream + self.dropout(feedforward(norm(stream)))
                for stream, norm, feedforward in zip(updated, self.feedforward_norm, self.feedforward))
        return a, b


class BidirectionalCrossAttentionEncoder(nn.Module):
    """A stack of ``BidirectionalCrossAttentionLayer``s, then a final LayerNorm per stream."""

    def __init__(self, hidden: int, heads: int, layers: int = 1, dropout: float = 0.1,
                 feedforward: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList([BidirectionalCrossAttentionLayer(hidden, heads, dropout, feedforward)
                                     for _ in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])

    def forward(self, a: torch.Tensor, b: torch.Tensor, a_padding: torch.Tensor | None = None,
                b_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded streams (a (B, Na, D), b (B, Nb, D)); padding masks as in the layer."""
        for layer in self.layers:
            a, b = layer(a, b, a_padding, b_padding)
        return self.norms[0](a), self.norms[1](b)
