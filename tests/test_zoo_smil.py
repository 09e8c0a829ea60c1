"""SMIL (``smil``): k-means prototypes of the training split's X-ray features only, refreshed every epoch; the
reconstruction of a missing X-ray as the softplus-weighted mean of the prototypes, used for unpaired stays in
evaluation; the inner loop's functional adaptation (all but the EHR encoder, second order) and the outer loss by
hand; exact resume."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ehrcxr.data.datasets import CellData, StaySet
from ehrcxr.models import create_model
from ehrcxr.models.smil import kmeans, meta_validation_loss, reconstruct
from ehrcxr.train.loop import TrainStep, fit
from test_models import FEATURES, MIXED, N_LABELS, TINY_CXR, make_batch
from test_train import TRAIN, load
from test_zoo_balance import assert_resume_is_exact

FROZEN_CXR = {"depth": 18, "weights": None, "frozen_stages": 4}  # every stage frozen: pooled features or images


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def smil_model(cxr=FROZEN_CXR, **params):
    torch.manual_seed(0)
    params = {"hidden": 4, "heads": 2, "head_hidden": 5, "n_clusters": 3, "dropout": 0.0, **params}
    return create_model("smil", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(cxr), **params)


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


def fix_mean_weights(model, weights: list[float]) -> None:
    """Make the inference network give the mean weights softplus⁻¹(weights) whatever the EHR."""
    last = model.inference[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([inverse_softplus(w) for w in weights]))


# prototypes [6, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2, -2] with softplus weights 1, 2, 3: (6, 6, 6, -6) / 6
PROTOTYPES = torch.tensor([[6.0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2, -2]])
RECONSTRUCTION = torch.tensor([1.0, 1.0, 1.0, -1.0])


# ----------------------------------------------------------------------------------------- k-means
def test_kmeans_finds_separated_clusters_deterministically():
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = torch.cat([mean + 0.1 * torch.randn(7, 2, generator=generator, dtype=torch.float64) for mean in means])
    centres = kmeans(points, 3)
    expected = torch.stack([points[7 * k:7 * (k + 1)].mean(0) for k in range(3)])
    order = [int(torch.cdist(mean[None], centres).argmin()) for mean in means]
    torch.testing.assert_close(centres[order], expected)
    scattered = torch.randn(200, 2, generator=generator, dtype=torch.float64)  # many local optima
    first = kmeans(scattered, 5)
    torch.manual_seed(123)  # whatever the global random state: the same points, the same centres
    assert torch.equal(kmeans(scattered, 5), first)
    torch.testing.assert_close(kmeans(points[:2], 3), points[[0, 1, 0]])  # fewer points than clusters
    assert torch.equal(kmeans(points[:0], 3), torch.zeros(3, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- prototypes
def stay_set(name: str, has_cxr: list[int], cxr_row: list[int], features: torch.Tensor) -> StaySet:
    size = len(has_cxr)
    generator = torch.Generator().manual_seed(len(name))
    stays = StaySet(name, np.arange(size), torch.randn(size, 3, FEATURES, generator=generator).numpy(),
                    np.zeros((size, 3, 17)), np.full(size, 3), np.zeros((size, N_LABELS)), np.array(has_cxr),
                    np.zeros(size), np.array(cxr_row), images=None)
    stays.use_cxr_features(features, np.arange(features.shape[0]))
    return stays


def cell(features: torch.Tensor) -> CellData:
    """Train: 6 paired stays (cache rows 0-5), one unpaired and one whose X-ray (row 6) is withheld (has_cxr 0);
    val and test: paired stays on rows 7-10."""
    splits = {"train": stay_set("train", [1, 1, 0, 1, 1, 0, 1, 1], [0, 1, -1, 2, 3, 6, 4, 5], features),
              "val": stay_set("val", [1, 1], [7, 8], features),
              "paired_test": stay_set("paired_test", [1, 1], [9, 10], features),
              "partial_test": stay_set("partial_test", [1, 0, 1], [9, -1, 10], features)}
    return CellData("mortality", "natural", 1, ["a", "b", "c"], splits, FEATURES)


def pooled_features(seed: int = 0) -> torch.Tensor:
    return torch.randn(11, 512, 1, 1, generator=torch.Generator().manual_seed(seed))


def expected_prototypes(model, features: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """k-means of the projected pooled features of the given cache rows, worked out with the projection's weights."""
    projection = model.cxr_encoder.projection
    projected = features[rows].flatten(1).double() @ projection.weight.double().T + projection.bias.double()
    return kmeans(projected, model.prototypes.shape[0]).float()


def test_prototypes_come_from_the_training_xrays_only():
    model = smil_model().train()
    features = pooled_features()
    model.on_fit_start(cell(features), {})
    prototypes = model.prototypes.clone()
    assert prototypes.abs().sum() > 0
    torch.testing.assert_close(prototypes, expected_prototypes(model, features, [0, 1, 2, 3, 4, 5]))
    assert model.training and model.cxr_encoder.training  # encoded in eval mode, then put back

    changed = features.clone()
    changed[6:] = torch.randn(5, 512, 1, 1) * 10  # the withheld training X-ray and every val/test X-ray
    model.on_fit_start(cell(changed), {})
    assert torch.equal(model.prototypes, prototypes)

    changed[3] = changed[3] + 5.0  # one paired training X-ray
    model.on_fit_start(cell(changed), {})
    assert not torch.allclose(model.prototypes, prototypes)
    torch.testing.assert_close(model.prototypes, expected_prototypes(model, changed, [0, 1, 2, 3, 4, 5]))


def test_epoch_hook_refreshes_the_prototypes_from_the_current_encoder():
    model = smil_model()
    features = pooled_features()
    data = cell(features)
    model.on_fit_start(data, {})
    before = model.prototypes.clone()
    with torch.no_grad():  # what training the projection would do
        model.cxr_encoder.projection.weight.mul_(-2.0)
    model.on_train_epoch_start(2, SimpleNamespace(data=data))
    assert not torch.allclose(model.prototypes, before)
    torch.testing.assert_close(model.prototypes, expected_prototypes(model, features, [0, 1, 2, 3, 4, 5]))


# ----------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_is_the_softplus_weighted_mean_of_the_prototypes():
    model = smil_model()
    model.prototypes.copy_(PROTOTYPES)
    fix_mean_weights(model, [1.0, 2.0, 3.0])
    ehr = torch.randn(2, 4)
    torch.testing.assert_close(model.reconstruction(None, ehr, samples=0), RECONSTRUCTION.expand(1, 2, 4))
    # noise ε: weights softplus(μ + ε); ε = softplus⁻¹(3) − softplus⁻¹(1) on the first prototype: 3, 2, 3
    noise = torch.tensor([inverse_softplus(3.0) - inverse_softplus(1.0), 0.0, 0.0]).expand(1, 2, 3)
    mean_weights = torch.tensor([inverse_softplus(w) for w in (1.0, 2.0, 3.0)]).expand(2, 3)
    torch.testing.assert_close(reconstruct(mean_weights, PROTOTYPES, noise),
                               torch.tensor([18.0, 6, 6, -6]).div(8).expand(1, 2, 4))
    samples = model.reconstruction(None, ehr, samples=5)  # Monte-Carlo draws differ from each other
    assert samples.shape == (5, 2, 4) and not torch.allclose(samples[0], samples[1])


def test_evaluation_uses_the_reconstruction_for_stays_without_an_xray():
    model = smil_model(cxr=TINY_CXR).eval()
    model.prototypes.copy_(PROTOTYPES)
    fix_mean_weights(model, [1.0, 2.0, 3.0])
    batch = make_batch(MIXED)
    logits = model(batch).logits
    ehr, _ = model.ehr_encoder(batch.ehr, batch.ehr_length)
    fuse, output = model.head.fuse, model.head.output

    def head(cxr):  # [EHR ∥ X-ray] -> Linear -> ReLU -> Linear, by hand
        return torch.relu(torch.cat([ehr, cxr], 1) @ fuse.weight.T + fuse.bias) @ output.weight.T + output.bias

    unpaired = batch.has_cxr == 0
    with torch.no_grad():
        real = model.cxr_encoder.projection(model.cxr_encoder.backbone(batch.cxr))
        torch.testing.assert_close(logits[unpaired], head(RECONSTRUCTION.expand(6, 4))[unpaired])
        torch.testing.assert_close(logits[~unpaired], head(real)[~unpaired])
        assert not torch.allclose(logits[unpaired], head(torch.zeros(6, 4))[unpaired])


# ----------------------------------------------------------------------------------------- meta-learning
def test_meta_validation_loss_by_hand():
    labels = torch.tensor([[1.0], [0.0]])
    noised = torch.tensor([[[0.0], [1.0]]])  # (S 1, R 2, L 1); row 0 paired, row 1 not
    clean = torch.tensor([[[math.log(3.0)], [1.0]]])
    noised_hidden, clean_hidden = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]]), torch.tensor([[[3.0, 2.0], [0.0, 0.0]]])
    reconstruction = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]], requires_grad=True)
    real = torch.tensor([[0.0, 3.0], [0.0, 0.0]], requires_grad=True)
    paired = torch.tensor([True, False])
    loss = meta_validation_loss(noised, clean, noised_hidden, clean_hidden, reconstruction, real, paired, labels,
                                alpha=0.5, beta=0.25, temperature=2.0)
    task = (math.log(2.0) + math.log(1 + math.e)) / 2  # BCE of logits 0 (y 1) and 1 (y 0)
    prediction = ((0.5 - 0.75) / 2) ** 2  # σ(0) = 0.5, σ(ln 3) = 0.75, over τ = 2; paired row only
    features = (4.0 + 0.0) / 2  # (1 − 3)², (2 − 2)²
    recovered = (1.0 + 4.0) / 2  # (1 − 0)², (1 − 3)²
    assert float(loss.detach()) == pytest.approx(task + prediction + 0.5 * features + 0.25 * recovered, rel=1e-6)
    loss.backward()
    assert real.grad is None  # the real X-ray feature is the target, not pulled towards the reconstruction
    expected = 0.25 * torch.tensor([[[1.0, -2.0], [0.0, 0.0]]])  # β · 2 (r − x) / 2 entries, paired row only
    torch.testing.assert_close(reconstruction.grad, expected)


def test_training_reconstructs_missing_xrays_and_hides_the_meta_validation_ones():
    """Changing the prototypes moves the meta-train loss only through stays without an X-ray, and the
    meta-validation loss also through paired stays (their X-rays are hidden and reconstructed in the noised pass)."""
    def losses(has_cxr, prototypes_seed):
        model = smil_model(inner_steps=0, alpha=0.0, beta=0.0)  # no reconstruction-vs-real term
        model.prototypes.normal_(generator=torch.Generator().manual_seed(prototypes_seed))
        torch.manual_seed(5)
        return [loss.item() for loss in model.meta_losses(make_batch(has_cxr), torch.arange(4), torch.tensor([4, 5]))]

    all_paired, unpaired_in_meta_train = [1] * 6, [1, 0, 1, 0, 1, 1]
    assert losses(all_paired, 1)[0] == losses(all_paired, 2)[0]
    assert losses(all_paired, 1)[1] != pytest.approx(losses(all_paired, 2)[1], rel=1e-4)
    assert losses(unpaired_in_meta_train, 1)[0] != pytest.approx(losses(unpaired_in_meta_train, 2)[0], rel=1e-4)


def test_inner_loop_adapts_all_but_the_ehr_encoder_and_changes_the_outer_loss():
    batch = make_batch([1, 0, 1, 1, 0, 1, 1, 0])  # (two paired rows per side: BatchNorm on 1x1 maps needs two)
    train_rows, val_rows = torch.tensor([0, 1, 2, 4, 6]), torch.tensor([3, 5, 7])
    params = dict(cxr=TINY_CXR, inner_lr=0.5, mc_size=3)
    losses = {}
    for steps in (0, 1):
        model = smil_model(inner_steps=steps, **params).train()
        model.prototypes.normal_(generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        losses[steps] = [loss.item() for loss in model.meta_losses(batch, train_rows, val_rows)]
    assert losses[0][0] == pytest.approx(losses[1][0])  # the same meta-train loss, at θ
    assert losses[0][1] != pytest.approx(losses[1][1], rel=1e-4)

    # by hand: one SGD step at lr 0.5 on the meta-train loss, EHR encoder left out, then the outer loss there
    reference = smil_model(inner_steps=0, **params).train()
    reference.prototypes.normal_(generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    meta_train_loss, _ = reference.meta_losses(batch, train_rows, val_rows[:0])  # no meta-validation rows
    meta_train_loss.backward()
    with_ehr = copy.deepcopy(reference)
    with torch.no_grad():
        for model, skip in ((reference, "ehr_encoder."), (with_ehr, "no such prefix")):
            for name, parameter in model.named_parameters():
                if parameter.grad is not None and not name.startswith(skip):
                    parameter -= 0.5 * parameter.grad
    outer = {}
    for name, model in (("without_ehr", reference), ("with_ehr", with_ehr)):
        model.zero_grad()
        torch.manual_seed(5)  # the meta-train draw, then the same meta-validation draw as above
        outer[name] = model.meta_losses(batch, train_rows, val_rows)[1]
    assert outer["without_ehr"].item() == pytest.approx(losses[1][1], rel=1e-5)
    assert outer["with_ehr"].item() != pytest.approx(losses[1][1], rel=1e-4)

    # second order: the outer gradient at θ passes through the inner step (first-order would equal it at θ')
    adapted = smil_model(inner_steps=1, **params).train()
    adapted.prototypes.normal_(generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    adapted.meta_losses(batch, train_rows, val_rows)[1].backward()
    outer["without_ehr"].backward()
    first_order = reference.head.fuse.weight.grad
    assert not torch.allclose(adapted.head.fuse.weight.grad, first_order, rtol=1e-3, atol=1e-6)


def test_training_step_splits_80_20_and_steps_on_both_losses():
    model = smil_model(mc_size=2).train()  # frozen CNN: a random split may give a side one X-ray
    model.prototypes.normal_()
    batch = make_batch(MIXED + MIXED[:4])  # 10 rows: 2 for meta-validation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, SimpleNamespace(splits={"train": SimpleNamespace(multiclass=False)}), torch.device("cpu"),
                     [optimizer])
    reference = copy.deepcopy(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(2)
    loss = model.training_step(batch, step)
    torch.manual_seed(2)
    order = torch.randperm(10)  # then the same Monte-Carlo draws
    expected = sum(reference.meta_losses(batch, order[2:], order[:2]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert any(name.startswith("ehr_encoder.") for name in changed)
    assert any(name.startswith("inference.") for name in changed) and "prototypes" not in changed


# ----------------------------------------------------------------------------------------- trainer
def _fit_smil(files, out_dir, epochs: int):
    data = load(files)
    torch.manual_seed(0)
    model = create_model("smil", n_labels=1, ehr_features=data.ehr_features, cxr=dict(FROZEN_CXR), hidden=8, heads=2,
                         n_clusters=3, mc_size=2, inner_steps=1)
    return model, fit(model, data, out_dir, seed=1, run_key="smil", **dict(TRAIN, epochs=epochs))


def test_smil_resumed_run_is_exact_and_keeps_training_prototypes(tmp_path):
    straight, _ = assert_resume_is_exact(_fit_smil, tmp_path, 3, 2)
    saved = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["prototypes"]
    assert saved.abs().sum() > 0 and torch.equal(saved, straight.prototypes)
