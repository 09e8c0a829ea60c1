"""Flex-MoE (Yun, Choi, Peng, Wu, Bao, Zhang, Xin, Long & Chen, "Flex-MoE: Modeling Arbitrary Modality Combination
via the Flexible Mixture-of-Experts", NeurIPS 2024; public code UNITES-Lab/flex-moe ``models.py`` (FlexMoE,
TransformerEncoderLayer), ``moe_module.py`` (AddtionalNoisyGate), ``main.py``, ``data.py``
(get_modality_combinations)), as CareBench runs it (jakeykj/CareBench ``models/flexmoe/flexmoe_lighting.py``,
``flexmoe_components.py``, ``moe_module.py``, ``configs/flexmoe.yaml``). Both use FastMoE (laekov/fastmoe
``fmoe/gates/noisy_gate.py``); the sparse mixture of experts is written here in plain PyTorch.

Each modality becomes patch tokens: the embedded EHR hours mean-pooled over ``num_patches`` windows of equal
duration, and the X-ray's CNN feature map average-pooled to at most a √num_patches × √num_patches grid, projected.
A stay without an X-ray takes the learned missing-modality bank's tokens instead (the bank entry of its modality
combination). The tokens of both modalities go through a Transformer whose feed-forward sub-layer is a sparse
mixture of experts with noisy top-k gating; the routing depends on the stay's modality combination (the G-router
for stays with both modalities, the S-router, whose top-1 expert is fixed to the combination's own expert, for
EHR-only stays). Loss: task + gate_loss_weight·(1 − 0.5·progress)·gate loss (CareBench's schedule).

Deviations (docs/MODELS.md): the standard residual around attention (both codes compute ``x = attn(x);
x = x + dropout(x)``, dropping the layer input); the S-router's top-1 is fixed as the paper says and trained by the
code's cross-entropy, and its balance runs over the experts it chooses freely; ``num_routers`` 2 gives the S-router
its own weights (both codes build the extra routers and never call them); the full combination is index 0 as in
Flex-MoE (CareBench's index order makes EHR-only stays its "full modality" rows); one expert dispatch and one balance
term per layer for both modalities (the original calls the MoE once per modality).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import EHRTransformerEncoder, build_cxr_backbone, padding_mask
from ehrcxr.models.registry import register

FULL, EHR_ONLY = 0, 1  # modality-combination indices, Flex-MoE's order (data.py: the full combination first)
COMBINATIONS = 2  # the EHR is always present, so {EHR, X-ray} and {EHR} are the only combinations
NOISE_FLOOR = 1e-2  # FastMoE NoisyGate.noise_epsilon
FORCED_OFFSET = 1e4  # added to the fixed expert's score so top-k always keeps it (finite: gradients stay finite)
CV_EPS = 1e-10  # FastMoE NoisyGate.cv_squared


def combination_index(has_cxr: torch.Tensor) -> torch.Tensor:
    """Modality combination of each stay (B,): FULL (0) with a paired X-ray, EHR_ONLY (1) without."""
    return torch.where(has_cxr > 0.5, FULL, EHR_ONLY)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean² of a vector (unbiased variance, as FastMoE); 0 for one value."""
    if values.numel() <= 1:
        return values.new_zeros(())
    values = values.float()
    return values.var() / (values.mean() ** 2 + CV_EPS)


def balance_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Shazeer et al.'s load-balancing loss (FastMoE NoisyGate): cv²(importance) + cv²(load), importance and load
    summed over tokens (rows) per expert (columns). 0 exactly when both are equal across experts."""
    return cv_squared(gates.sum(0)) + cv_squared(load.sum(0))


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, noisy_top: torch.Tensor,
                  k: int) -> torch.Tensor:
    """Probability (N, E) that each expert is among a token's top ``k`` under a fresh draw of the noise (Shazeer et
    al. 2017; FastMoE ``_prob_in_top_k``): a differentiable expert load. ``noisy_top`` (N, k+1) holds each token's
    k+1 largest noisy scores; an expert now in the top k must stay above the (k+1)-th, one outside must beat the
    k-th."""
    threshold_if_in = noisy_top[:, k:k + 1]
    threshold_if_out = noisy_top[:, k - 1:k]
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    is_in = noisy > threshold_if_in
    return torch.where(is_in, normal.cdf((clean - threshold_if_in) / noise_std),
                       normal.cdf((clean - threshold_if_out) / noise_std))


class CombinationRouter(nn.Module):
    """Noisy top-k gating whose routing depends on the token's modality combination.

    ``num_routers`` gate matrices (d_model × experts, plus the noise matrices): with 2, stays with both modalities
    use router 0 (Flex-MoE's G-router) and EHR-only stays router 1 (the S-router); with 1, both share one. The S-rule
    (the paper's S-router): for a combination with a missing modality, the top-1 expert is fixed to the expert
    whose index is the combination's (expert 1 for EHR-only), the other k − 1 are the router's best among the rest.
    Gate weights are the softmax of the chosen experts' (noisy, in training) logits, renormalised over the k.

    Gate loss (the original's ``AddtionalNoisyGate``): for full-combination tokens cv²(importance) + cv²(load) over
    all experts; for EHR-only tokens the cross-entropy of their logits against the combination's expert plus the
    same balance over the experts they choose freely (all but their fixed one). Load is the smooth probability of
    being in the top k in training (noise on, k < experts), else the count of tokens routed.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, num_routers: int):
        super().__init__()
        if num_routers not in range(1, COMBINATIONS + 1):
            raise ValueError(f"num_routers must be 1 or {COMBINATIONS}; got {num_routers}")
        if num_experts < COMBINATIONS or not 1 <= top_k <= num_experts:
            raise ValueError(f"need num_experts >= {COMBINATIONS} (one per modality combination) and "
                             f"1 <= top_k <= num_experts; got {num_experts} experts, top_k {top_k}")
        self.num_experts, self.top_k, self.num_routers = num_experts, top_k, num_routers
        self.gate = nn.Parameter(torch.empty(num_routers, d_model, num_experts))
        self.noise = nn.Parameter(torch.empty(num_routers, d_model, num_experts))
        for weight in (*self.gate, *self.noise):  # FastMoE NoisyGate.reset_parameters, per router
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _scores(self, weight: torch.Tensor, x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
        """x (N, d) through each token's router's matrix -> (N, experts)."""
        every = (x @ weight.permute(1, 0, 2).reshape(x.shape[1], -1)).view(-1, self.num_routers, self.num_experts)
        return every.gather(1, router[:, None, None].expand(-1, 1, self.num_experts)).squeeze(1)

    def forward(self, x: torch.Tensor, combination: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (N, d), their combination (N,) and whether they are real tokens (N,) -> chosen experts (N, k),
        their gate weights (N, k) and the gate loss over the valid tokens. Float32 throughout, also under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x.float(), combination, valid)

    def _route(self, x: torch.Tensor, combination: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router = combination.clamp(max=self.num_routers - 1)
        clean = self._scores(self.gate, x, router)
        noise_std = None
        noisy = clean
        if self.training:
            noise_std = F.softplus(self._scores(self.noise, x, router)) + NOISE_FLOOR
            noisy = clean + torch.randn_like(clean) * noise_std
        experts = torch.arange(self.num_experts, device=x.device)
        forced = (combination[:, None] != FULL) & (experts[None, :] == combination[:, None])
        selection = torch.where(forced, noisy + FORCED_OFFSET, noisy)
        top_scores, top_experts = selection.topk(min(self.top_k + 1, self.num_experts), dim=1)
        chosen = top_experts[:, :self.top_k]
        weights = noisy.gather(1, chosen).softmax(dim=1)
        gates = torch.zeros_like(noisy).scatter(1, chosen, weights)
        if noise_std is not None and self.top_k < self.num_experts:
            load = prob_in_top_k(torch.where(forced, clean + FORCED_OFFSET, clean), selection, noise_std,
                                 top_scores, self.top_k)
        else:
            load = (gates > 0).float()
        full = (valid & (combination == FULL)).float()[:, None]
        loss = balance_loss(gates * full, load * full)
        for index in range(1, COMBINATIONS):  # each combination with a missing modality: the S-router's terms
            rows = (valid & (combination == index)).float()
            free = experts != index
            loss = loss + balance_loss((gates * rows[:, None])[:, free], (load * rows[:, None])[:, free])
            own = noisy.log_softmax(dim=1)[:, index]
            loss = loss - (own * rows).sum() / rows.sum().clamp_min(1.0)
        return chosen, weights, loss


class SparseMoE(nn.Module):
    """Mixture of ``num_experts`` expert MLPs (d → 2d → d, GELU; FastMoE ``_Expert`` with Flex-MoE's hidden_times 2)
    behind a ``CombinationRouter``. Each token runs through its k chosen experts only: tokens are sorted by expert
    and each expert takes its contiguous slice (one host sync for the per-expert counts, as FastMoE's
    ``fwd_expert_count``); the k outputs are mixed by the gate weights."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, num_routers: int):
        super().__init__()
        self.router = CombinationRouter(d_model, num_experts, top_k, num_routers)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(),
                                                    nn.Linear(2 * d_model, d_model)) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, combination: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d), combination (B,), valid (B, L) -> (mixture output (B, L, d), gate loss)."""
        batch, length, width = x.shape
        tokens = x.reshape(batch * length, width)
        chosen, weights, loss = self.router(tokens, combination.repeat_interleave(length), valid.reshape(-1))
        k = chosen.shape[1]
        expert_of = chosen.reshape(-1)
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()
        slices = tokens[order // k].split(counts)
        outputs = torch.cat([expert(part) for expert, part in zip(self.experts, slices)])
        outputs = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
        mixed = outputs[order.argsort()].view(batch * length, k, width).sum(dim=1)
        return mixed.view(batch, length, width).to(x.dtype), loss


class FlexMoELayer(nn.Module):
    """One pre-norm Transformer layer over all tokens of a stay: self-attention (padding masked as keys), then the
    feed-forward sub-layer, a ``SparseMoE`` (``sparse``) or a dense MLP d → 2d → d; both sub-layers residual with
    dropout on their output (Flex-MoE TransformerEncoderLayer, its residual fixed: see the module notes)."""

    def __init__(self, hidden: int, heads: int, dropout: float, sparse: bool, num_experts: int, top_k: int,
                 num_routers: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.feedforward_norm = nn.LayerNorm(hidden)
        self.sparse = sparse
        self.feedforward = (SparseMoE(hidden, num_experts, top_k, num_routers) if sparse else
                            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(2 * hidden, hidden)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor, combination: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L, d), padding (B, L) True at padding, combination (B,) -> (tokens, gate loss)."""
        normed = self.attention_norm(tokens)
        attended = self.attention(normed, normed, normed, key_padding_mask=padding, need_weights=False)[0]
        tokens = tokens + self.dropout(attended)
        normed = self.feedforward_norm(tokens)
        if self.sparse:
            update, loss = self.feedforward(normed, combination, ~padding)
        else:
            update, loss = self.feedforward(normed), tokens.new_zeros((), dtype=torch.float32)
        return tokens + self.dropout(update), loss


def window_means(steps: torch.Tensor, lengths: torch.Tensor, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hourly tokens (B, T, d) -> the mean over the valid hours of each of ``windows`` consecutive windows of
    ceil(T / windows) hours (B, windows, d), and whether a window holds any valid hour (B, windows); an empty
    window's mean is zero. Padding hours (>= length) never count."""
    batch, steps_count, width = steps.shape
    span = -(-steps_count // windows)
    padded = F.pad(steps, (0, 0, 0, windows * span - steps_count))
    valid = ~padding_mask(lengths, windows * span)
    summed = torch.where(valid[..., None], padded, 0.0).view(batch, windows, span, width).sum(dim=2)
    counts = valid.view(batch, windows, span).sum(dim=2)
    return summed / counts.clamp_min(1)[..., None].to(summed.dtype), counts > 0


@register("flexmoe")
class FlexMoE(nn.Module):
    """Flex-MoE on EHR + X-ray (see the module docstring).

    * EHR patches: the shared EHR Transformer (``ehr_layers`` layers; 0 = the embedded hours alone) over the hours,
      then the mean over each of ``num_patches`` windows of equal duration (a window past the stay's length is
      padding: no key, not pooled, not routed into the gate loss).
    * X-ray patches: the CNN's last feature map (``CXRBackbone.feature_map``) average-pooled to at most g × g
      positions, g = ⌊√num_patches⌋ (4 × 4 of a 7 × 7 map, as CareBench's CXREncoder; a smaller map keeps its
      h·w positions: one with the demo's precomputed pooled features), Linear(channels → hidden), in g² slots
      (unused slots are padding). Only paired stays enter the CNN.
    * Missing X-ray: the g² learned tokens of the missing-modality bank (the entry of the EHR-only combination's
      X-ray; N(0, 1) initialised as the original).
    * Learned positions per EHR patch and X-ray slot (zero initialised, Flex-MoE's ``pos_embed``), then ``layers``
      ``FlexMoELayer``s (the first sparse, then alternating dense / sparse, as the original), routed by the
      stay's modality combination; [mean EHR tokens ∥ mean X-ray tokens] → Linear (``num_layers_pred`` 1).
    * Auxiliary loss ``gate``: gate_loss_weight · (1 − 0.5 · min((epoch − 1) / epochs, 1)) · Σ layers' gate
      losses (CareBench; ``epoch`` counted from 1 and ``epochs``, the run's maximum, from ``on_train_epoch_start``;
      full weight before training).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, num_patches: int = 8, num_experts: int = 4, top_k: int = 2,
                 num_routers: int = 2, gate_loss_weight: float = 0.01, heads: int = 4, layers: int = 1,
                 ehr_layers: int = 0, max_len: int = 512):
        super().__init__()
        if num_patches < 1 or layers < 1:
            raise ValueError(f"num_patches and layers must be positive; got {num_patches}, {layers}")
        self.hidden, self.num_patches = hidden, int(num_patches)
        self.grid = math.isqrt(self.num_patches)
        self.gate_loss_weight, self.epoch, self.epochs = float(gate_loss_weight), 1, 1
        self.ehr_encoder = EHRTransformerEncoder(ehr_features, hidden, heads=heads, layers=ehr_layers,
                                                 dropout=dropout, max_len=max_len)
        self.cxr_backbone = build_cxr_backbone(cxr)
        self.xray_projection = nn.Linear(self.cxr_backbone.out_dim, hidden)
        self.missing_xray = nn.Parameter(torch.randn(self.grid ** 2, hidden))
        self.ehr_position = nn.Parameter(torch.zeros(self.num_patches, hidden))
        self.xray_position = nn.Parameter(torch.zeros(self.grid ** 2, hidden))
        self.layers = nn.ModuleList([FlexMoELayer(hidden, heads, dropout, index % 2 == 0, num_experts, top_k,
                                                  num_routers) for index in range(layers)])
        self.head = nn.Linear(2 * hidden, n_labels)

    def ehr_patches(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """EHR patch tokens (B, num_patches, hidden) and their validity (B, num_patches)."""
        _, steps = self.ehr_encoder(batch.ehr, batch.ehr_length)
        return window_means(steps, batch.ehr_length, self.num_patches)

    def xray_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """X-ray tokens (B, g², hidden) and their validity (B, g²): pooled, projected map positions for paired
        stays (first slots), the missing-modality bank's tokens for the others."""
        paired = batch.has_cxr > 0.5
        rows = paired.nonzero(as_tuple=True)[0]
        size, slots = paired.shape[0], self.grid ** 2
        tokens = self.missing_xray.expand(size, -1, -1)
        valid = torch.ones(size, slots, dtype=torch.bool, device=paired.device)
        if rows.numel() == 0:
            return tokens, valid
        feature_map = self.cxr_backbone.feature_map(batch.cxr[rows])
        grid = F.adaptive_avg_pool2d(feature_map, (min(feature_map.shape[2], self.grid),
                                                   min(feature_map.shape[3], self.grid)))
        patches = self.xray_projection(grid.flatten(2).transpose(1, 2))
        count = patches.shape[1]
        tokens = tokens.to(patches.dtype).index_put((rows,), F.pad(patches, (0, 0, 0, slots - count)))
        used = (torch.arange(slots, device=paired.device) < count).expand(rows.numel(), -1)
        return tokens, valid.index_put((rows,), used)

    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) and the weighted gate loss (``aux_losses['gate']``)."""
        combination = combination_index(batch.has_cxr)
        ehr, ehr_valid = self.ehr_patches(batch)
        xray, xray_valid = self.xray_tokens(batch)
        ehr = ehr + self.ehr_position.to(ehr.dtype)
        xray = xray.to(ehr.dtype) + self.xray_position.to(ehr.dtype)
        tokens = torch.cat([ehr, xray], dim=1)
        valid = torch.cat([ehr_valid, xray_valid], dim=1)
        gate_loss = tokens.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            tokens, loss = layer(tokens, ~valid, combination)
            gate_loss = gate_loss + loss
        weight = valid.to(tokens.dtype)[..., None]
        pooled = [(part * mask).sum(1) / mask.sum(1) for part, mask in
                  zip(tokens.split([self.num_patches, self.grid ** 2], dim=1),
                      weight.split([self.num_patches, self.grid ** 2], dim=1))]
        logits = self.head(torch.cat(pooled, dim=1))
        return ModelOutput(logits, {"gate": self.gate_weight() * gate_loss})

    def gate_weight(self) -> float:
        """gate_loss_weight · (1 − 0.5 · progress), progress = min((epoch − 1) / epochs, 1) (CareBench)."""
        return self.gate_loss_weight * (1.0 - 0.5 * min((self.epoch - 1) / self.epochs, 1.0))

    def on_train_epoch_start(self, epoch: int, step) -> None:
        """Remember the epoch (counted from 1) and the run's maximum (``step.epochs``) for the gate-loss schedule; set
        before every epoch, so a resumed run has them too."""
        self.epoch, self.epochs = int(epoch), int(step.epochs)
