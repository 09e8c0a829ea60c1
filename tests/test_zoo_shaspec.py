"""ShaSpec (``shaspec``): a missing X-ray takes the EHR's shared feature, the residual shared-specific fusion and
the mean-of-fused head, one shared Transformer over both modalities (X-ray patch tokens), the L1 shared-consistency
loss on paired stays only, the domain loss on the *specific* features, α/β scaling (values by hand or by a second
formulation; tiny sizes, one thread)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_models import FEATURES, MIXED, N_LABELS, NONE, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.models import Batch, create_model
from ehrcxr.models.encoders import frozen_cxr_prefix
from ehrcxr.models.shaspec import domain_classification_loss, shared_consistency_loss

torch.set_num_threads(1)

IMAGE = 64  # layer4 of a ResNet-18 gives a 2x2 map at 64 px: four X-ray patch tokens for the shared encoder
CXR = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}
POOLED = {"depth": 18, "weights": None, "frozen_stages": 4, "pretrained": None}  # the demo: pooled 512-d features
PAIRED, UNPAIRED = [0, 2, 3], [1, 4, 5]  # the rows of MIXED with / without an X-ray


def stays(has_cxr: list[float], seed: int = 0, pooled: bool = False) -> Batch:
    """make_batch's stays with 64 px images (or pooled 512x1x1 prefix features), zero where missing."""
    batch = make_batch(has_cxr, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    shape = (512, 1, 1) if pooled else (1, IMAGE, IMAGE)
    batch.cxr = torch.randn(len(has_cxr), *shape, generator=generator) * batch.has_cxr[:, None, None, None]
    return batch


def build(seed: int = 0, cxr: dict | None = None, **params):
    torch.manual_seed(seed)
    params = {"hidden": 16, "heads": 2, "alpha": 0.5, "beta": 0.25} | params
    return create_model("shaspec", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(cxr or CXR), **params)


def perturb(module: torch.nn.Module, seed: int = 5) -> None:
    """Add noise to every parameter of ``module``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))


# ----------------------------------------------------------------------------------------- missing X-ray
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_missing_xray_takes_the_ehr_shared_feature_and_its_pixels_never_matter(mode):
    model = build().train(mode == "train")
    batch, changed = stays(MIXED), stays(MIXED)
    missing = changed.has_cxr == 0
    changed.cxr[missing] = torch.randn(int(missing.sum()), 1, IMAGE, IMAGE) * 5
    torch.manual_seed(1)
    parts, output = model.features(batch), model(batch)
    torch.manual_seed(1)
    changed_parts, changed_output = model.features(changed), model(changed)
    # an unpaired stay's X-ray-side shared and fused features are its EHR shared feature, exactly; no specific one
    assert torch.equal(parts.cxr_shared[UNPAIRED], parts.ehr_shared[UNPAIRED])
    assert torch.equal(parts.cxr_fused[UNPAIRED], parts.ehr_shared[UNPAIRED])
    assert torch.equal(parts.cxr_specific[UNPAIRED], torch.zeros(3, 16))
    assert (parts.cxr_shared[PAIRED] - parts.ehr_shared[PAIRED]).abs().min() > 0  # paired: the image's own
    # the X-ray input of a stay without one changes nothing: features, logits, losses
    for before, after in zip(parts, changed_parts):
        assert torch.equal(before, after)
    assert torch.equal(output.logits, changed_output.logits)
    for key, value in output.aux_losses.items():
        assert torch.equal(value, changed_output.aux_losses[key]), key


def test_no_xray_in_the_batch_uses_the_ehr_shared_feature_for_every_stay():
    model = build().eval()
    with torch.no_grad():
        parts = model.features(stays(NONE))
        output = model(stays(NONE))
    assert torch.equal(parts.cxr_shared, parts.ehr_shared) and torch.equal(parts.cxr_fused, parts.ehr_shared)
    assert float(output.aux_losses["shared"]) == 0.0


# ----------------------------------------------------------------------------------------- fusion and head
def test_fusion_is_shared_plus_linear_of_shared_and_specific_and_the_head_reads_their_mean():
    model = build().eval()
    batch = stays(MIXED)
    with torch.no_grad():
        parts = model.features(batch)
        logits = model(batch).logits
        weight, bias = model.composition.weight, model.composition.bias
        on_shared, on_specific = weight[:, :16], weight[:, 16:]

        def fused(shared, specific):
            return shared + shared @ on_shared.T + specific @ on_specific.T + bias

        torch.testing.assert_close(parts.ehr_fused, fused(parts.ehr_shared, parts.ehr_specific))
        torch.testing.assert_close(parts.cxr_fused[PAIRED], fused(parts.cxr_shared[PAIRED], parts.cxr_specific[PAIRED]))
        # head (eval: no dropout): Linear -> ReLU -> Linear on the mean of the two fused features
        hidden_layer, output_layer = model.head[1], model.head[4]
        mean = (parts.ehr_fused + parts.cxr_fused) / 2
        expected = torch.relu(mean @ hidden_layer.weight.T + hidden_layer.bias) @ output_layer.weight.T
        torch.testing.assert_close(logits, expected + output_layer.bias)
        # an unpaired stay: the mean of its EHR fused feature and its EHR shared feature
        unpaired = (parts.ehr_fused[UNPAIRED] + parts.ehr_shared[UNPAIRED]) / 2
        torch.testing.assert_close(logits[UNPAIRED], model.head(unpaired))


# ----------------------------------------------------------------------------------------- shared encoder
def test_one_shared_transformer_reads_ehr_steps_and_xray_patch_tokens_with_a_modality_embedding():
    model = build().eval()
    batch = stays(MIXED)
    shared = model.shared_encoder
    # its own CNN: the same frozen prefix as the specific CNN, its own trainable stages
    assert shared.cxr_backbone.prefix is model.cxr_specific_backbone.prefix
    assert frozen_cxr_prefix(model) is model.cxr_specific_backbone.prefix
    specific_stages = {id(p) for p in model.cxr_specific_backbone.suffix.parameters()}
    assert specific_stages and not specific_stages & {id(p) for p in shared.cxr_backbone.suffix.parameters()}
    with torch.no_grad():
        parts = model.features(batch)
        embedding = shared.modality_embedding
        # X-ray: the 2x2 map of the shared CNN's layer4 -> 4 tokens, Linear + row + column position + X-ray embedding
        feature_map = shared.cxr_backbone.feature_map(batch.cxr[PAIRED])
        assert feature_map.shape == (3, 512, 2, 2)
        for index, row in enumerate(PAIRED):
            tokens = []
            for i in range(2):
                for j in range(2):
                    grid = shared.grid_tokens
                    tokens.append(grid.projection(feature_map[index, :, i, j]) + grid.row_position[i]
                                  + grid.column_position[j] + embedding[1])
            pooled = shared.transformer(torch.stack(tokens)[None])[0].mean(0)
            torch.testing.assert_close(parts.cxr_shared[row], shared.output(pooled))
        # EHR: each stay alone, unpadded, through the same Transformer with the EHR embedding
        for row, length in enumerate(batch.ehr_length.tolist()):
            steps = batch.ehr[row, :length]
            tokens = shared.ehr_embedding.embed(steps) + shared.ehr_embedding.position[0, :length] + embedding[0]
            pooled = shared.transformer(tokens[None])[0].mean(0)
            torch.testing.assert_close(parts.ehr_shared[row], shared.output(pooled), atol=1e-5, rtol=1e-5)
        # the specific encoders do not feed the shared features
        perturb(model.ehr_specific)
        perturb(model.cxr_specific_projection)
        again = model.features(batch)
    assert torch.equal(again.ehr_shared, parts.ehr_shared) and torch.equal(again.cxr_shared, parts.cxr_shared)
    assert not torch.equal(again.ehr_specific, parts.ehr_specific)


# ----------------------------------------------------------------------------------------- L1 shared loss
def test_shared_l1_loss_counts_paired_rows_only_by_hand():
    ehr = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    cxr = torch.tensor([[0.0, 4.0], [50.0, 50.0], [3.0, 1.0]])
    paired = torch.tensor([True, False, True])
    # rows 0 and 2: |1 - 0| + |2 - 4| = 3 and 0 + 2 = 2 over 2 rows x 2 features; row 1 not counted
    assert float(shared_consistency_loss(ehr, cxr, paired)) == pytest.approx(5 / 4)
    assert float(shared_consistency_loss(ehr, cxr, torch.tensor([False, False, False]))) == 0.0


def test_model_shared_loss_is_alpha_times_l1_over_the_paired_stays():
    model = build(alpha=0.5).eval()
    batch = stays(MIXED)
    with torch.no_grad():
        parts = model.features(batch)
        loss = model(batch).aux_losses["shared"]
    expected = F.l1_loss(parts.ehr_shared[PAIRED], parts.cxr_shared[PAIRED])  # torch's L1Loss on the paired rows
    torch.testing.assert_close(loss, 0.5 * expected)
    assert float(expected) > 0


# ----------------------------------------------------------------------------------------- domain loss
def test_domain_loss_by_hand():
    classifier = torch.nn.Linear(2, 2).requires_grad_(False)
    classifier.weight.copy_(torch.eye(2))
    classifier.bias.zero_()
    ehr = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    cxr = torch.tensor([[0.0, 1.0], [9.0, -9.0]])  # row 1 unpaired: not counted
    paired = torch.tensor([True, False])
    # EHR rows (class 0): logits (2, 0) -> log(1 + e^-2); (0, 0) -> log 2. X-ray row 0 (class 1): (0, 1) -> log(1 + e^-1)
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-1))) / 3
    assert float(domain_classification_loss(classifier, ehr, cxr, paired)) == pytest.approx(expected, rel=1e-6)
    only_ehr = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert float(domain_classification_loss(classifier, ehr, cxr, torch.tensor([False, False]))) == pytest.approx(
        only_ehr, rel=1e-6)


def test_model_domain_loss_reads_the_specific_features_not_the_shared_ones():
    model = build(beta=0.25).eval()
    batch = stays(MIXED)
    with torch.no_grad():
        parts = model.features(batch)
        loss = model(batch).aux_losses["domain"]
        # a second formulation: CE over [every EHR specific feature; the paired X-ray specific features]
        inputs = torch.cat([parts.ehr_specific, parts.cxr_specific[PAIRED]])
        targets = torch.tensor([0] * 6 + [1] * 3)
        torch.testing.assert_close(loss, 0.25 * F.cross_entropy(model.domain_classifier(inputs), targets))
        # the X-ray specific features change, the shared ones stay: the domain loss changes
        perturb(model.cxr_specific_projection)
        changed = model.features(batch)
        assert torch.equal(changed.ehr_shared, parts.ehr_shared) and torch.equal(changed.cxr_shared, parts.cxr_shared)
        assert abs(float(model(batch).aux_losses["domain"] - loss)) > 1e-4
        # the shared features change, the specific ones stay: the domain loss does not
        reference = model(batch).aux_losses["domain"]
        perturb(model.shared_encoder.output, seed=6)
        moved = model.features(batch)
        assert (moved.ehr_shared - changed.ehr_shared).abs().min() > 0
        assert torch.equal(moved.ehr_specific, changed.ehr_specific)
        assert torch.equal(model(batch).aux_losses["domain"], reference)


def test_alpha_and_beta_scale_the_two_losses():
    batch = stays(MIXED)
    with torch.no_grad():
        unit = build(alpha=1.0, beta=1.0).eval()(batch)
        scaled = build(alpha=0.3, beta=0.05).eval()(batch)
    assert torch.equal(unit.logits, scaled.logits)
    torch.testing.assert_close(scaled.aux_losses["shared"], 0.3 * unit.aux_losses["shared"])
    torch.testing.assert_close(scaled.aux_losses["domain"], 0.05 * unit.aux_losses["domain"])
    assert float(unit.aux_losses["shared"]) > 0 and float(unit.aux_losses["domain"]) > 0


# ----------------------------------------------------------------------------------------- generic checks
@pytest.mark.parametrize("pooled", [False, True], ids=["patches", "pooled"])
@pytest.mark.parametrize("has_cxr", [MIXED, NONE, [1] * 6], ids=["mixed", "none", "all"])
def test_forward_backward_every_part_trains(has_cxr, pooled):
    model = build(cxr=POOLED if pooled else CXR).train()
    batch = stays(has_cxr, pooled=pooled)
    output = model(batch)
    assert output.logits.shape == (6, N_LABELS) and torch.isfinite(output.logits).all()
    assert set(output.aux_losses) == {"shared", "domain"}
    loss = F.binary_cross_entropy_with_logits(output.logits, batch.labels) + sum(output.aux_losses.values())
    loss.backward()
    if not pooled:
        assert has_grad(cxr_params(model)) == (sum(has_cxr) > 0)
    if has_cxr == MIXED:  # every trainable part is used: both encoders of both modalities, embeddings, classifier
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for p in model.cxr_specific_backbone.prefix.parameters())


def test_ehr_padding_does_not_matter_and_bf16_autocast_runs():
    model = build().eval()
    batch, changed = stays(MIXED), stays(MIXED)
    padding = torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]
    changed.ehr[padding] = 100.0
    before, after = model(batch), model(changed)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    for key in before.aux_losses:
        torch.testing.assert_close(after.aux_losses[key], before.aux_losses[key], rtol=1e-5, atol=1e-5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(batch)
        loss = F.binary_cross_entropy_with_logits(output.logits.float(), batch.labels)
    (loss + sum(output.aux_losses.values())).backward()
    assert torch.isfinite(loss)
