"""The one trainer's extension points, each proved with a small test model whose updates are worked out by
hand: several optimisers with a manual step, gradient hooks, epoch hooks that add layers (and exact resume),
fit-start inputs; plus optimisers, schedulers, minimum epochs, AUROC selection, fp32 evaluation and X-ray
augmentation on the device."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ehrcxr.models import ModelOutput, create_model, register
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.train import loop
from ehrcxr.train.augment import affine_matrices, augment_images, check_augment
from ehrcxr.train.loop import fit, predict
from test_train import SCHEDULE, TRAIN, _fit_scheduled, _without_val_positives, load, write_cell_files

WHOLE_SET = dict(TRAIN, batch_size=1000, patience=50)  # one batch per epoch: one optimiser step per epoch


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture()
def files(tmp_path):
    return write_cell_files(tmp_path)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def train_label_mean(data) -> float:
    return float(data.splits["train"].labels.mean())


@register("two_optimiser_test_model")
class TwoOptimiserModel(nn.Module):
    """logit = a + b for every stay; a and b have their own optimisers, and the manual step steps only b's."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None):
        super().__init__()
        self.n_labels = n_labels
        self.a, self.b = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(-0.2))
        self.seen: list[tuple[int, float, float]] = []

    def forward(self, batch) -> ModelOutput:
        return ModelOutput((self.a + self.b).expand(len(batch), self.n_labels), {})

    def configure_optimizers(self, make_optimizer):
        return [make_optimizer([self.a]), torch.optim.SGD([self.b], lr=0.5)]

    def training_step(self, batch, step):
        loss = step.loss(self(batch), batch)
        step.zero_grad()
        step.backward(loss)
        step.optimizers[1].step()
        return loss.detach()

    def on_train_epoch_end(self, epoch, step):
        self.seen.append((epoch, self.a.item(), self.b.item()))


def test_manual_step_with_two_optimisers(files, tmp_path):
    data = load(files, with_cxr=False)
    model = create_model("two_optimiser_test_model", n_labels=1, ehr_features=data.ehr_features)
    fit(model, data, tmp_path, seed=1, **dict(WHOLE_SET, epochs=3))
    y = train_label_mean(data)
    b, expected = -0.2, []
    for epoch in (1, 2, 3):  # d(mean BCE)/d(logit) = sigmoid(a + b) - mean(y); SGD lr 0.5 on b only
        b -= 0.5 * (sigmoid(0.3 + b) - y)
        expected.append((epoch, 0.3, b))
    np.testing.assert_allclose(np.array(model.seen), np.array(expected), rtol=1e-5)


@register("gradient_hook_test_model")
class GradientHookModel(nn.Module):
    """logit = w; every backward pass scales w's gradient by 0.25 (as InfoReg scales a modality's)."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None):
        super().__init__()
        self.n_labels = n_labels
        self.w = nn.Parameter(torch.tensor(0.4))
        self.seen: list[float] = []

    def forward(self, batch) -> ModelOutput:
        return ModelOutput(self.w.expand(len(batch), self.n_labels), {})

    def configure_optimizers(self, make_optimizer):
        return [torch.optim.SGD([self.w], lr=1.0)]

    def on_after_backward(self):
        self.w.grad.mul_(0.25)

    def on_train_epoch_end(self, epoch, step):
        self.seen.append(self.w.item())


def test_gradient_hook_acts_between_backward_and_step(files, tmp_path):
    data = load(files, with_cxr=False)
    model = create_model("gradient_hook_test_model", n_labels=1, ehr_features=data.ehr_features)
    fit(model, data, tmp_path, seed=1, **dict(WHOLE_SET, epochs=2))
    y, w, expected = train_label_mean(data), 0.4, []
    for _ in range(2):
        w -= 1.0 * 0.25 * (sigmoid(w) - y)
        expected.append(w)
    np.testing.assert_allclose(model.seen, expected, rtol=1e-5)


@register("growing_test_model")
class GrowingModel(nn.Module):
    """Logistic regression on the first EHR hour; at the end of epoch 2 it adds a zero-initialised layer (as
    AUG adds boosting layers). The number of added layers is its hook state, so a resumed run rebuilds them."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None):
        super().__init__()
        self.base = nn.Linear(ehr_features, n_labels)
        self.extra = nn.ModuleList()
        self.fit_start: list = []
        self.initial_extra: torch.Tensor | None = None

    def forward(self, batch) -> ModelOutput:
        x = batch.ehr[:, 0, :]
        logits = self.base(x)
        for layer in self.extra:
            logits = logits + layer(x)
        return ModelOutput(logits, {})

    def _grow(self) -> None:
        layer = nn.Linear(self.base.in_features, self.base.out_features)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        self.extra.append(layer.to(self.base.weight.device))

    def on_fit_start(self, data, inputs):
        self.fit_start.append((data.task, dict(inputs)))

    def on_train_epoch_end(self, epoch, step):
        if epoch == 2:
            self._grow()
            self.initial_extra = self.extra[0].weight.detach().clone()

    def hook_state_dict(self) -> dict:
        return {"n_extra": len(self.extra)}

    def load_hook_state_dict(self, state: dict) -> None:
        del self.extra[state["n_extra"]:]
        while len(self.extra) < state["n_extra"]:
            self._grow()


def _fit_growing(files, out_dir, epochs: int):
    data = load(files, with_cxr=False)
    torch.manual_seed(0)
    model = create_model("growing_test_model", n_labels=1, ehr_features=data.ehr_features)
    result = fit(model, data, out_dir, seed=1, run_key="growing", inputs={"prototypes": "p.npy"},
                 **dict(TRAIN, epochs=epochs, patience=50, selection="val_auroc"))
    return model, result


def test_layers_added_by_an_epoch_hook_train_and_resume_exactly(files, tmp_path):
    straight, straight_result = _fit_growing(files, tmp_path / "straight", 5)
    assert straight.fit_start == [("mortality", {"prototypes": "p.npy"})]
    checkpoint = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    assert checkpoint["hooks"] == {"n_extra": 1} and len(checkpoint["optimizers"][0]["param_groups"]) == 2
    assert straight_result.best_epoch >= 3  # so the final model holds the added layer, trained from zeros
    assert straight.extra[0].weight.abs().sum() > 0

    _fit_growing(files, tmp_path / "resumed", 3)  # stops after epoch 3, one epoch after the layer appeared
    resumed, resumed_result = _fit_growing(files, tmp_path / "resumed", 5)
    pd.testing.assert_frame_equal(resumed_result.history.drop(columns="seconds"),
                                  straight_result.history.drop(columns="seconds"))
    assert resumed_result.best_epoch == straight_result.best_epoch
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_best_state_from_before_a_hook_added_layers_loads(files, tmp_path):
    """When the best epoch precedes the layer's creation, the final model drops back to that structure."""
    data = load(files, with_cxr=False)
    torch.manual_seed(0)
    model = create_model("growing_test_model", n_labels=1, ehr_features=data.ehr_features)
    result = fit(model, data, tmp_path, seed=1, **dict(TRAIN, epochs=4, patience=50, lr=0.0))  # nothing learns
    assert result.best_epoch == 1  # equal scores every epoch: the first stays best
    assert len(model.extra) == 0
    assert predict(model, data.splits["partial_test"], 64, "cpu").shape == (len(data.splits["partial_test"]), 1)


@pytest.mark.parametrize("scheduler", ["plateau", "cosine"])
def test_layers_added_after_the_scheduler_lowered_the_lr_follow_it(scheduler):
    model = nn.Sequential(nn.Linear(2, 2))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (schedule,) = loop._make_schedulers({"name": scheduler, "factor": 0.5, "patience": 0}, [optimiser], 10)

    def step(loss):
        optimiser.step()
        schedule.step(loss) if scheduler == "plateau" else schedule.step()

    for loss in (1.0, 2.0, 3.0):  # plateau: halved twice; cosine: three steps down the curve
        step(loss)
    lowered = optimiser.param_groups[0]["lr"]
    assert lowered < 1e-3
    model.append(nn.Linear(2, 2))  # a layer an epoch hook adds
    assert loop._register_new_parameters(model, [optimiser]) == 2
    assert [group["lr"] for group in optimiser.param_groups] == [lowered, lowered]
    for loss in (4.0, 5.0):  # the scheduler moves both groups alike from here
        step(loss)
    first, added = (group["lr"] for group in optimiser.param_groups)
    assert first < lowered and added == pytest.approx(first, rel=1e-12)
    if scheduler == "cosine":  # exactly the curve's value after five of ten steps: eta_min + (lr0 - 0) (1 + cos) / 2
        assert added == pytest.approx(1e-3 * (1 + math.cos(math.pi * 5 / 10)) / 2, rel=1e-9)


def test_optimiser_scheduler_and_minimum_epochs(files, tmp_path):
    files = _without_val_positives(files)
    # val losses softplus(SCHEDULE): 0.974, 0.313, 2.127, 0.049, 1.313, 0.127, 0.018, 0.693. ReduceLROnPlateau
    # (patience 0, x0.5) halves the rate after every epoch without a new lowest loss: after 3, 5 and 6.
    _, _, result = _fit_scheduled(files, tmp_path / "plateau", patience=50, lr=0.05,
                                  scheduler={"name": "plateau", "factor": 0.5, "patience": 0})
    assert result.history["lr"].tolist() == pytest.approx([0.05, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.00625, 0.00625])
    # cosine over 8 epochs from 0.05 to 0: 0.025 (1 + cos(pi (e - 1) / 8))
    _, _, cosine = _fit_scheduled(files, tmp_path / "cosine", patience=50, lr=0.05, optimiser="adam",
                                  scheduler={"name": "cosine", "eta_min": 0.0})
    expected = [0.025 * (1 + math.cos(math.pi * (e - 1) / 8)) for e in range(1, 9)]
    assert cosine.history["lr"].tolist() == pytest.approx(expected)
    # patience 2 stops after epoch 6 (best 4); min_epochs 8 runs on and finds epoch 7's lower loss
    _, _, early = _fit_scheduled(files, tmp_path / "early")
    _, _, minimum = _fit_scheduled(files, tmp_path / "minimum", min_epochs=8)
    assert (early.epochs_run, early.best_epoch) == (6, 4)
    assert (minimum.epochs_run, minimum.best_epoch) == (8, 7)


def test_adam_and_adamw_and_unknown_optimiser():
    model = nn.Linear(2, 1)
    assert isinstance(loop._make_optimizers(model, "adam", 0.1, 0.0)[0], torch.optim.Adam)
    assert isinstance(loop._make_optimizers(model, "adamw", 0.1, 0.01)[0], torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimiser must be one of adamw, adam; got 'sgd'"):
        loop._make_optimizers(model, "sgd", 0.1, 0.0)


def test_auroc_selection_keeps_the_epoch_with_the_best_validation_auroc(files, tmp_path):
    _, result = _fit_growing(files, tmp_path, 5)
    history = result.history
    assert result.selection_metric == "val_auroc"
    assert result.best_epoch == int(history.loc[history["val_auroc"].idxmax(), "epoch"])


def test_evaluation_runs_without_autocast(files, tmp_path, monkeypatch):
    calls = []
    real = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda device: calls.append(device) or real(device))
    data = load(files, with_cxr=False)
    model = create_model("gradient_hook_test_model", n_labels=1, ehr_features=data.ehr_features)
    fit(model, data, tmp_path, seed=1, **dict(WHOLE_SET, epochs=2))
    assert len(calls) == 2  # one training step per epoch; the two validation passes do not autocast
    calls.clear()
    predict(model, data.splits["partial_test"], 64, "cpu")
    assert calls == []


# --- augmentation ------------------------------------------------------------------------------------------

def test_flip_and_zoom_match_hand_computed_pixels():
    columns = torch.arange(4.0).expand(1, 1, 4, 4).contiguous()  # pixel value = its column
    flip = {"hflip": 1.0, "degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0)}
    flipped = augment_images(columns / 3, flip, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, columns.flip(-1) / 3)
    # scale 2: output centres -0.75..0.75 sample at half their coordinate, i.e. columns 0.75, 1.25, 1.75, 2.25
    zoom = {"hflip": 0.0, "degrees": 0.0, "translate": 0.0, "scale": (2.0, 2.0)}
    zoomed = augment_images(columns, zoom, torch.Generator().manual_seed(0))
    torch.testing.assert_close(zoomed[0, 0, 1], torch.tensor([0.75, 1.25, 1.75, 2.25]))


def test_affine_draws_stay_in_their_ranges_and_follow_the_generator():
    settings = check_augment({"hflip": 0.5, "degrees": 10, "translate": 0.1, "scale": [0.9, 1.1]})
    theta = affine_matrices(4000, settings, torch.Generator().manual_seed(1), torch.device("cpu"))
    again = affine_matrices(4000, settings, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(theta, again)
    linear = theta[:, :, :2]
    inverse_scale = linear[:, 1].norm(dim=1)  # the second row is (sin, cos) / scale, never flipped
    assert inverse_scale.min() >= 1 / 1.1 - 1e-6 and inverse_scale.max() <= 1 / 0.9 + 1e-6
    angle = torch.atan2(linear[:, 1, 0] * torch.sign(linear[:, 0, 0] * linear[:, 1, 1]), linear[:, 1, 1])
    assert angle.abs().max() <= math.radians(10) + 1e-6 and angle.abs().max() > math.radians(9)
    flips = torch.det(linear) < 0
    assert 0.45 < flips.float().mean() < 0.55
    assert theta[:, :, 2].abs().max() <= 0.2 + 1e-6  # 0.1 of a side = 0.2 in [-1, 1] coordinates
    with pytest.raises(ValueError, match="cxr.augment out of range"):
        check_augment({"scale": [1.2, 0.8]})


@register("image_probe_test_model")
class ImageProbeModel(nn.Module):
    """Records the X-ray inputs it sees in training and in evaluation; owns a trainable CXR backbone stage."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None):
        super().__init__()
        self.backbone = CXRBackbone(depth=18, frozen_stages=int((cxr or {}).get("frozen_stages", 1)))
        self.n_labels = n_labels
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = {True: [], False: []}

    def forward(self, batch) -> ModelOutput:
        self.seen[self.training].append((batch.cxr.detach().clone(), batch.has_cxr.clone()))
        return ModelOutput(self.w.expand(len(batch), self.n_labels), {})


def test_training_batches_are_augmented_evaluation_batches_are_not(files, tmp_path, caplog):
    data = load(files)
    model = create_model("image_probe_test_model", n_labels=1, ehr_features=data.ehr_features)
    flip = {"hflip": 1.0, "degrees": 0, "translate": 0, "scale": [1, 1]}
    result = fit(model, data, tmp_path / "flip", seed=1, augment=flip, **dict(WHOLE_SET, epochs=1))
    assert result.augmented and result.prefix_seconds == 0.0  # images, not precomputed features, are served
    train_images, train_has = model.seen[True][0]
    val_images, _ = model.seen[False][0]
    assert train_images.shape[1:] == (1, 16, 16) and val_images.shape[1:] == (1, 16, 16)
    reference = loop.prepare_batch(data.splits["train"].collate(list(range(len(data.splits["train"])))),
                                   torch.device("cpu")).cxr
    # the probe saw one shuffled batch of the whole train set: compare per-image statistics as sorted sets
    flipped_sums = torch.sort(train_images.flip(-1).flatten(1).sum(1)).values
    assert torch.allclose(flipped_sums, torch.sort(reference.flatten(1).sum(1)).values)
    assert not torch.equal(torch.sort(train_images.flatten(1)[:, 0]).values,
                           torch.sort(reference.flatten(1)[:, 0]).values)  # the first column moved
    assert (train_images[train_has == 0] == 0).all()  # a missing X-ray stays zero
    val_reference = loop.prepare_batch(data.splits["val"].collate(list(range(len(data.splits["val"])))),
                                       torch.device("cpu")).cxr
    torch.testing.assert_close(val_images, val_reference)

    frozen = create_model("image_probe_test_model", n_labels=1, ehr_features=data.ehr_features,
                          cxr={"frozen_stages": 4})
    with caplog.at_level(logging.INFO, logger="ehrcxr"):
        result = fit(frozen, load(files), tmp_path / "frozen", seed=1, augment=flip, **dict(WHOLE_SET, epochs=1),
                     log=logging.getLogger("ehrcxr.train"))
    assert not result.augmented and "augmentation off: frozen_stages 4" in caplog.text
