"""Early fusion: the X-ray feature broadcast onto every EHR step into one sequence encoder (tiny sizes, one
thread; test_models checks it with every model: missing-image pixels and EHR padding never matter)."""
from __future__ import annotations

import pytest
import torch
from test_models import FEATURES, LENGTHS, MIXED, N_LABELS, NONE, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.models import Batch, create_model

torch.set_num_threads(1)

IMAGE = 64  # layer3 of a ResNet-18 gives 4x4 maps at 64 px, layer4 (trainable here) 2x2
CXR = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}
MODELS = ("early_fusion",)
VARIABLES = 17
PAIRED = [0, 2, 3]  # the rows of MIXED with an X-ray


def stays(has_cxr: list[float], seed: int = 0) -> Batch:
    """make_batch's stays with 64 px images and observation masks: each variable observed in ~40% of the valid
    hours, the mask channels (59..75) equal to ehr_mask, X-rays taken 0.5..5 h before the prediction time."""
    batch = make_batch(has_cxr, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    size = len(has_cxr)
    valid = (torch.arange(STEPS)[None, :] < batch.ehr_length[:, None]).float()
    batch.ehr_mask = (torch.rand(size, STEPS, VARIABLES, generator=generator) < 0.4).float() * valid[..., None]
    batch.ehr[..., FEATURES - VARIABLES:] = batch.ehr_mask
    batch.cxr = torch.randn(size, 1, IMAGE, IMAGE, generator=generator) * batch.has_cxr[:, None, None, None]
    batch.cxr_hours = (0.5 + 4.5 * torch.rand(size, generator=generator)) * batch.has_cxr
    return batch


def build(name: str, seed: int = 0, cxr: dict | None = None, **params):
    torch.manual_seed(seed)
    return create_model(name, n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(cxr or CXR), hidden=16, **params)


def ehr_params(model):
    return [p for name, p in model.named_parameters() if name.startswith("ehr_encoder.")]


# ----------------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("has_cxr", [MIXED, NONE, [1] * 6], ids=["mixed", "none", "all"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_frozen_prefix(name, has_cxr):
    model = build(name).train()
    batch = stays(has_cxr)
    output = model(batch)
    assert output.logits.shape == (6, N_LABELS) and torch.isfinite(output.logits).all()
    assert output.aux_losses == {}
    torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels).backward()
    assert has_grad(ehr_params(model))
    assert has_grad(cxr_params(model)) == (sum(has_cxr) > 0)
    assert all(p.grad is None and not p.requires_grad for p in model.cxr_backbone.prefix.parameters())
    if has_cxr == MIXED:  # every trainable part is used
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("name", MODELS)
def test_paired_output_changes_with_the_image(name):
    model = build(name).eval()
    batch, changed = stays(MIXED), stays(MIXED)
    changed.cxr[0] = torch.randn(1, IMAGE, IMAGE)
    before, after = model(batch).logits, model(changed).logits
    assert (after[0] - before[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- early fusion
@pytest.mark.parametrize("encoder", ["transformer", "lstm"])
def test_early_fusion_broadcasts_the_xray_features_to_every_step(encoder):
    model = build("early_fusion", ehr_encoder=encoder).eval()
    batch = stays(MIXED)
    with torch.no_grad():
        sequence = model.sequence_input(batch)
        assert sequence.shape == (6, STEPS, FEATURES + 16 + 1)
        for row in range(6):
            if row in PAIRED:  # the stay's X-ray alone through the CNN and the projection
                xray = model.cxr_projection(model.cxr_backbone(batch.cxr[row:row + 1]))[0]
            else:
                xray = torch.zeros(16)
            for step in range(LENGTHS[row]):
                torch.testing.assert_close(sequence[row, step, :FEATURES], batch.ehr[row, step], rtol=0, atol=0)
                torch.testing.assert_close(sequence[row, step, FEATURES:-1], xray, atol=1e-5, rtol=1e-5)
                assert sequence[row, step, -1].item() == float(row in PAIRED)
        summary = model.ehr_encoder(sequence, batch.ehr_length)
        summary = summary[0] if isinstance(summary, tuple) else summary
        torch.testing.assert_close(model(batch).logits, model.head(summary))
    with pytest.raises(ValueError, match="ehr_encoder must be"):
        build("early_fusion", ehr_encoder="gru")
