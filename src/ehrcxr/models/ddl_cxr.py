"""DDL-CXR's prediction model (Yao et al., NeurIPS 2024; Chenliu-svg/DDL-CXR ``ldm/models/predict_model.py``,
``FusionTokens3inputAttnFuse``): EHR tokens, patch tokens of the X-ray latent generated for prediction time
(``ehrcxr.ddl``) and one token of the last real X-ray, fused by a Transformer."""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import (EHRTransformerEncoder, build_cxr_backbone, encode_paired_cxr, padding_mask,
                                    transformer_encoder)
from ehrcxr.models.registry import register

GENERATED_INPUT = "ddl_generated"  # the cell input holding the generator's latents (rule ddl_generate)


@register("ddl_cxr")
class DDLCXR(nn.Module):
    """[EHR step tokens ∥ generated-latent patch tokens ∥ last-X-ray token ∥ no-X-ray token] + token-type embeddings
    -> fusion Transformer -> mean over kept tokens -> MLP head (the original: 512 -> 128 -> C; here width -> width
    -> C, since a quarter of a CPU-sized width would squeeze 25 phenotypes through 16 units).

    The generated latents of the cell's stays come from the ``ddl_generated`` input (one ``.npz`` per generator),
    read in ``on_fit_start``, which also builds the patch embedding for their shape; a batch looks its stays up by
    stay_id. A stay without an X-ray (none in the window, or withheld) has no x₀ to condition on, so it has no
    generated latent either: its patch and X-ray tokens are masked out and a learned no-X-ray token stands in (the
    original's cohort requires x₀ and never meets this case).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64, heads: int = 4,
                 layers: int = 1, dropout: float = 0.3, patch: int = 2, feedforward: int | None = None,
                 max_len: int = 512):
        super().__init__()
        self.hidden, self.heads, self.dropout_rate, self.patch = hidden, heads, dropout, int(patch)
        self.feedforward = feedforward or hidden // 2  # the original: width 512, FFN 256
        self.ehr_encoder = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=layers, dropout=dropout,
                                                 max_len=max_len, feedforward=self.feedforward)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.x0_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
        self.no_xray = nn.Parameter(torch.zeros(1, 1, hidden))
        self.token_type = nn.Embedding(4, hidden)  # EHR, generated patch, last X-ray, no X-ray
        self.fusion = transformer_encoder(hidden, heads, 1, dropout, self.feedforward)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_labels))
        self.patch_embed: nn.Module | None = None
        self.register_buffer("generated_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("generated_latents", torch.zeros(0), persistent=False)

    def on_fit_start(self, data, inputs: dict) -> None:
        """Read the generated latents (``inputs['ddl_generated']``) and build the patch tokeniser for their shape."""
        from ehrcxr.ddl.generation import load_generated

        if not inputs.get(GENERATED_INPUT):
            raise ValueError(f"model ddl_cxr needs the {GENERATED_INPUT!r} input (its generator's generated.npz); "
                             "give the config entry a `generator:`")
        self.set_generated(**{key: torch.from_numpy(value) for key, value in
                              load_generated(inputs[GENERATED_INPUT]).items() if key != "x0_age_hours"})

    def set_generated(self, stay_id: torch.Tensor, latents: torch.Tensor) -> None:
        """Use ``latents`` (N, C, h, w) as the generated X-ray latents of the stays ``stay_id`` (N,)."""
        channels, height, width = (int(v) for v in latents.shape[1:])
        if height % self.patch or width % self.patch:
            raise ValueError(f"ddl_cxr patch {self.patch} does not divide the generated latent's {height}x{width}")
        order = torch.argsort(stay_id)
        device = self.no_xray.device
        self.generated_ids = stay_id[order].to(device)
        self.generated_latents = latents[order].float().to(device)
        if self.patch_embed is None:
            patches = (height // self.patch) * (width // self.patch)
            self.patch_embed = nn.Linear(channels * self.patch ** 2, self.hidden).to(device)
            self.patch_position = nn.Parameter(torch.empty(1, patches, self.hidden, device=device).uniform_(-0.1, 0.1))
            self.patch_norm = nn.LayerNorm(self.hidden).to(device)
            self.patch_encoder = transformer_encoder(self.hidden, self.heads, 1, self.dropout_rate,
                                                     self.feedforward).to(device)

    def _generated(self, batch: Batch) -> torch.Tensor:
        """The generated latents of the batch's stays with an X-ray (zeros elsewhere)."""
        if self.patch_embed is None:
            raise RuntimeError("ddl_cxr has no generated latents: on_fit_start (or set_generated) was not called")
        present = batch.has_cxr > 0.5
        position = torch.searchsorted(self.generated_ids, batch.stay_id).clamp(max=self.generated_ids.numel() - 1)
        found = self.generated_ids[position] == batch.stay_id
        if bool((present & ~found).any()):
            stay = int(batch.stay_id[present & ~found][0])
            raise ValueError(f"stay_id {stay} has an X-ray but no generated latent (generated.npz of another cohort?)")
        return self.generated_latents[position] * present.to(self.generated_latents.dtype).view(-1, 1, 1, 1)

    def _patch_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, patches, hidden): non-overlapping p x p patches, embedded, then one Transformer layer."""
        p = self.patch
        patches = nn.functional.unfold(latents, kernel_size=p, stride=p).transpose(1, 2)
        tokens = self.patch_norm(self.patch_embed(patches)) + self.patch_position
        return self.patch_encoder(tokens)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) from the fused token sequence; no auxiliary losses."""
        _, ehr_tokens = self.ehr_encoder(batch.ehr, batch.ehr_length)
        present = batch.has_cxr > 0.5
        patch_tokens = self._patch_tokens(self._generated(batch).to(ehr_tokens.dtype))
        x0_token = self.x0_projection(encode_paired_cxr(self.cxr_backbone, batch.cxr, batch.has_cxr)).unsqueeze(1)
        size = batch.ehr.shape[0]
        types = self.token_type.weight
        tokens = torch.cat([ehr_tokens + types[0], patch_tokens + types[1], x0_token + types[2],
                            self.no_xray.expand(size, -1, -1) + types[3]], dim=1)
        absent = ~present[:, None]
        padding = torch.cat([padding_mask(batch.ehr_length, ehr_tokens.shape[1]),
                             absent.expand(-1, patch_tokens.shape[1]), absent, present[:, None]], dim=1)
        fused = self.fusion(tokens, src_key_padding_mask=padding)
        keep = (~padding).to(fused.dtype).unsqueeze(-1)
        pooled = (fused * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return ModelOutput(self.head(pooled))
