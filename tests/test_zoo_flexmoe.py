"""Tests for Flex-MoE: routing by modality combination (G-router / S-router), top-k sparse mixture, the
load-balancing gate loss and its schedule, the missing-modality bank, and the EHR / X-ray patch tokens (tiny sizes,
one thread)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_models import FEATURES, MIXED, N_LABELS, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.models import create_model
from ehrcxr.models.flexmoe import (EHR_ONLY, FULL, CombinationRouter, SparseMoE, balance_loss, prob_in_top_k,
                                   window_means)

torch.set_num_threads(1)

CXR = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}
PAIRED, UNPAIRED = [0, 2, 3], [1, 4, 5]  # the rows of MIXED with and without an X-ray


def build(seed: int = 0, cxr: dict | None = None, **params):
    torch.manual_seed(seed)
    settings = dict(hidden=16, num_patches=4, num_experts=4, top_k=2, num_routers=2, heads=4, ehr_layers=1)
    return create_model("flexmoe", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(cxr or CXR),
                        **(settings | params))


def router_with(gates: list[np.ndarray], top_k: int) -> CombinationRouter:
    """A router whose gate matrices (d × experts, one per router) are ``gates``."""
    router = CombinationRouter(gates[0].shape[0], gates[0].shape[1], top_k, len(gates)).eval()
    with torch.no_grad():
        router.gate.copy_(torch.tensor(np.stack(gates), dtype=torch.float32))
    return router


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def cv2(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return values.var(ddof=1) / values.mean() ** 2


# ----------------------------------------------------------------------------------------- routing by combination
@pytest.mark.parametrize("num_routers", [1, 2])
def test_routing_depends_on_the_modality_combination(num_routers):
    rng = np.random.default_rng(0)
    gates = [rng.normal(size=(3, 4)) for _ in range(num_routers)]
    router = router_with(gates, top_k=2)
    x = rng.normal(size=(3, 3))
    tokens = torch.tensor(np.concatenate([x, x]), dtype=torch.float32)  # the same tokens under both combinations
    combination = torch.tensor([FULL] * 3 + [EHR_ONLY] * 3)
    with torch.no_grad():
        chosen, weights, _ = router(tokens, combination, torch.ones(6, dtype=torch.bool))
    for row in range(6):
        if row < 3:  # G-router: the top 2 of router 0's logits
            logits = x[row] @ gates[0]
            expected = list(np.argsort(-logits)[:2])
        else:  # S-router: expert 1 (EHR-only's index) fixed first, then the best other expert of its router
            logits = x[row - 3] @ gates[-1]
            others = [e for e in np.argsort(-logits) if e != EHR_ONLY]
            expected = [EHR_ONLY, others[0]]
        assert chosen[row].tolist() == expected
        np.testing.assert_allclose(weights[row].numpy(), softmax(logits[expected]), rtol=1e-5)
    assert all(EHR_ONLY in chosen[row].tolist() for row in range(3, 6))
    assert not torch.equal(weights[:3], weights[3:])  # same tokens, other combination: other gates


def test_paired_and_unpaired_rows_use_their_combinations_router():
    model = build(ehr_layers=0).eval()
    batch = make_batch(MIXED)
    router = model.layers[0].feedforward.router
    seen = []
    handle = router.register_forward_hook(lambda module, args, output: seen.append(args[1].clone()))
    before = model(batch).logits
    handle.remove()
    tokens = model.num_patches + model.grid ** 2
    expected = torch.tensor([FULL if row in PAIRED else EHR_ONLY for row in range(6)]).repeat_interleave(tokens)
    assert torch.equal(seen[0], expected)
    for index, changed_rows in ((1, UNPAIRED), (0, PAIRED)):  # perturb one router: only its combination's rows move
        with torch.no_grad():
            router.gate[index].mul_(-3.0)
        after = model(batch).logits
        with torch.no_grad():
            router.gate[index].div_(-3.0)
        kept = [row for row in range(6) if row not in changed_rows]  # (other expert slices: float rounding only)
        torch.testing.assert_close(after[kept], before[kept], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after[changed_rows], before[changed_rows], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------- top-k sparse mixture
def test_top_k_mixes_exactly_k_experts_by_renormalised_gates():
    torch.manual_seed(0)
    moe = SparseMoE(8, num_experts=5, top_k=2, num_routers=2)
    x = torch.randn(3, 4, 8)
    combination = torch.tensor([FULL, EHR_ONLY, FULL])
    valid = torch.ones(3, 4, dtype=torch.bool)
    moe.train()  # noisy routing: still exactly k distinct experts, positive weights summing to 1
    chosen, weights, _ = moe.router(x.reshape(12, 8), combination.repeat_interleave(4), valid.reshape(-1))
    assert chosen.shape == (12, 2) and all(len(set(row.tolist())) == 2 for row in chosen)
    assert bool((weights > 0).all()) and torch.allclose(weights.sum(1), torch.ones(12))
    _, redrawn, _ = moe.router(x.reshape(12, 8), combination.repeat_interleave(4), valid.reshape(-1))
    assert not torch.equal(redrawn, weights)  # the gate noise is drawn afresh in training (none in eval)
    moe.eval()
    output, _ = moe(x, combination, valid)
    chosen, weights, _ = moe.router(x.reshape(12, 8), combination.repeat_interleave(4), valid.reshape(-1))
    gates = torch.zeros(12, 5).scatter(1, chosen, weights)
    assert ((gates > 0).sum(1) == 2).all()
    dense = torch.stack([expert(x.reshape(12, 8)) for expert in moe.experts], dim=1)  # every expert on every token
    torch.testing.assert_close(output.reshape(12, 8), (gates[..., None] * dense).sum(1), rtol=1e-5, atol=1e-6)
    idle = [e for e in range(5) if e not in chosen[0].tolist()][0]  # an expert token 0 does not use
    with torch.no_grad():
        moe.experts[idle][0].weight.mul_(5.0)
    changed, _ = moe(x, combination, valid)
    torch.testing.assert_close(changed[0, 0], output[0, 0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- gate loss
def test_balance_loss_is_zero_when_balanced_and_matches_hand_values():
    balanced = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert float(balance_loss(balanced, balanced > 0)) == 0.0
    # importance [1.7, 0.3] (mean 1, unbiased var 0.98), load [2, 1] (mean 1.5, var 0.5): 0.98 + 0.5/2.25
    gates = torch.tensor([[0.8, 0.2], [0.9, 0.1]])
    load = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert float(balance_loss(gates, load)) == pytest.approx(0.98 + 0.5 / 2.25, rel=1e-5)
    assert float(balance_loss(gates, load)) > float(balance_loss(balanced, balanced > 0))


def test_router_gate_loss_matches_hand_computation():
    # two experts, top-1, full-combination tokens only: one token per expert is balanced (loss 0), both on one is
    # importance [2, 0] and load [2, 0]: cv² = 2 each (unbiased variance 2, mean 1)
    router = router_with([np.eye(2)], top_k=1)
    full, valid = torch.tensor([FULL, FULL]), torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        _, _, balanced = router(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), full, valid)
        _, _, uneven = router(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), full, valid)
    assert float(balanced) == 0.0 and float(uneven) == pytest.approx(4.0)
    # three experts, top-2, full and EHR-only tokens and one padding token (never counted)
    rng = np.random.default_rng(1)
    gate = rng.normal(size=(3, 3))
    router = router_with([gate, gate], top_k=2)
    x = rng.normal(size=(5, 3))
    combination = torch.tensor([FULL, FULL, FULL, EHR_ONLY, EHR_ONLY])
    valid = torch.tensor([True, True, False, True, True])
    with torch.no_grad():
        _, _, loss = router(torch.tensor(x, dtype=torch.float32), combination, valid)
    logits = x @ gate
    gates = np.zeros((5, 3))
    for row in range(5):
        chosen = list(np.argsort(-logits[row])[:2]) if row < 3 else \
            [EHR_ONLY, [e for e in np.argsort(-logits[row]) if e != EHR_ONLY][0]]
        gates[row, chosen] = softmax(logits[row, chosen])
    full_rows, partial_rows, free = [0, 1], [3, 4], [0, 2]
    expected = cv2(gates[full_rows].sum(0)) + cv2((gates[full_rows] > 0).sum(0))
    expected += cv2(gates[partial_rows][:, free].sum(0)) + cv2((gates[partial_rows][:, free] > 0).sum(0))
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected += -log_softmax[partial_rows, EHR_ONLY].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_smooth_load_is_the_probability_of_staying_in_the_top_k():
    # Monte Carlo with the other experts' noisy scores held fixed, for a free token and an S-routed token whose
    # expert 1 is fixed (offset score): the fixed expert is in with probability 1, the others compete for k - 1
    generator = torch.Generator().manual_seed(0)
    clean = torch.tensor([[0.3, -0.2, 0.1, 0.0], [0.2, 0.4, -0.1, 0.25]])
    std = torch.tensor([[0.3, 0.5, 0.2, 0.4], [0.3, 0.2, 0.5, 0.4]])
    noisy = clean + torch.randn(2, 4, generator=generator) * std
    offset = torch.tensor([[0.0] * 4, [0.0, 1e4, 0.0, 0.0]])
    k = 2
    top = (noisy + offset).topk(k + 1, dim=1).values
    probability = prob_in_top_k(clean + offset, noisy + offset, std, top, k)
    draws = 40000
    for row in range(2):
        for expert in range(4):
            trial = (noisy[row] + offset[row]).repeat(draws, 1)
            redrawn = torch.randn(draws, generator=generator) * std[row, expert]
            trial[:, expert] = clean[row, expert] + offset[row, expert] + redrawn
            inside = (trial.topk(k, dim=1).indices == expert).any(1).float().mean()
            assert float(probability[row, expert]) == pytest.approx(float(inside), abs=0.01)
    assert float(probability[1, 1]) == 1.0


def test_gate_loss_weight_follows_carebenchs_schedule():
    model = build(gate_loss_weight=0.1).eval()
    step = SimpleNamespace(epochs=20)  # the trainer's TrainStep carries the run's maximum number of epochs
    batch = make_batch(MIXED)
    with torch.no_grad():
        raw = float(model(batch).aux_losses["gate"]) / 0.1  # before any epoch hook: the full weight
        assert raw > 0
        for epoch, factor in ((1, 1.0), (11, 0.75), (21, 0.5), (40, 0.5)):
            model.on_train_epoch_start(epoch, step)
            assert float(model(batch).aux_losses["gate"]) == pytest.approx(0.1 * factor * raw, rel=1e-5)


def test_gate_loss_trains_both_routers_and_every_part_is_used():
    model = build().train()
    batch = make_batch(MIXED)
    output = model(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels)
    (loss + output.aux_losses["gate"]).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    router = model.layers[0].feedforward.router
    assert all(bool(router.gate.grad[index].abs().sum() > 0) for index in (FULL, EHR_ONLY))
    assert has_grad(cxr_params(model))
    model.zero_grad()
    model(batch).aux_losses["gate"].backward()  # the gate loss alone reaches the gate and the noise matrices
    assert bool(router.gate.grad.abs().sum() > 0) and bool(router.noise.grad.abs().sum() > 0)


# ----------------------------------------------------------------------------------------- missing-modality bank
def test_missing_bank_stands_in_for_unpaired_xrays_only():
    model = build().eval()
    batch = make_batch(MIXED)
    tokens, valid = model.xray_tokens(batch)
    for row in UNPAIRED:
        assert torch.equal(tokens[row], model.missing_xray) and bool(valid[row].all())
    for row in PAIRED:
        assert not torch.allclose(tokens[row], model.missing_xray)
    before = model(batch).logits
    with torch.no_grad():
        model.missing_xray.add_(1.0)
    after = model(batch).logits
    torch.testing.assert_close(after[PAIRED], before[PAIRED], rtol=0, atol=0)
    assert not torch.allclose(after[UNPAIRED], before[UNPAIRED])
    model.train()  # every row paired: the bank gets no gradient, not even through the gate loss
    every = make_batch([1] * 6)
    output = model(every)
    (output.logits.sum() + output.aux_losses["gate"]).backward()
    assert model.missing_xray.grad is None or float(model.missing_xray.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------- patch tokens
def test_ehr_patches_are_window_means_of_the_valid_hours():
    tokens = torch.arange(2 * STEPS * 1, dtype=torch.float32).view(2, STEPS, 1)  # hour values 0..5 and 6..11
    means, valid = window_means(tokens, torch.tensor([6, 3]), 4)  # windows of 2 hours: [0,1] [2,3] [4,5] [6,7]
    assert means[0, :, 0].tolist() == [0.5, 2.5, 4.5, 0.0] and valid[0].tolist() == [True, True, True, False]
    assert means[1, :, 0].tolist() == [6.5, 8.0, 0.0, 0.0] and valid[1].tolist() == [True, True, False, False]
    model = build(ehr_layers=0, num_patches=3).eval()  # hours embedded alone: patch = mean of embedded hours
    batch = make_batch(MIXED)
    patches, patch_valid = model.ehr_patches(batch)
    embedded = model.ehr_encoder.embed(batch.ehr) + model.ehr_encoder.position[:, :STEPS]
    for row, length in enumerate(batch.ehr_length.tolist()):
        for patch in range(3):
            hours = [h for h in (2 * patch, 2 * patch + 1) if h < length]
            assert bool(patch_valid[row, patch]) == bool(hours)
            if hours:
                torch.testing.assert_close(patches[row, patch], embedded[row, hours].mean(0))


def test_xray_tokens_pool_the_feature_map_to_the_patch_grid():
    model = build(num_patches=4).eval()  # grid 2 x 2
    batch = make_batch([1, 0])
    batch.cxr = torch.randn(2, 1, 128, 128) * batch.has_cxr[:, None, None, None]
    tokens, valid = model.xray_tokens(batch)
    feature_map = model.cxr_backbone.feature_map(batch.cxr[:1])[0]  # layer4 of 128 px: 4 x 4
    assert feature_map.shape[1:] == (4, 4)
    blocks = feature_map.view(-1, 2, 2, 2, 2).mean(dim=(2, 4)).flatten(1).T  # mean of each 2 x 2 block, row-major
    torch.testing.assert_close(tokens[0], model.xray_projection(blocks))
    assert valid.all()
    model = build(num_patches=16).eval()  # grid 4 x 4, but a 64 px image gives a 2 x 2 map: 4 tokens + 12 padding
    batch.cxr = torch.randn(2, 1, 64, 64) * batch.has_cxr[:, None, None, None]
    tokens, valid = model.xray_tokens(batch)
    feature_map = model.cxr_backbone.feature_map(batch.cxr[:1])[0]
    torch.testing.assert_close(tokens[0, :4], model.xray_projection(feature_map.flatten(1).T))
    assert valid[0].tolist() == [True] * 4 + [False] * 12 and bool(valid[1].all())
