"""M3Care (``m3care``): the deep-kernel similarity over shared modalities, the threshold, the GCN that imputes a
missing X-ray from neighbours that have one (and never from those that do not), the gate, the stability term, and
evaluation against a fixed bank of training stays (batch-independent, drawn from 'train' only, re-encoded when the
weights change, exact on resume). Values are worked out with a second formulation in float64 numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehrcxr.models import Batch, create_model
from ehrcxr.models.m3care import threshold_edges
from ehrcxr.train.loop import fit
from test_models import FEATURES, N_LABELS, TINY_CXR, make_batch
from test_train import TRAIN, load, write_cell_files
from test_zoo_balance import assert_resume_is_exact

HIDDEN = 4


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def m3care(**params):
    torch.manual_seed(0)
    params = {"hidden": HIDDEN, "heads": 2, "dropout": 0.0, **params}
    return create_model("m3care", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(TINY_CXR), **params)


def id_batch(stay_ids, has_cxr) -> Batch:
    """A batch of the given stays whose features come from ``inject`` (its EHR and image contents are unused)."""
    size = len(stay_ids)
    return Batch(ehr=torch.zeros(size, 1, FEATURES), ehr_mask=torch.zeros(size, 1, 17),
                 ehr_length=torch.ones(size, dtype=torch.long), cxr=torch.zeros(size, 1, 1, 1),
                 has_cxr=torch.tensor(has_cxr, dtype=torch.float32), cxr_hours=torch.zeros(size),
                 labels=torch.zeros(size, N_LABELS), stay_id=torch.tensor(stay_ids))


def inject(model, ehr: torch.Tensor, cxr: torch.Tensor, zero_unpaired: bool = True) -> None:
    """Make the model's encoders return row ``stay_id`` of ``ehr`` / ``cxr`` (the CXR row zeroed without an X-ray,
    as the encoders do, unless ``zero_unpaired`` is False)."""
    def encode(batch):
        paired = batch.has_cxr > 0.5
        rows = cxr[batch.stay_id]
        return ehr[batch.stay_id], rows * paired[:, None] if zero_unpaired else rows, paired
    model.encode = encode


def identity_gcn(model) -> None:
    """Both GCN layers of both modalities become ReLU(aggregate): with non-negative features, the aggregate."""
    with torch.no_grad():
        for graph in (model.ehr_graph, model.cxr_graph):
            for layer in graph.gcn:
                layer.weight.copy_(torch.eye(HIDDEN))
                layer.bias.zero_()


def set_kernel(model, eps_ehr: float, eps_cxr: float, threshold: float, running_stats: bool = False) -> None:
    with torch.no_grad():
        model.ehr_graph.epsilon.fill_(eps_ehr)
        model.cxr_graph.epsilon.fill_(eps_cxr)
        model.threshold.fill_(threshold)
        if running_stats:  # non-trivial BatchNorm statistics for evaluation
            generator = torch.Generator().manual_seed(3)
            for graph in (model.ehr_graph, model.cxr_graph):
                for norm in (graph.projected_norm, graph.raw_norm):
                    norm.running_mean.copy_(torch.randn(HIDDEN, generator=generator) * 0.3)
                    norm.running_var.copy_(torch.rand(HIDDEN, generator=generator) + 0.5)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------------------- numpy reference
def as_np(tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def ref_space(graph, h: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(BN(ReLU(φ(h))), BN(h)) with batch statistics (train) or running statistics."""
    x = h
    for index in (0, 2, 4):
        layer = graph.projection[index]
        x = x @ as_np(layer.weight).T + as_np(layer.bias)
        if index < 4:
            x = np.maximum(x, 0)

    def norm(values, bn):
        mean, var = (values.mean(0), values.var(0)) if train else (as_np(bn.running_mean), as_np(bn.running_var))
        return (values - mean) / np.sqrt(var + bn.eps) * as_np(bn.weight) + as_np(bn.bias)
    return norm(np.maximum(x, 0), graph.projected_norm), norm(h, graph.raw_norm)


def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def ref_bandwidth(points: np.ndarray) -> float:
    n = len(points)
    if n < 2:
        return 1.0
    mean = sq_dist(points, points).sum() / (n * n - n)
    return 1.0 if mean < 1e-3 else mean


def ref_kernel(graph, queries, keys, bandwidths) -> np.ndarray:
    def gaussian(a, b, width):
        d = sq_dist(a, b)
        return (np.exp(-d / (0.5 * width)) + np.exp(-d / width) + np.exp(-d / (2 * width))) / 3
    mix = 1 / (1 + math.exp(-graph.epsilon.item()))
    return ((1 - mix) * gaussian(queries[0], keys[0], bandwidths[0]) + mix) * gaussian(queries[1], keys[1],
                                                                                      bandwidths[1])


def ref_batch_similarity(model, ehr, cxr, has) -> np.ndarray:
    """Training: S_ij = (k_ehr + k_cxr c_i c_j) / (1 + c_i c_j), kernels and statistics over the batch (the CXR
    kernel over its paired stays only)."""
    space = ref_space(model.ehr_graph, ehr, train=True)
    k_ehr = ref_kernel(model.ehr_graph, space, space, [ref_bandwidth(s) for s in space])
    paired = np.flatnonzero(has)
    cxr_space = ref_space(model.cxr_graph, cxr[paired], train=True)
    k_cxr = np.zeros_like(k_ehr)
    k_cxr[np.ix_(paired, paired)] = ref_kernel(model.cxr_graph, cxr_space, cxr_space,
                                               [ref_bandwidth(s) for s in cxr_space])
    both = np.outer(has, has)
    return (k_ehr + k_cxr * both) / (1 + both)


def mix_rows(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Row i: Σ_j w_ij v_j / Σ_j w_ij, written out (0 without weight)."""
    out = np.zeros((weights.shape[0], values.shape[1]))
    for i in range(weights.shape[0]):
        total = sum(weights[i, j] * values[j] for j in range(weights.shape[1]))
        if weights[i].sum() > 0:
            out[i] = total / weights[i].sum()
    return out


def nonnegative_features(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, HIDDEN, generator=generator).abs(),
            torch.randn(size, HIDDEN, generator=generator).abs() + 0.1)


def graph_inputs(model, batch):
    ehr, cxr, paired = model.encode(batch)
    return ehr, cxr, paired, model.ehr_graph.projection(ehr), model.cxr_graph.projection(cxr)


# ----------------------------------------------------------------------------------------- training graph
def test_similarity_is_the_mean_of_deep_gaussian_kernels_over_the_modalities_both_stays_have():
    model = m3care().train()
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=0.0)
    ehr, cxr = nonnegative_features(6, seed=1)
    has = [1, 0, 1, 1, 0, 1]
    inject(model, ehr, cxr)
    with torch.no_grad():
        similarity = model.batch_similarity(*graph_inputs(model, id_batch(range(6), has)))
    expected = ref_batch_similarity(model, as_np(ehr), as_np(cxr), np.array(has, dtype=float))
    np.testing.assert_allclose(as_np(similarity), expected, rtol=1e-4, atol=1e-6)
    # a pair without both X-rays is the EHR kernel alone; the diagonal is 1
    assert 0 < expected[0, 1] < 1 and np.allclose(np.diag(expected), 1.0)


def test_imputed_xray_is_the_similarity_weighted_mix_of_batch_neighbours_that_have_one():
    model = m3care().train()
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=-20.0)  # σ(θ) ≈ 0: every edge kept
    identity_gcn(model)
    ehr, cxr = nonnegative_features(5, seed=2)
    has = np.array([1, 1, 0, 1, 0], dtype=float)
    inject(model, ehr, cxr)
    with torch.no_grad():
        ehr_graph, cxr_graph = model.graph_features(*graph_inputs(model, id_batch(range(5), has.tolist())))
    similarity = ref_batch_similarity(model, as_np(ehr), as_np(cxr), has)
    features = as_np(cxr) * has[:, None]
    # CXR graph: only the columns of stays with an X-ray; layer 1 mixes their features, layer 2 their layer-1 outputs
    weights = similarity * has[None, :]
    first = mix_rows(weights, features)
    expected = mix_rows(weights, first)
    np.testing.assert_allclose(as_np(cxr_graph), expected, rtol=1e-4, atol=1e-6)
    # stay 2 (no X-ray) by hand: a convex mix of the X-rays of stays 0, 1, 3 through their own layer-1 mixes
    w = similarity[2, [0, 1, 3]] / similarity[2, [0, 1, 3]].sum()
    np.testing.assert_allclose(as_np(cxr_graph[2]), w @ first[[0, 1, 3]], rtol=1e-4)
    assert as_np(cxr_graph[2]).min() > 0.1  # imputed from neighbours, not the GCN bias (0 here)
    # EHR graph: every stay is a neighbour
    np.testing.assert_allclose(as_np(ehr_graph), mix_rows(similarity, mix_rows(similarity, as_np(ehr))),
                               rtol=1e-4, atol=1e-6)


def test_unpaired_neighbours_never_contribute_to_the_xray_graph():
    model = m3care().train()
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=-20.0)
    ehr, cxr = nonnegative_features(5, seed=3)
    has = [1, 1, 0, 1, 0]
    batch = id_batch(range(5), has)
    inject(model, ehr, cxr)
    with torch.no_grad():
        clean = graph_inputs(model, batch)
        clean_similarity = model.batch_similarity(*clean)
        clean_graph = model.graph_features(*clean)[1]
        clean_stability = model(batch).aux_losses["stability"]
    # whatever an unpaired stay's CXR row holds (CareBench: the zero image's features), it never enters: not the
    # kernel, its BatchNorm statistics or bandwidth, the GCN, nor the stability term
    garbage_cxr = cxr * 50 + 3
    inject(model, ehr, torch.where(torch.tensor(has)[:, None] > 0, cxr, garbage_cxr), zero_unpaired=False)
    with torch.no_grad():
        noisy = graph_inputs(model, batch)
        torch.testing.assert_close(model.batch_similarity(*noisy), clean_similarity)
        torch.testing.assert_close(model.graph_features(*noisy)[1], clean_graph)
        torch.testing.assert_close(model(batch).aux_losses["stability"], clean_stability)


def test_threshold_cuts_weak_edges_and_keeps_strong_ones_at_their_similarity():
    similarity = torch.tensor([[1.0, 0.3, 0.7], [0.3, 1.0, 0.45], [0.7, 0.45, 1.0]])
    theta = torch.tensor(0.0, requires_grad=True)  # t = 0.5
    edges = threshold_edges(similarity, theta)
    torch.testing.assert_close(edges, torch.tensor([[1.0, 0.0, 0.7], [0.0, 1.0, 0.0], [0.7, 0.0, 1.0]]))
    edges.sum().backward()  # d(s − t + t̄)/dθ = −σ'(θ) = −0.25 per kept edge (5 kept)
    assert theta.grad.item() == pytest.approx(-5 * 0.25)

    # in the model: with t between a stay's similarities, its weaker X-ray neighbours drop out of its imputation
    model = m3care().train()
    identity_gcn(model)
    ehr, cxr = nonnegative_features(6, seed=4)
    has = np.array([1, 1, 0, 1, 0, 1], dtype=float)
    inject(model, ehr, cxr)
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=0.0)
    similarity = ref_batch_similarity(model, as_np(ehr), as_np(cxr), has)
    cut = float(np.median(similarity[2, [0, 1, 3, 5]]))  # stay 2 keeps 2 of its 4 X-ray neighbours
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=logit(cut))
    with torch.no_grad():
        cxr_graph = model.graph_features(*graph_inputs(model, id_batch(range(6), has.tolist())))[1]
    kept = np.where(similarity > cut, similarity, 0.0)
    assert (kept[2, [0, 1, 3, 5]] > 0).sum() == 2
    weights = kept * has[None, :]
    expected = mix_rows(weights, mix_rows(weights, as_np(cxr) * has[:, None]))
    np.testing.assert_allclose(as_np(cxr_graph), expected, rtol=1e-4, atol=1e-6)
    all_kept = mix_rows(similarity * has, mix_rows(similarity * has, as_np(cxr) * has[:, None]))
    assert np.abs(expected[2] - all_kept[2]).max() > 1e-3


def test_gate_mixes_a_paired_xray_with_its_graph_feature_and_an_unpaired_one_takes_the_imputation():
    model = m3care()
    gate = model.cxr_graph
    with torch.no_grad():
        gate.graph_gate.weight.zero_()
        gate.graph_gate.bias.zero_()  # σ = 1/2
        gate.own_gate.weight.zero_()
        gate.own_gate.bias.fill_(-math.log(3))  # σ = 1/4 -> share of the graph feature (1/2) / (3/4) = 2/3
    graph, own = torch.tensor([[3.0, 0.0, 6.0, 3.0]]), torch.tensor([[0.0, 3.0, 0.0, 3.0]])
    torch.testing.assert_close(gate.gate(graph, own), torch.tensor([[2.0, 1.0, 4.0, 3.0]]))
    # the CXR gate reaches the logits of paired stays only
    model.train()
    batch = make_batch([1, 0, 1, 1, 0, 0])
    torch.manual_seed(0)
    before = model(batch).logits
    with torch.no_grad():
        gate.own_gate.bias.fill_(3.0)
        gate.graph_gate.weight.normal_()
    torch.manual_seed(0)
    after = model(batch).logits
    paired = batch.has_cxr > 0.5
    torch.testing.assert_close(after[~paired], before[~paired], rtol=0, atol=0)
    assert (after[paired] - before[paired]).abs().min() > 0


def test_stability_loss_matches_hand_computation():
    model = m3care(lambda_stability=0.5).train()
    with torch.no_grad():  # φ maps every row to (3, 4, 0, 0) for the EHR, (1, 0, 0, 0) for the CXR
        for graph, bias in ((model.ehr_graph, [3.0, 4.0, 0.0, 0.0]), (model.cxr_graph, [1.0, 0.0, 0.0, 0.0])):
            graph.projection[4].weight.zero_()
            graph.projection[4].bias.copy_(torch.tensor(bias))
    ehr = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [2, 2, 0, 0]])  # ‖E‖_F = √13, ‖φ(E)‖_F = 5√3
    cxr = torch.tensor([[1.0, 1, 0, 0], [9, 9, 9, 9], [3, 0, 0, 0]])  # paired rows 0, 2: √11; ‖φ‖_F = √2
    inject(model, ehr, cxr, zero_unpaired=False)  # row 1 has no X-ray: left out despite its values
    aux = model(id_batch(range(3), [1, 0, 1])).aux_losses
    expected = 0.5 * (abs(5 * math.sqrt(3) - math.sqrt(13)) + abs(math.sqrt(2) - math.sqrt(11)))
    assert aux["stability"].item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------- evaluation
def rows_of(batch: Batch, rows) -> Batch:
    index = torch.as_tensor(rows)
    return Batch(**{name: getattr(batch, name)[index] for name in batch.__dataclass_fields__})


def test_eval_prediction_does_not_depend_on_the_other_stays_in_its_batch():
    model = m3care(hidden=8)
    model.set_reference_bank(make_batch([1, 0, 1, 1, 0, 1, 1, 0], seed=9))
    model.eval()
    stays = make_batch([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1], seed=4)
    with torch.no_grad():
        alone = torch.cat([model(rows_of(stays, [row])).logits for row in (0, 1)])
        with_a = model(rows_of(stays, [0, 1, 2, 3, 4])).logits[:2]
        with_b = model(rows_of(stays, [5, 6, 7, 8, 9, 10, 11, 0, 1])).logits[-2:]
        no_bank_model = m3care(hidden=8).eval()
        no_bank = no_bank_model(rows_of(stays, [0, 1])).logits
    torch.testing.assert_close(with_a, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(with_b, alone, rtol=1e-6, atol=1e-6)
    assert (alone - no_bank).abs().max() > 1e-4  # the bank is used
    # in training the graph is the batch: the same stays get other logits with other batch mates
    model.train()
    with torch.no_grad():
        train_a = model(rows_of(stays, [0, 1, 2, 3, 4])).logits[:2]
        train_b = model(rows_of(stays, [5, 6, 7, 8, 9, 10, 11, 0, 1])).logits[-2:]
    assert (train_a - train_b).abs().max() > 1e-4


def test_eval_neighbours_are_the_stay_itself_and_the_bank_only():
    model = m3care()
    identity_gcn(model)
    ehr, cxr = nonnegative_features(9, seed=5)  # stays 0-5: the bank, 6-8: evaluated
    bank_has = np.array([1, 0, 1, 1, 0, 1], dtype=float)
    query_has = np.array([1, 0, 0], dtype=float)
    inject(model, ehr, cxr)
    model.set_reference_bank(id_batch(range(6), bank_has.tolist()))
    set_kernel(model, eps_ehr=0.4, eps_cxr=-1.0, threshold=logit(0.3), running_stats=True)
    model.eval()
    with torch.no_grad():
        ehr_graph, cxr_graph = model.graph_features(*graph_inputs(model, id_batch([6, 7, 8], query_has.tolist())))

    e, c = as_np(ehr), as_np(cxr) * np.concatenate([bank_has, query_has])[:, None]
    bank_e, bank_c, query_e, query_c = e[:6], c[:6], e[6:], c[6:]
    graphs = model.ehr_graph, model.cxr_graph
    bank_space = [ref_space(g, x, train=False) for g, x in zip(graphs, (bank_e, bank_c))]
    query_space = [ref_space(g, x, train=False) for g, x in zip(graphs, (query_e, query_c))]
    paired = np.flatnonzero(bank_has)
    widths = [[ref_bandwidth(s) for s in bank_space[0]], [ref_bandwidth(s[paired]) for s in bank_space[1]]]

    def similarity(space, has):
        k_ehr = ref_kernel(graphs[0], space[0], bank_space[0], widths[0])
        k_cxr = ref_kernel(graphs[1], space[1], bank_space[1], widths[1])
        both = np.outer(has, bank_has)
        s = (k_ehr + k_cxr * both) / (1 + both)
        return np.where(s > 0.3, s, 0.0)
    bank_edges, edges = similarity(bank_space, bank_has), similarity(query_space, query_has)
    # the bank's own first layer: over the bank's graph alone
    bank_ehr1, bank_cxr1 = mix_rows(bank_edges, bank_e), mix_rows(bank_edges * bank_has, bank_c)
    # an evaluated stay: itself (weight 1; for the X-ray only if it has one) + the bank, in both layers
    with_self = np.hstack([np.ones((3, 1)), edges])
    with_self_cxr = np.hstack([query_has[:, None], edges * bank_has])
    ehr1 = np.array([mix_rows(with_self[[i]], np.vstack([query_e[[i]], bank_e]))[0] for i in range(3)])
    ehr2 = np.array([mix_rows(with_self[[i]], np.vstack([ehr1[[i]], bank_ehr1]))[0] for i in range(3)])
    cxr1 = np.array([mix_rows(with_self_cxr[[i]], np.vstack([query_c[[i]], bank_c]))[0] for i in range(3)])
    cxr2 = np.array([mix_rows(with_self_cxr[[i]], np.vstack([cxr1[[i]], bank_cxr1]))[0] for i in range(3)])
    assert 0 < (edges > 0).sum() < edges.size  # the threshold cut some edges and kept others
    np.testing.assert_allclose(as_np(ehr_graph), ehr2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(as_np(cxr_graph), cxr2, rtol=1e-4, atol=1e-6)


def test_encoded_bank_follows_the_weights():
    model, other = m3care(hidden=8), m3care(hidden=8)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    bank = make_batch([1, 0, 1, 1, 0, 1], seed=9)
    stays = make_batch([1, 0, 1, 0], seed=4)
    for network in (model, other):
        network.set_reference_bank(bank)
        network.eval()
    with torch.no_grad():
        expected = other(stays).logits
        model(stays)  # encodes the bank with the first weights
        model.load_state_dict(other.state_dict())  # still in eval mode, as after fit() selects its best epoch
        torch.testing.assert_close(model(stays).logits, expected, rtol=0, atol=0)


def test_bank_is_drawn_from_train_only_deterministically(tmp_path):
    data = load(write_cell_files(tmp_path))
    train_ids = set(data.splits["train"].stay_id.tolist())
    other_ids = {i for name in ("val", "paired_test", "partial_test") for i in data.splits[name].stay_id.tolist()}
    model = m3care(bank_size=32)
    model.on_fit_start(data, {})
    bank = model.reference_bank.stay_id.tolist()
    assert len(bank) == len(set(bank)) == 32 and set(bank) <= train_ids and not set(bank) & other_ids
    again = m3care(bank_size=32)
    torch.rand(5)  # the bank has its own generator: the global random state does not matter
    again.on_fit_start(data, {})
    assert again.reference_bank.stay_id.tolist() == bank
    data.seed = 2
    again.on_fit_start(data, {})
    assert again.reference_bank.stay_id.tolist() != bank
    whole = m3care(bank_size=10_000)
    whole.on_fit_start(data, {})
    assert sorted(whole.reference_bank.stay_id.tolist()) == sorted(train_ids)


def _fit_m3care(files, out_dir, epochs: int):
    data = load(files)
    torch.manual_seed(0)
    model = create_model("m3care", n_labels=1, ehr_features=data.ehr_features,
                         cxr={"depth": 18, "weights": None, "frozen_stages": 4}, hidden=8, heads=2, bank_size=24)
    return model, fit(model, data, out_dir, seed=1, run_key="m3care", **dict(TRAIN, epochs=epochs))


def test_resumed_run_is_exact(tmp_path):
    straight, _ = assert_resume_is_exact(_fit_m3care, tmp_path, 3, 2)
    assert straight.reference_bank.cxr.shape[1:] == (512, 1, 1)  # the bank is served precomputed X-ray features
