"""The modality-balancing methods AUG (``aug``) and InfoReg (``inforeg``): AUG's logit mix, boosting loss,
classifier assignment at its epochs, trained added layers and exact resume; InfoReg's regulation of the dominant
encoder's gradients in its prime learning window (factors worked out by hand) and exact resume."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ehrcxr.models import create_model
from ehrcxr.models.aug import boosting_loss, is_check_epoch, weaker_modality
from ehrcxr.models.inforeg import fisher_trace, slowdown, trace_change
from ehrcxr.train.loop import TrainStep, fit
from test_models import FEATURES, MIXED, N_LABELS, TINY_CXR, make_batch
from test_train import TRAIN, load, write_cell_files


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def manual_step(model, optimizer) -> TrainStep:
    """The trainer's TrainStep on a binary-label cell (only ``multiclass`` of the cell data is read)."""
    data = SimpleNamespace(splits={"train": SimpleNamespace(multiclass=False)})
    return TrainStep(model, data, torch.device("cpu"), [optimizer])


def constant_classifier(linear: torch.nn.Linear, bias: float) -> None:
    """Make ``linear`` output ``bias`` in every unit whatever its input."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(bias)


# ----------------------------------------------------------------------------------------- AUG
def aug_model(**params):
    torch.manual_seed(0)
    return create_model("aug", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(TINY_CXR), hidden=8, heads=2,
                        **params)


def test_aug_prediction_mixes_the_two_classifiers_with_alpha_and_unpaired_stays_take_ehr():
    model = aug_model(alpha=0.7).eval()
    with torch.no_grad():  # the shared output layer averages its 8 inputs and adds b
        model.output.weight.fill_(1 / 8)
        model.output.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    constant_classifier(model.ehr_embedding[0], 2.0)  # EHR logits 2 + b
    constant_classifier(model.cxr_embedding[0], 0.5)  # CXR logits 0.5 + b
    batch = make_batch(MIXED)
    paired = batch.has_cxr == 1
    logits = model(batch).logits
    # paired: 0.7 (2 + b) + 0.3 (0.5 + b) = 1.55 + b; unpaired: 2 + b
    torch.testing.assert_close(logits[paired], torch.tensor([1.65, 1.35, 1.85]).expand(3, 3))
    torch.testing.assert_close(logits[~paired], torch.tensor([2.1, 1.8, 2.3]).expand(3, 3))

    model.add_boosting_layer("ehr")  # its layer outputs 1 in every unit: + (1 + b), the output bias once more
    constant_classifier(model.ehr_boost[0], 1.0)
    logits = model(batch).logits
    # EHR 3 + 2b; paired: 0.7 (3 + 2b) + 0.3 (0.5 + b) = 2.25 + 1.7b; unpaired 3 + 2b
    torch.testing.assert_close(logits[paired], torch.tensor([2.42, 1.91, 2.76]).expand(3, 3))
    torch.testing.assert_close(logits[~paired], torch.tensor([3.2, 2.6, 3.6]).expand(3, 3))


def test_boosting_loss_matches_hand_computation_and_the_public_one_hot_form():
    every = torch.tensor([True])
    labels = torch.tensor([[1.0, 0.0]])
    previous = torch.tensor([[0.0, math.log(3)]])  # p(true) 0.5 and 0.25
    newest = torch.tensor([[math.log(3), 0.0]])  # p(true) 0.75 and 0.5
    logits = previous + newest  # p(true) 0.75 and 0.25
    loss = boosting_loss(logits, previous, newest, labels, every)
    task = (-math.log(0.75) - math.log(0.25)) / 2
    before = (-math.log(0.5) - math.log(0.25)) / 2
    residual = ((1 - 0.5 * 0.5) * -math.log(0.75) + (1 - 0.5 * 0.25) * -math.log(0.5)) / 2
    assert float(loss) == pytest.approx(task + before + residual, rel=1e-6)
    assert float(boosting_loss(logits, previous, None, labels, every)) == pytest.approx(task, rel=1e-6)

    # one-hot classes: the public code's CE(all) + CE(prev) + CE(new) − 0.5 CE(new, y · softmax(prev))
    generator = torch.Generator().manual_seed(3)
    previous, newest = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    classes = F.one_hot(torch.tensor([0, 3, 1, 1, 2]), 4).float()
    public = (F.cross_entropy(previous + newest, classes) + F.cross_entropy(previous, classes)
              + F.cross_entropy(newest, classes) - 0.5 * F.cross_entropy(newest, classes * previous.softmax(1)))
    ours = boosting_loss(previous + newest, previous, newest, classes, torch.ones(5, dtype=torch.bool), True)
    torch.testing.assert_close(ours, public)


def test_assignment_epochs_and_direction():
    assert [epoch for epoch in range(1, 13) if is_check_epoch(epoch, 4)] == [1, 4, 8, 12]
    assert [epoch for epoch in range(1, 13) if is_check_epoch(epoch, 5)] == [1, 5, 10]
    assert weaker_modality(1.2, 1.0, 0.1) == "cxr" and weaker_modality(0.8, 1.0, 0.1) == "ehr"
    assert weaker_modality(1.09, 1.0, 0.1) is None and weaker_modality(0.91, 1.0, 0.1) is None


def _run_epochs(model, batch, epochs) -> tuple[list[tuple[int, int]], torch.optim.Optimizer]:
    """Run ``epochs`` one-batch epochs through the model's hooks (SGD at lr 0: nothing learns); the (EHR, CXR)
    numbers of boosting layers after each, and the optimiser."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = manual_step(model, optimizer)
    counts = []
    for epoch in epochs:
        model.on_train_epoch_start(epoch, step)
        model.training_step(batch, step)
        model.on_train_epoch_end(epoch, step)
        counts.append((len(model.ehr_boost), len(model.cxr_boost)))
    return counts, optimizer


def _fixed_scores_model(ehr_logit: float, cxr_logit: float):
    """An AUG model whose EHR classifier outputs ``ehr_logit`` and CXR classifier ``cxr_logit`` for every stay;
    the CXR feature is 0, so a CXR boosting layer (zero bias) adds only the output bias 0."""
    torch.manual_seed(0)
    model = create_model("aug", n_labels=1, ehr_features=FEATURES, cxr=dict(TINY_CXR), hidden=8, heads=2,
                         target_ratio=1.0, margin=0.1, check_interval=4)
    constant_classifier(model.output, 0.0)
    with torch.no_grad():
        model.output.weight.fill_(1 / 8)
    constant_classifier(model.ehr_embedding[0], ehr_logit)
    constant_classifier(model.cxr_embedding[0], cxr_logit)
    constant_classifier(model.cxr_projection, 0.0)
    return model


def test_aug_adds_a_boosting_layer_to_the_weaker_modality_at_the_check_epochs():
    batch = make_batch(MIXED)
    batch.labels = torch.ones(6, 1)
    # every label is 1: the EHR classifier gives sigmoid(1), the CXR one 0.5 -> ratio 1.462 > 1 + 0.1 at every check
    model = _fixed_scores_model(1.0, 0.0)
    counts, optimizer = _run_epochs(model, batch, range(1, 10))
    assert counts == [(0, 1)] * 3 + [(0, 2)] * 4 + [(0, 3)] * 2  # layers after epochs 1, 4 and 8
    assert [(epoch, modality) for epoch, _, modality in model.assignments] == [(1, "cxr"), (4, "cxr"), (8, "cxr")]
    # over the paired stays only (with the unpaired ones in the EHR sum the ratio would be twice as large)
    assert all(ratio == pytest.approx(sigmoid(1.0) / 0.5) for _, ratio, _ in model.assignments)
    # the boosting layers are one last optimiser group, in module order
    assert len(optimizer.param_groups) == 2
    assert [id(p) for p in optimizer.param_groups[1]["params"]] == [id(p) for p in model.cxr_boost.parameters()]

    weaker_ehr = _fixed_scores_model(0.0, 1.0)  # ratio 0.5 / sigmoid(1) = 0.684 < 0.9
    counts, _ = _run_epochs(weaker_ehr, batch, range(1, 4))
    assert counts == [(1, 0)] * 3
    assert weaker_ehr.assignments == [(1, pytest.approx(0.5 / sigmoid(1.0)), "ehr")]

    balanced = _fixed_scores_model(1.0, 1.0)  # ratio 1: inside 1 ± 0.1
    counts, _ = _run_epochs(balanced, batch, range(1, 5))
    assert counts == [(0, 0)] * 4 and balanced.assignments == [(1, 1.0, None), (4, 1.0, None)]


def test_added_boosting_layers_receive_gradients_and_change_after_a_step():
    model = aug_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.add_boosting_layer("ehr")
    model.add_boosting_layer("cxr")
    model.group_boosting_parameters(optimizer)
    layers = [model.ehr_boost[0], model.cxr_boost[0]]
    before = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
    seen = []  # after each backward pass: which layers' weights hold a non-zero gradient
    model.on_after_backward = lambda: seen.append([layer.weight.grad is not None and
                                                   bool(layer.weight.grad.abs().sum() > 0) for layer in layers])
    model.training_step(make_batch(MIXED), manual_step(model, optimizer))
    assert seen == [[True, False], [False, True]]  # the EHR loss's pass, then the CXR loss's
    for layer, initial in zip(layers, before):
        assert all(not torch.equal(p, q) for p, q in zip(layer.parameters(), initial))


def _fit_aug(files, out_dir, epochs: int):
    data = load(files)
    torch.manual_seed(0)
    model = create_model("aug", n_labels=1, ehr_features=data.ehr_features,
                         cxr={"depth": 18, "weights": None, "frozen_stages": 4}, hidden=8, heads=2, margin=0.0,
                         check_interval=2)
    result = fit(model, data, out_dir, seed=1, run_key="aug", **dict(TRAIN, epochs=epochs))
    return model, result


def _assert_same_run(resumed, resumed_result, straight, straight_result):
    pd.testing.assert_frame_equal(resumed_result.history.drop(columns="seconds"),
                                  straight_result.history.drop(columns="seconds"))
    assert resumed_result.best_epoch == straight_result.best_epoch
    assert resumed.state_dict().keys() == straight.state_dict().keys()
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def assert_resume_is_exact(fit_run, tmp_path, epochs: int, stop: int):
    """Train ``fit_run(files, out_dir, epochs) -> (model, result)`` for ``epochs`` straight and, in a second directory,
    for ``stop`` epochs then resumed to ``epochs``; assert both runs are identical; return the straight one."""
    files = write_cell_files(tmp_path)
    straight = fit_run(files, tmp_path / "straight", epochs)
    fit_run(files, tmp_path / "resumed", stop)
    _assert_same_run(*fit_run(files, tmp_path / "resumed", epochs), *straight)
    return straight


def test_aug_layers_added_in_training_train_and_a_resumed_run_is_exact(tmp_path):
    files = write_cell_files(tmp_path)
    straight, straight_result = _fit_aug(files, tmp_path / "straight", 5)
    checkpoint = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    hooks = checkpoint["hooks"]
    assert [epoch for epoch, _, _ in hooks["assignments"]] == [1, 2, 4]  # margin 0: a layer at every check
    assert sum(hooks["boosting_layers"].values()) == 3
    assert len(checkpoint["optimizers"][0]["param_groups"]) == 2  # all boosting layers in one group
    biases = [value for key, value in checkpoint["model"].items() if "_boost." in key and key.endswith("bias")]
    assert len(biases) == 3 and all(bias.abs().sum() > 0 for bias in biases)  # trained away from their zero start
    # the frozen CXR prefix (stem + 2 stages) stays out of the checkpoint, rebuilt on resume; model.pt holds it
    prefix = {key for key in torch.load(tmp_path / "straight" / "model.pt", weights_only=True) if ".prefix." in key}
    assert prefix and not prefix & (checkpoint["model"].keys() | checkpoint["best_state"].keys())

    # stop after epoch 3 (layers from epochs 1 and 2, two groups' worth), then resume to epoch 5
    _fit_aug(files, tmp_path / "resumed", 3)
    resumed, resumed_result = _fit_aug(files, tmp_path / "resumed", 5)
    _assert_same_run(resumed, resumed_result, straight, straight_result)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["hooks"] == hooks


# ----------------------------------------------------------------------------------------- InfoReg
def test_trace_change_and_slowdown_by_hand():
    assert trace_change([1.0, 1.0, 2.0], 2) == pytest.approx((1.5 - 1.0) / 1.5)
    assert trace_change([1.0, 2.0], 2) == 1.0  # fewer than window + 1 traces: the prime learning window
    assert trace_change([0.0, 0.0, 0.0], 2) == 0.0
    assert trace_change([4.0, 2.0, 2.0, 1.0], 3) == pytest.approx((5 / 3 - 8 / 3) / (5 / 3))
    assert slowdown(3.0, 1.0, 0.5, 0.1) == ("ehr", pytest.approx(1 - 0.5 * 0.5))
    assert slowdown(1.0, 3.0, 0.5, 0.1) == ("cxr", pytest.approx(1 - 0.1 * 0.5))
    assert slowdown(3.0, 1.0, 5.0, 0.1) == ("ehr", pytest.approx(0.1))  # capped at 0.9
    assert slowdown(2.0, 2.0, 0.5, 0.1) == (None, 1.0)


def inforeg_model(**params):
    torch.manual_seed(0)
    return create_model("inforeg", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(TINY_CXR), hidden=8, heads=2,
                        dropout=0.0, trace_window=2, k_threshold=0.1, **params).train()


def _reference_gradients(model, batch) -> dict[str, torch.Tensor]:
    """Gradients of BCE(joint) + BCE(EHR head) + BCE(CXR head on paired stays), computed here."""
    joint, ehr, cxr, paired = model.head_logits(batch)
    loss = (F.binary_cross_entropy_with_logits(joint, batch.labels)
            + F.binary_cross_entropy_with_logits(ehr, batch.labels)
            + F.binary_cross_entropy_with_logits(cxr[paired], batch.labels[paired]))
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _regulated_gradients(model, batch, ehr_traces, cxr_traces) -> dict[str, torch.Tensor]:
    """The gradients after one training step (lr 0) with the given trace histories."""
    model.load_hook_state_dict({"traces": {"ehr": ehr_traces, "cxr": cxr_traces}})
    model.training_step(batch, manual_step(model, torch.optim.SGD(model.parameters(), lr=0.0)))
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _scores_batch(model, ehr_bias: float, cxr_bias: float):
    """Every label 1; the EHR head outputs ``ehr_bias``, the CXR head ``cxr_bias`` for every stay."""
    batch = make_batch(MIXED)
    batch.labels = torch.ones_like(batch.labels)
    constant_classifier(model.ehr_head, ehr_bias)
    constant_classifier(model.cxr_head, cxr_bias)
    return batch


def _encoder(name: str) -> str | None:
    if name.startswith("ehr_encoder."):
        return "ehr"
    if name.startswith(("cxr_backbone.", "cxr_projection.")):
        return "cxr"
    return None


def _assert_scaled(grads, reference, factors: dict):
    for name, value in reference.items():
        torch.testing.assert_close(grads[name], factors.get(_encoder(name), 1.0) * value, rtol=1e-5, atol=1e-9,
                                   msg=name)


GAP = (sigmoid(2.0) - 0.5) / (sigmoid(2.0) + 0.5)  # scores n·sigmoid(2) vs n·0.5 over the same paired labels


def test_inforeg_slows_only_the_dominant_encoder_while_its_trace_rises():
    model = inforeg_model(gamma_ehr=0.95, gamma_cxr=0.2)
    batch = _scores_batch(model, 2.0, 0.0)  # EHR dominant
    reference = _reference_gradients(model, batch)
    assert {_encoder(name) for name in reference} == {"ehr", "cxr", None}
    # EHR trace rising: k = (1.5 - 1) / 1.5 = 1/3 > 0.1 -> EHR gradients x (1 - 0.95 gap); CXR untouched
    rising = _regulated_gradients(model, batch, [1.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    _assert_scaled(rising, reference, {"ehr": 1 - 0.95 * GAP})
    # the traces recorded afterwards are those of the regulated gradients: sum over tensors of mean(grad^2)
    ehr_trace = sum(float(g.pow(2).mean()) for n, g in rising.items() if _encoder(n) == "ehr")
    cxr_trace = sum(float(g.pow(2).mean()) for n, g in rising.items() if _encoder(n) == "cxr")
    assert list(model.traces["ehr"]) == [1.0, 2.0, pytest.approx(ehr_trace, rel=1e-5)]
    assert list(model.traces["cxr"]) == [1.0, 1.0, pytest.approx(cxr_trace, rel=1e-5)]
    # k <= k_thr: the EHR trace flat (k = 0), or rising too slowly (k = (1.05 - 1) / 1.05 < 0.1): untouched
    _assert_scaled(_regulated_gradients(model, batch, [1.0, 1.0, 1.0], [1.0, 1.0, 2.0]), reference, {})
    _assert_scaled(_regulated_gradients(model, batch, [1.0, 1.0, 1.1], [1.0, 1.0, 2.0]), reference, {})
    # the dominant modality's own trace decides: CXR rising fast does not regulate a dominant EHR
    _assert_scaled(_regulated_gradients(model, batch, [2.0, 1.0, 1.0], [1.0, 1.0, 2.0]), reference, {})


def test_inforeg_slows_a_dominant_cxr_encoder_with_its_own_gamma_capped_at_0_9():
    model = inforeg_model(gamma_ehr=0.95, gamma_cxr=0.2)
    batch = _scores_batch(model, 0.0, 2.0)  # CXR dominant
    reference = _reference_gradients(model, batch)
    _assert_scaled(_regulated_gradients(model, batch, [1.0, 1.0, 2.0], [1.0, 1.0, 2.0]), reference,
                   {"cxr": 1 - 0.2 * GAP})
    capped = inforeg_model(gamma_cxr=5.0)  # 5 gap = 1.38 > 0.9
    batch = _scores_batch(capped, 0.0, 2.0)
    reference = _reference_gradients(capped, batch)
    _assert_scaled(_regulated_gradients(capped, batch, [], []), reference, {"cxr": 0.1})  # k = 1 at the start


def test_inforeg_batch_without_xrays_is_not_regulated_and_adds_no_cxr_trace():
    model = inforeg_model()
    batch = _scores_batch(model, 2.0, 0.0)
    batch.has_cxr.zero_()
    batch.cxr.zero_()
    joint, ehr, _, _ = model.head_logits(batch)  # no CXR loss: no paired stay
    loss = F.binary_cross_entropy_with_logits(joint, batch.labels) + F.binary_cross_entropy_with_logits(
        ehr, batch.labels)
    model.zero_grad()
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads = _regulated_gradients(model, batch, [1.0, 1.0, 2.0], [1.0])
    for name, value in reference.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-9, msg=name)
    assert len(model.traces["ehr"]) == 3 and list(model.traces["cxr"]) == [1.0]
    assert fisher_trace(model.encoder_parameters("ehr")) == pytest.approx(model.traces["ehr"][-1])


def _fit_inforeg(files, out_dir, epochs: int):
    data = load(files)
    torch.manual_seed(0)
    model = create_model("inforeg", n_labels=1, ehr_features=data.ehr_features,
                         cxr={"depth": 18, "weights": None, "frozen_stages": 4}, hidden=8, heads=2,
                         trace_window=3, k_threshold=0.05, gamma_ehr=0.95, gamma_cxr=0.5)
    result = fit(model, data, out_dir, seed=1, run_key="inforeg", **dict(TRAIN, epochs=epochs))
    return model, result


def test_inforeg_resumed_run_is_exact(tmp_path):
    assert_resume_is_exact(_fit_inforeg, tmp_path, 4, 2)
    hooks = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["hooks"]
    assert len(hooks["traces"]["ehr"]) == 4  # window 3 + 1
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["hooks"] == hooks
