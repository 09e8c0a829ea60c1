"""M3Care (Zhang, Chu, Ma, Zhu, Wang, Wang & Zhao, "M3Care: Learning with Missing Modalities in Multimodal
Healthcare Data", KDD 2022; public code choczhang/M3Care ``OV/M3Care.ipynb``, ``ODIR/M3Care.ipynb``), as CareBench
re-implements it for EHR + CXR (jakeykj/CareBench ``models/m3care/m3care.py``, ``configs/m3care.yaml``).

A missing X-ray's representation is imputed from similar patients: a patient-similarity graph, measured by learned
deep kernels on the modalities both patients have, feeds a 2-layer GCN per modality whose output for a stay without
an X-ray is its imputed X-ray feature. During training the graph is over the training batch, as in the paper. In
evaluation (``model.eval()``) each stay is linked to itself and to a fixed reference bank of training stays only, so
its prediction never depends on which other stays share its batch (see :class:`M3Care`).
"""
from __future__ import annotations

import torch
from torch import nn

from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.modality_balance import UnimodalEncoders
from ehrcxr.models.registry import register

BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)  # kernel_mul 2, kernel_num 3: the mean squared distance x {1/2, 1, 2}
MIN_BANDWIDTH = 1e-3  # CareBench: a smaller mean squared distance (identical features) uses bandwidth 1
EPSILON_INIT = -0.3  # the authors' eps init, sigma = 0.43 (CareBench: 2)
THRESHOLD_INIT = 0.0  # the authors' threshold init, sigma = 0.5 (CareBench: 2, which cuts every edge there)


def squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, K) squared Euclidean distances between the rows of ``queries`` (Q, D) and ``keys`` (K, D)."""
    cross = queries @ keys.T
    return (queries.pow(2).sum(1, keepdim=True) + keys.pow(2).sum(1)[None, :] - 2 * cross).clamp_min(0.0)


def mean_squared_distance(points: torch.Tensor) -> torch.Tensor:
    """The Gaussian kernel's base bandwidth of a set of rows (N, D): the mean squared distance over pairs of distinct
    rows, without gradient; 1 when it is below MIN_BANDWIDTH or there is no pair."""
    count = points.shape[0]
    if count < 2:
        return points.new_ones(())
    mean = squared_distances(points, points).detach().sum() / (count * count - count)
    return torch.where(mean < MIN_BANDWIDTH, torch.ones_like(mean), mean)


def gaussian_kernel(distances: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """The mean of exp(−d² / (bandwidth·f)) over the factors f of BANDWIDTH_FACTORS."""
    return sum(torch.exp(-distances / (bandwidth * factor)) for factor in BANDWIDTH_FACTORS) / len(BANDWIDTH_FACTORS)


def threshold_edges(similarity: torch.Tensor, threshold_logit: torch.Tensor) -> torch.Tensor:
    """Edges of ``similarity`` above t = σ(threshold_logit) keep their similarity, weaker ones become 0. The kept
    value is relu(s − t) + t with t detached there (M3Care), so t learns through the relu."""
    threshold = torch.sigmoid(threshold_logit)
    kept = torch.relu(similarity - threshold)
    return kept + (kept > 0).to(kept.dtype) * threshold.detach()


def neighbour_mean(weights: torch.Tensor, neighbours: torch.Tensor, own_weight: torch.Tensor | None = None,
                   own: torch.Tensor | None = None) -> torch.Tensor:
    """Per row r: (Σ_j w_rj x_j + v_r own_r) / (Σ_j w_rj + v_r), the weighted mean of its neighbours ``neighbours``
    (M, D) under ``weights`` (R, M), plus its own row ``own`` (R, D) with weight ``own_weight`` (R,) when given;
    0 for a row without any weight."""
    total, norm = weights @ neighbours, weights.sum(1)
    if own is not None:
        total, norm = total + own_weight[:, None] * own, norm + own_weight
    return total / norm.clamp_min(1e-12)[:, None]


class ModalityGraph(nn.Module):
    """One modality's learned similarity kernel, 2-layer GCN and gate.

    Kernel (CareBench's deep kernel): k(h_i, h_j) = [(1 − σ(ε))·κ(φ̂_i, φ̂_j) + σ(ε)]·κ(ĥ_i, ĥ_j),
    κ the mean of Gaussian kernels at 3 bandwidths, φ̂ = BN(ReLU(φ(h))) with φ a 3-layer MLP, ĥ = BN(h). Each space
    has its own BatchNorm (both originals share one across every kernel input, whose running statistics then fit
    none of them in evaluation).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                        nn.Linear(hidden, hidden))
        self.projected_norm = nn.BatchNorm1d(hidden)
        self.raw_norm = nn.BatchNorm1d(hidden)
        self.epsilon = nn.Parameter(torch.tensor(EPSILON_INIT))
        self.gcn = nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)])
        self.graph_gate = nn.Linear(hidden, 1)
        self.own_gate = nn.Linear(hidden, 1)

    def kernel_space(self, projected: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(φ̂, ĥ): the two spaces the kernel measures distances in, from φ(h) and h (in training the BatchNorms
        take the statistics of exactly these rows)."""
        return self.projected_norm(torch.relu(projected)), self.raw_norm(features)

    @staticmethod
    def bandwidths(space: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Base bandwidths of both kernel spaces of a set of key rows."""
        return mean_squared_distance(space[0]), mean_squared_distance(space[1])

    def kernel(self, queries: tuple[torch.Tensor, torch.Tensor], keys: tuple[torch.Tensor, torch.Tensor],
               bandwidths: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(Q, K) deep-kernel similarities between query and key rows given in kernel space."""
        mix = torch.sigmoid(self.epsilon)
        projected = gaussian_kernel(squared_distances(queries[0], keys[0]), bandwidths[0])
        raw = gaussian_kernel(squared_distances(queries[1], keys[1]), bandwidths[1])
        return ((1 - mix) * projected + mix) * raw

    def self_kernel(self, projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N, N) kernel among a set of rows, bandwidths from the set; all ones below 2 rows (a row with itself)."""
        if features.shape[0] < 2:
            return features.new_ones(features.shape[0], features.shape[0])
        space = self.kernel_space(projected, features)
        return self.kernel(space, space, self.bandwidths(space))

    def layer(self, index: int, aggregated: torch.Tensor) -> torch.Tensor:
        """GCN layer ``index`` on already aggregated neighbour features: ReLU(Â x W + b)."""
        return torch.relu(self.gcn[index](aggregated))

    def stability(self, projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """M3Care's stability term | ‖φ(H)‖_F − ‖H‖_F | over the rows given."""
        return (torch.linalg.norm(projected.float()) - torch.linalg.norm(features.float())).abs()

    def gate(self, graph: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """a·graph + (1 − a)·own with a = σ(g(graph)) / (σ(g(graph)) + σ(o(own))) per row."""
        graph_weight, own_weight = torch.sigmoid(self.graph_gate(graph)), torch.sigmoid(self.own_gate(own))
        share = graph_weight / (graph_weight + own_weight)
        return share * graph + (1 - share) * own


@register("m3care")
class M3Care(UnimodalEncoders):
    """EHR Transformer feature and projected CXR feature (zero without an X-ray) -> a patient-similarity graph ->
    a 2-layer GCN per modality -> a learned gate between each GCN output and the stay's own feature -> [EHR ∥ CXR]
    -> ReLU(Linear) -> dropout -> Linear. Loss: task + ``lambda_stability`` · Σ_m | ‖φ_m(H_m)‖_F − ‖H_m‖_F |
    (the CXR term over paired stays).

    Similarity of stays i, j: the mean of the modality kernels both have, S_ij = (k_ehr + k_cxr·c_i·c_j) /
    (1 + c_i·c_j) with c = has_cxr; edges below σ(θ) are cut (:func:`threshold_edges`). The EHR graph links every
    stay; the CXR graph only links a stay to neighbours that have an X-ray (columns masked by c_j), so a stay
    without one gets a similarity-weighted mix of its neighbours' X-ray features (CareBench masks by c_i·c_j, which
    leaves such a stay only the GCN bias). Each GCN layer takes the similarity-weighted *mean* over neighbours
    (:func:`neighbour_mean`). Final CXR feature: the gate's mix for a paired stay, the GCN output (imputed)
    otherwise. Final EHR feature: the gate's mix.

    Training: the graph is over the batch, bandwidths from the batch (as the paper). Evaluation: each evaluated
    stay's neighbours are itself and a reference bank of ``bank_size`` training stays, drawn with the cell's seed in
    :meth:`on_fit_start` (after the trainer has set precomputed X-ray features). The bank is encoded with the
    current weights once per evaluation pass (cached until the weights change or ``train()`` is called): its
    kernel bandwidths, the graph among its own stays and its first GCN layer; the evaluated stay then aggregates
    over itself + the bank in both layers. Without a bank (the model used outside ``fit``) a stay's only neighbour
    is itself: its X-ray feature if it has one, else nothing (the GCN bias).
    """

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, hidden: int = 64,
                 dropout: float = 0.2, heads: int = 4, layers: int = 1, max_len: int = 512,
                 lambda_stability: float = 0.001, bank_size: int = 256):
        super().__init__(ehr_features, cxr, hidden, heads, layers, dropout, max_len)
        if lambda_stability < 0 or int(bank_size) < 1:
            raise ValueError(f"m3care needs lambda_stability >= 0 and bank_size >= 1; got {lambda_stability}, "
                             f"{bank_size}")
        self.lambda_stability, self.bank_size = float(lambda_stability), int(bank_size)
        self.ehr_graph = ModalityGraph(hidden)
        self.cxr_graph = ModalityGraph(hidden)
        self.threshold = nn.Parameter(torch.tensor(THRESHOLD_INIT))
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_labels)
        self.reference_bank: Batch | None = None
        self._reference: tuple[tuple, dict] | None = None

    # ------------------------------------------------------------------------------------- reference bank
    def on_fit_start(self, data, inputs: dict) -> None:
        """Draw the reference bank: ``bank_size`` training stays, uniformly with the cell's seed."""
        train = data.splits["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(data.seed)))
        self.set_reference_bank(train.collate(order[:self.bank_size].sort().values.tolist()))

    def set_reference_bank(self, bank: Batch | None) -> None:
        """Use the stays of ``bank`` (as a StaySet collates them) as every evaluated stay's neighbours."""
        self.reference_bank, self._reference = bank, None

    def train(self, mode: bool = True) -> "M3Care":
        """Set train/eval mode; entering training drops the encoded bank."""
        if mode:
            self._reference = None
        return super().train(mode)

    def _weights_version(self) -> tuple:
        """Changes whenever a parameter or buffer is modified in place (optimiser step, load_state_dict) or moved."""
        tensors = [*self.parameters(), *self.buffers()]
        return (str(tensors[0].device), tuple(tensor._version for tensor in tensors))

    def _encoded_bank(self) -> dict:
        """The bank under the current weights (eval mode, no gradient): features, kernel spaces, bandwidths and
        first GCN layer of each modality over the graph among the bank's own stays."""
        version = self._weights_version()
        if self._reference is not None and self._reference[0] == version:
            return self._reference[1]
        from ehrcxr.train.loop import prepare_batch  # here: the trainer imports the models

        with torch.no_grad():
            bank = prepare_batch(self.reference_bank, self.threshold.device)
            ehr, cxr, paired = self.encode(bank)
            ehr_space = self.ehr_graph.kernel_space(self.ehr_graph.projection(ehr), ehr)
            cxr_space = self.cxr_graph.kernel_space(self.cxr_graph.projection(cxr), cxr)
            rows = paired.nonzero(as_tuple=True)[0]
            encoded = {"ehr": ehr, "cxr": cxr, "paired": paired.to(ehr.dtype), "ehr_space": ehr_space,
                       "cxr_space": cxr_space, "ehr_bandwidths": ModalityGraph.bandwidths(ehr_space),
                       "cxr_bandwidths": ModalityGraph.bandwidths((cxr_space[0][rows], cxr_space[1][rows]))}
            edges = self._edges(self._bank_similarity(encoded, ehr_space, cxr_space, encoded["paired"]))
            encoded["ehr_hidden"] = self.ehr_graph.layer(0, neighbour_mean(edges, ehr))
            cxr_edges = edges * encoded["paired"][None, :]
            encoded["cxr_hidden"] = self.cxr_graph.layer(0, neighbour_mean(cxr_edges, cxr))
        self._reference = (version, encoded)
        return encoded

    # ------------------------------------------------------------------------------------- graph
    def _edges(self, similarity: torch.Tensor) -> torch.Tensor:
        """The similarity graph with the learned threshold applied."""
        return threshold_edges(similarity, self.threshold)

    @staticmethod
    def combine(ehr_kernel: torch.Tensor, cxr_kernel: torch.Tensor, paired_rows: torch.Tensor,
                paired_columns: torch.Tensor) -> torch.Tensor:
        """S = (k_ehr + k_cxr·c_i·c_j) / (1 + c_i·c_j): the mean over the modalities both stays have."""
        both = paired_rows[:, None] * paired_columns[None, :]
        return (ehr_kernel + cxr_kernel * both) / (1 + both)

    def batch_similarity(self, ehr: torch.Tensor, cxr: torch.Tensor, paired: torch.Tensor,
                         ehr_projected: torch.Tensor, cxr_projected: torch.Tensor) -> torch.Tensor:
        """(B, B) similarities among the batch's stays (training). The CXR kernel (and its BatchNorm statistics
        and bandwidths) covers the stays with an X-ray only."""
        rows = paired.nonzero(as_tuple=True)[0]
        ehr_kernel = self.ehr_graph.self_kernel(ehr_projected, ehr)
        block = self.cxr_graph.self_kernel(cxr_projected[rows], cxr[rows])
        cxr_kernel = block.new_zeros(ehr.shape[0], ehr.shape[0]).index_put((rows[:, None], rows[None, :]), block)
        flags = paired.to(ehr_kernel.dtype)
        return self.combine(ehr_kernel, cxr_kernel, flags, flags)

    def _bank_similarity(self, bank: dict, ehr_space, cxr_space, paired: torch.Tensor) -> torch.Tensor:
        """(R, N) similarities between rows given in kernel space and the bank's stays (bank bandwidths)."""
        ehr_kernel = self.ehr_graph.kernel(ehr_space, bank["ehr_space"], bank["ehr_bandwidths"])
        cxr_kernel = self.cxr_graph.kernel(cxr_space, bank["cxr_space"], bank["cxr_bandwidths"])
        return self.combine(ehr_kernel, cxr_kernel, paired, bank["paired"])

    def graph_features(self, ehr: torch.Tensor, cxr: torch.Tensor, paired: torch.Tensor,
                       ehr_projected: torch.Tensor, cxr_projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The second GCN layer's output per modality (B, hidden) each: over the batch graph in training, over
        each stay + the reference bank in evaluation. For a stay without an X-ray the CXR one is its imputation."""
        flags = paired.to(ehr.dtype)
        if self.training:
            edges = self._edges(self.batch_similarity(ehr, cxr, paired, ehr_projected, cxr_projected))
            cxr_edges = edges * flags[None, :]
            ehr_hidden = self.ehr_graph.layer(0, neighbour_mean(edges, ehr))
            cxr_hidden = self.cxr_graph.layer(0, neighbour_mean(cxr_edges, cxr))
            return (self.ehr_graph.layer(1, neighbour_mean(edges, ehr_hidden)),
                    self.cxr_graph.layer(1, neighbour_mean(cxr_edges, cxr_hidden)))
        if self.reference_bank is None:
            bank = {key: ehr.new_zeros(0, ehr.shape[1]) for key in ("ehr", "cxr", "ehr_hidden", "cxr_hidden")}
            edges = cxr_edges = ehr.new_zeros(ehr.shape[0], 0)
        else:
            bank = self._encoded_bank()
            ehr_space = self.ehr_graph.kernel_space(ehr_projected, ehr)
            cxr_space = self.cxr_graph.kernel_space(cxr_projected, cxr)
            edges = self._edges(self._bank_similarity(bank, ehr_space, cxr_space, flags))
            cxr_edges = edges * bank["paired"][None, :]
        itself = torch.ones_like(flags)  # a stay's similarity to itself is 1, above any threshold
        ehr_hidden = self.ehr_graph.layer(0, neighbour_mean(edges, bank["ehr"], itself, ehr))
        cxr_hidden = self.cxr_graph.layer(0, neighbour_mean(cxr_edges, bank["cxr"], flags, cxr))
        return (self.ehr_graph.layer(1, neighbour_mean(edges, bank["ehr_hidden"], itself, ehr_hidden)),
                self.cxr_graph.layer(1, neighbour_mean(cxr_edges, bank["cxr_hidden"], flags, cxr_hidden)))

    # ------------------------------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> ModelOutput:
        """Logits (B, n_labels) and the weighted stability term ``stability``."""
        ehr, cxr, paired = self.encode(batch)
        ehr_projected = self.ehr_graph.projection(ehr)
        cxr_projected = self.cxr_graph.projection(cxr)
        ehr_graph, cxr_graph = self.graph_features(ehr, cxr, paired, ehr_projected, cxr_projected)
        final_ehr = self.ehr_graph.gate(ehr_graph, ehr)
        final_cxr = torch.where(paired[:, None], self.cxr_graph.gate(cxr_graph, cxr), cxr_graph)
        fused = self.dropout(torch.relu(self.fuse(torch.cat([final_ehr, final_cxr], dim=1))))
        present = paired.to(cxr_projected.dtype)[:, None]  # φ(0) ≠ 0: an unpaired row's projection is left out
        stability = (self.ehr_graph.stability(ehr_projected, ehr)
                     + self.cxr_graph.stability(cxr_projected * present, cxr * present))
        return ModelOutput(self.head(fused), {"stability": self.lambda_stability * stability})
