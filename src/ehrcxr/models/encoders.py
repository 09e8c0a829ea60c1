"""Shared encoders: EHR LSTM, EHR Transformer and a torchvision ResNet CXR backbone.

Every fusion model builds its modality encoders from here, so that methods differ only in how
they fuse. The CXR backbone is split into a frozen *prefix* (stem + the first ``frozen_stages``
ResNet stages, always in eval mode) and a trainable *suffix*, so the trainer can compute the
frozen part once per run (``frozen_cxr_prefix``) and feed prefix features instead of images.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RESNET_DEPTHS = (18, 34, 50)
_STAGE_WIDTHS = (64, 128, 256, 512)
_CXR_KEYS = {"depth", "weights", "frozen_stages", "pretrained", "in_channels", "image_size", "augment"}  # augment: the trainer


# ----------------------------------------------------------------------------------------- EHR
def padding_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Boolean (B, steps) mask, True at padding positions (step >= length)."""
    return torch.arange(steps, device=lengths.device)[None, :] >= lengths.to(torch.long)[:, None]


def masked_mean(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, T, D) over the first ``lengths[b]`` steps of each row -> (B, D)."""
    valid = (~padding_mask(lengths, tokens.shape[1])).to(tokens.dtype).unsqueeze(-1)
    return (tokens * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def _check_ehr(x: torch.Tensor, lengths: torch.Tensor, in_features: int) -> None:
    if x.dim() != 3 or x.shape[-1] != in_features:
        raise ValueError(f"EHR input must be (B, T, {in_features}); got {tuple(x.shape)}")
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"ehr_length must be ({x.shape[0]},); got {tuple(lengths.shape)}")


class EHRLSTMEncoder(nn.Module):
    """LSTM over packed EHR sequences; returns the hidden state at each stay's last valid step.

    Initialisation follows MedFuse: Xavier-uniform input weights, orthogonal recurrent weights,
    zero biases. A bidirectional LSTM concatenates [h_fwd, h_bwd] and projects it back to
    ``hidden`` (CareBench), so ``out_dim == hidden`` always.
    """

    def __init__(self, in_features: int, hidden: int, layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False):
        super().__init__()
        self.in_features, self.hidden, self.bidirectional = in_features, hidden, bidirectional
        self.out_dim = hidden
        self.lstm = nn.LSTM(in_features, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)
        self.merge = nn.Linear(2 * hidden, hidden) if bidirectional else nn.Identity()
        for name, weight in self.lstm.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(weight)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(weight)
            else:
                nn.init.zeros_(weight)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, return_sequence: bool = False):
        """x (B, T, in_features), lengths (B,) -> last valid hidden state (B, hidden).

        With ``return_sequence`` also returns the per-step outputs (B, T, hidden·directions),
        zero beyond each length.
        """
        _check_ehr(x, lengths, self.in_features)
        lengths_cpu = lengths.detach().to("cpu", torch.long)
        if int(lengths_cpu.min()) < 1 or int(lengths_cpu.max()) > x.shape[1]:
            raise ValueError(f"ehr_length must lie in [1, {x.shape[1]}]; got "
                             f"[{int(lengths_cpu.min())}, {int(lengths_cpu.max())}]")
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        outputs, (h_n, _) = self.lstm(packed)
        if self.bidirectional:
            last = self.merge(torch.cat([h_n[-2], h_n[-1]], dim=-1))
        else:
            last = h_n[-1]
        if not return_sequence:
            return last
        sequence, _ = pad_packed_sequence(outputs, batch_first=True, total_length=x.shape[1])
        return last, sequence


class EHRTransformerEncoder(nn.Module):
    """Linear embedding + learnable positional encoding + Transformer encoder (CareBench/DrFuse).

    With ``layers=0`` the tokens are the embedded steps plus their positions, for models whose own attention
    layers follow (cross_attention). Padding is excluded with a *boolean* key padding mask built from ``ehr_length`` (CareBench
    passes a float 0/1 mask, which masks nothing), and the output is the mean over valid steps.
    """

    def __init__(self, in_features: int, hidden: int, heads: int = 4, layers: int = 1,
                 dropout: float = 0.2, max_len: int = 512, feedforward: int | None = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.in_features, self.hidden, self.max_len = in_features, hidden, max_len
        self.out_dim = hidden
        self.embed = nn.Linear(in_features, hidden)
        self.position = nn.Parameter(torch.empty(1, max_len, hidden).uniform_(-0.1, 0.1))
        self.encoder = transformer_encoder(hidden, heads, layers, dropout, feedforward) if layers else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, in_features), lengths (B,) -> (mean over valid steps (B, hidden), tokens (B, T, hidden))."""
        _check_ehr(x, lengths, self.in_features)
        steps = x.shape[1]
        if steps > self.max_len:
            raise ValueError(f"EHR sequence has {steps} steps, more than max_len={self.max_len}")
        tokens = self.embed(x) + self.position[:, :steps]
        if self.encoder is not None:
            tokens = self.encoder(tokens, src_key_padding_mask=padding_mask(lengths, steps))
        return masked_mean(tokens, lengths), tokens


def transformer_encoder(hidden: int, heads: int, layers: int, dropout: float,
                        feedforward: int | None = None) -> nn.TransformerEncoder:
    """A batch-first ``nn.TransformerEncoder`` (FFN width defaults to 4·hidden)."""
    layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=feedforward or 4 * hidden,
                                       dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


# ----------------------------------------------------------------------------------------- CXR
def adapt_conv1_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt RGB first-conv filters (out, 3, k, k) to ``in_channels`` inputs.

    One channel: sum of the RGB filters (a grey image x gives the same response as RGB (x, x, x)).
    Otherwise: the RGB filters cycled over the channels and rescaled by 3 / in_channels.
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"cannot adapt conv1 with {weight.shape[1]} input channels to {in_channels}")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3.0 / in_channels)


class CXRBackbone(nn.Module):
    """torchvision ResNet-{18,34,50} without fc, split into a frozen prefix and a trainable suffix.

    ``prefix`` = stem (conv1, bn1, relu, maxpool) + layer1..layer_k for k = ``frozen_stages``
    (nn.Identity when 0): no gradients, always in eval mode. ``suffix`` = the remaining stages +
    global average pooling + flatten, giving ``out_dim`` features (512 for 18/34, 2048 for 50).
    """

    def __init__(self, depth: int = 18, weights: str | Path | None = None, frozen_stages: int = 0,
                 in_channels: int = 1):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"cxr depth must be one of {RESNET_DEPTHS}; got {depth!r}")
        if not 0 <= int(frozen_stages) <= 4:
            raise ValueError(f"cxr frozen_stages must be in 0..4; got {frozen_stages!r}")
        self.depth, self.frozen_stages, self.in_channels = depth, int(frozen_stages), in_channels
        import torchvision  # here, not at the top: EHR-only cells never pay its ~3 s import

        # "imagenet" downloads torchvision's IMAGENET1K_V1 weights (opt-in); a path is loaded below.
        resnet = torchvision.models.get_model(f"resnet{depth}",
                                              weights="IMAGENET1K_V1" if weights == "imagenet" else None)
        expansion = 4 if depth == 50 else 1
        self.out_dim = _STAGE_WIDTHS[-1] * expansion
        if in_channels != 3:
            conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            if weights == "imagenet":
                with torch.no_grad():
                    conv1.weight.copy_(adapt_conv1_weight(resnet.conv1.weight, in_channels))
            resnet.conv1 = conv1
        stem = nn.Sequential(OrderedDict(conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu,
                                         maxpool=resnet.maxpool))
        stages = [("stem", stem)] + [(f"layer{i}", getattr(resnet, f"layer{i}")) for i in range(1, 5)]
        k = self.frozen_stages
        self.prefix = nn.Sequential(OrderedDict(stages[:k + 1])) if k > 0 else nn.Identity()
        tail = stages[k + 1:] if k > 0 else stages
        self.suffix = nn.Sequential(OrderedDict(tail + [("pool", nn.AdaptiveAvgPool2d(1)),
                                                        ("flatten", nn.Flatten(1))]))
        self.prefix_channels = _STAGE_WIDTHS[k - 1] * expansion if k > 0 else in_channels
        for parameter in self.prefix.parameters():
            parameter.requires_grad_(False)
        self.prefix.eval()
        if weights not in (None, "imagenet"):
            self.load_pretrained(weights)

    def train(self, mode: bool = True) -> "CXRBackbone":
        """Set train/eval mode; the frozen prefix always stays in eval mode."""
        super().train(mode)
        self.prefix.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in_channels, H, W) or prefix features (B, prefix_channels, h, w) -> (B, out_dim)."""
        return self.suffix(self._prefix_output(x))

    @property
    def trainable_stages(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) ResNet stages of the trainable suffix, in order (stem and/or layer1..4)."""
        return [(name, module) for name, module in self.suffix.named_children() if name not in ("pool", "flatten")]

    @property
    def stage_channels(self) -> list[int]:
        """Output channels of the frozen prefix (entry 0), then of each trainable stage."""
        expansion = 4 if self.depth == 50 else 1
        widths = {"stem": 64} | {f"layer{i}": width * expansion for i, width in enumerate(_STAGE_WIDTHS, 1)}
        return [self.prefix_channels] + [widths[name] for name, _ in self.trainable_stages]

    def feature_map(self, x: torch.Tensor, between=None) -> torch.Tensor:
        """The last stage's feature map (B, out_dim, h, w), before pooling. ``between(index, feature_map)``, when
        given, is called on the prefix output (index 0) and after each trainable stage (index 1, 2, ...) and its
        return value goes on: the hook where a fusion method exchanges information between CNN stages."""
        x = self._prefix_output(x)
        stages = self.trainable_stages
        for index in range(len(stages) + 1):
            if index:
                x = stages[index - 1][1](x)
            if between is not None:
                x = between(index, x)
        return x

    def _prefix_output(self, x: torch.Tensor) -> torch.Tensor:
        """Run the frozen prefix on an image; pass prefix features through (checked)."""
        if x.dim() != 4:
            raise ValueError(f"CXR input must be 4-D (B, C, H, W); got {tuple(x.shape)}")
        if x.shape[1] == self.in_channels and self.frozen_stages > 0:
            with torch.no_grad():
                x = self.prefix(x)
        elif x.shape[1] not in (self.in_channels, self.prefix_channels):
            raise ValueError(f"CXR input has {x.shape[1]} channels; expected an image with "
                             f"{self.in_channels} or prefix features with {self.prefix_channels}")
        return x

    @staticmethod
    def _torchvision_name(key: str) -> str:
        """Own state-dict key ('prefix.stem.conv1.weight') -> torchvision key ('conv1.weight')."""
        key = key.split(".", 1)[1]
        return key.split(".", 1)[1] if key.startswith("stem.") else key

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The ResNet weights without fc, keyed as in torchvision (``conv1.weight``, ``layer1.0...``)."""
        return {self._torchvision_name(key): value.detach().clone()
                for key, value in self.state_dict().items()}

    def load_backbone_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load torchvision-keyed ResNet weights (``fc.*`` ignored, RGB conv1 adapted to in_channels)."""
        own = {self._torchvision_name(key): key for key in self.state_dict()}
        state = {key.removeprefix("module."): value for key, value in state.items()
                 if not key.removeprefix("module.").startswith("fc.")}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"{source} does not match a ResNet-{self.depth} backbone: "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        state = dict(state)
        state["conv1.weight"] = adapt_conv1_weight(state["conv1.weight"], self.in_channels)
        self.load_state_dict({own[key]: value for key, value in state.items()}, strict=True)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a state dict file written from ``backbone_state_dict()`` (or a torchvision ResNet)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CXR weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
        self.load_backbone_state_dict(state, source=str(path))

    def branch(self) -> "CXRBackbone":
        """A second backbone sharing this one's frozen prefix module, with a deep-copied suffix."""
        return copy.deepcopy(self, memo={id(self.prefix): self.prefix})


def build_cxr_backbone(cxr: dict | None, in_channels: int = 1) -> CXRBackbone:
    """Build a CXRBackbone from the ``cxr`` config dict and load ``cxr["pretrained"]`` if given."""
    cxr = dict(cxr or {})
    unknown = sorted(set(cxr) - _CXR_KEYS)
    if unknown:
        raise ValueError(f"unknown cxr config keys {unknown}; allowed: {sorted(_CXR_KEYS)}")
    backbone = CXRBackbone(depth=int(cxr.get("depth", 18)), weights=cxr.get("weights"),
                           frozen_stages=int(cxr.get("frozen_stages", 0)),
                           in_channels=int(cxr.get("in_channels", in_channels)))
    if cxr.get("pretrained"):
        backbone.load_pretrained(cxr["pretrained"])
    return backbone


def frozen_cxr_prefix(model: nn.Module) -> nn.Module | None:
    """The single frozen prefix shared by every CXRBackbone in ``model``, else None.

    None when the model has no backbone, a backbone has ``frozen_stages == 0``, or the backbones
    do not share one prefix module object.
    """
    backbones = [module for module in model.modules() if isinstance(module, CXRBackbone)]
    if not backbones or any(backbone.frozen_stages == 0 for backbone in backbones):
        return None
    prefixes = {id(backbone.prefix) for backbone in backbones}
    return backbones[0].prefix if len(prefixes) == 1 else None


def encode_paired_cxr(backbone: CXRBackbone, cxr: torch.Tensor, has_cxr: torch.Tensor) -> torch.Tensor:
    """Backbone features (B, out_dim) of the rows with has_cxr == 1; exact zeros elsewhere.

    Only the paired rows pass through the backbone, so a missing image (its pixels, or its
    share of BatchNorm batch statistics) can never influence any output.
    """
    paired = has_cxr > 0.5
    if not bool(paired.any()):
        return cxr.new_zeros(cxr.shape[0], backbone.out_dim)
    encoded = backbone(cxr[paired])  # bf16 under CUDA autocast when a stage trains: the zeros take its dtype
    features = encoded.new_zeros(cxr.shape[0], backbone.out_dim)
    return features.index_put((paired.nonzero(as_tuple=True)[0],), encoded)


def encode_paired_cxr_with_exchange(backbone: CXRBackbone, cxr: torch.Tensor, has_cxr: torch.Tensor,
                                    exchange) -> torch.Tensor:
    """As ``encode_paired_cxr`` (pooled features (B, out_dim) of the paired rows, exact zeros elsewhere), with
    ``exchange(index, rows, feature_map) -> feature_map`` applied between the CNN stages: to the paired rows' map
    at every exchange point of ``CXRBackbone.feature_map`` (index 0: the prefix output; i: after the i-th
    trainable stage). ``rows`` holds the batch indices of the paired rows, the rows of ``feature_map``.

    Only paired rows enter the CNN, so a missing image (its pixels or its share of BatchNorm statistics) never
    reaches any output. When no row is paired, ``exchange`` still runs at every point, on an empty
    (0, channels, 1, 1) map, so that a fusion method's EHR-side update reaches every stay in every batch.
    """
    rows = (has_cxr > 0.5).nonzero(as_tuple=True)[0]
    features = cxr.new_zeros(cxr.shape[0], backbone.out_dim)
    if rows.numel() == 0:
        for index, channels in enumerate(backbone.stage_channels):
            exchange(index, rows, cxr.new_zeros(0, channels, 1, 1))
        return features
    feature_map = backbone.feature_map(cxr[rows], between=lambda index, x: exchange(index, rows, x))
    return features.index_put((rows,), feature_map.mean(dim=(2, 3)).to(features.dtype))  # bf16 under autocast


def squeeze_paired(feature_map: torch.Tensor, rows: torch.Tensor, missing: torch.Tensor,
                   batch_size: int) -> torch.Tensor:
    """(batch_size, C) channel means (global average pool) of ``feature_map``, the map of the paired ``rows``;
    every other row gets ``missing`` (C,), a learned stand-in for the squeeze of an absent image."""
    return missing.expand(batch_size, -1).index_put((rows,), feature_map.mean(dim=(2, 3)).to(missing.dtype))


class GridPatchTokens(nn.Module):
    """X-ray patch tokens from a CNN's last feature map (P, C, h, w): each of its h·w positions, row-major,
    Linear(C -> hidden) plus a learned row and a learned column position (maps up to ``max_grid`` per side)."""

    def __init__(self, channels: int, hidden: int, max_grid: int = 8):
        super().__init__()
        self.hidden, self.max_grid = hidden, int(max_grid)
        self.projection = nn.Linear(channels, hidden)
        self.row_position = nn.Parameter(torch.empty(self.max_grid, hidden).normal_(std=0.02))
        self.column_position = nn.Parameter(torch.empty(self.max_grid, hidden).normal_(std=0.02))

    def forward(self, feature_map: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (P, h·w, hidden); ``offset`` (hidden,), e.g. a modality embedding, is added to every position."""
        height, width = feature_map.shape[2:]
        if height > self.max_grid or width > self.max_grid:
            raise ValueError(f"the X-ray feature map is {height}x{width}, larger than max_grid={self.max_grid}")
        position = (self.row_position[:height, None] + self.column_position[None, :width]).reshape(-1, self.hidden)
        if offset is not None:
            position = position + offset
        tokens = self.projection(feature_map.flatten(2).transpose(1, 2))
        return tokens + position.to(tokens.dtype)


def checked_ehr_layout(model: str, ehr_features: int):
    """The EHR tensor's channel layout (``ehrcxr.data.ehr.channel_layout``: the values, then one observation mask per
    variable) for models that read values and masks apart; a clear error names ``model`` when ``ehr_features``
    does not fit it."""
    from ehrcxr.data.ehr import channel_layout  # here, not at the top: most models never need the data layer

    layout = channel_layout()
    values, variables = len(layout.feature_names), len(layout.variables)
    if ehr_features != values + variables:
        raise ValueError(f"{model} needs the {values} values + {variables} masks EHR layout ({values + variables} "
                         f"features); got {ehr_features}")
    return layout


# ----------------------------------------------------------------------------------------- EHR encoder by name
def build_ehr_encoder(kind: str, in_features: int, hidden: int, *, heads: int = 4, layers: int = 1,
                      dropout: float = 0.0, max_len: int = 512) -> EHRTransformerEncoder | EHRLSTMEncoder:
    """The shared EHR encoder a model's ``ehr_encoder`` parameter names: 'transformer' or 'lstm'."""
    if kind == "transformer":
        return EHRTransformerEncoder(in_features, hidden, heads=heads, layers=layers, dropout=dropout,
                                     max_len=max_len)
    if kind == "lstm":
        return EHRLSTMEncoder(in_features, hidden, layers=layers, dropout=dropout)
    raise ValueError(f"ehr_encoder must be 'transformer' or 'lstm'; got {kind!r}")


def ehr_summary(encoder: EHRTransformerEncoder | EHRLSTMEncoder, x: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """One vector (B, hidden) per stay: the Transformer's mean over valid steps, or the LSTM's last valid state."""
    summary = encoder(x, lengths)
    return summary[0] if isinstance(summary, tuple) else summary
