"""Tests for the attention-based fusion methods: UTDE, early fusion, token cross-attention, and their shared
bidirectional cross-attention block (tiny sizes, one thread)."""
from __future__ import annotations

import math

import pytest
import torch
from test_models import FEATURES, LENGTHS, MIXED, N_LABELS, NONE, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.models import Batch, create_model, get_model_class
from ehrcxr.models.attention import BidirectionalCrossAttentionLayer
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.models.utde import SCORE_FLOOR, TimeEmbedding, multi_time_attention

torch.set_num_threads(1)

IMAGE = 64  # layer3 of a ResNet-18 gives 4x4 maps at 64 px, layer4 2x2: the X-ray tokens of cross_attention
CXR = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}
MODELS = ("utde", "early_fusion", "cross_attention")
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


EHR_PARTS = {"utde": ("ehr_projection.", "irregular_projection.", "time_query."),
             "early_fusion": ("ehr_encoder.",), "cross_attention": ("ehr_tokens.",)}


def ehr_params(name, model):
    """The parameters of the model's EHR embedding (for UTDE: its imputation and mTAND branches)."""
    return [p for key, p in model.named_parameters() if key.startswith(EHR_PARTS[name])]


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
    assert has_grad(ehr_params(name, model))
    assert has_grad(cxr_params(model)) == (sum(has_cxr) > 0)
    assert all(p.grad is None and not p.requires_grad for p in model.cxr_backbone.prefix.parameters())
    if has_cxr == MIXED:  # every trainable part is used: mTAND, gate, time and position embeddings, missing tokens
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("name", MODELS)
def test_ehr_padding_does_not_matter(name):
    model = build(name).eval()
    batch, changed = stays(MIXED), stays(MIXED)
    padding = torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]
    changed.ehr[padding] = 100.0
    changed.ehr_mask[padding] = 1.0  # an "observation" in a padded hour is no key either
    torch.testing.assert_close(model(changed).logits, model(batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_paired_output_changes_with_the_image(name):
    model = build(name).eval()
    batch, changed = stays(MIXED), stays(MIXED)
    changed.cxr[0] = torch.randn(1, IMAGE, IMAGE)
    before, after = model(batch).logits, model(changed).logits
    assert (after[0] - before[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- shared block
def test_bidirectional_layer_exchanges_both_ways_and_ignores_padded_keys():
    torch.manual_seed(0)
    layer = BidirectionalCrossAttentionLayer(8, 2, dropout=0.0).eval()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    a_padding = torch.tensor([[False] * 5, [False, False, True, True, True]])
    b_padding = torch.tensor([[False, False, True], [False, False, False]])
    out_a, out_b = layer(a, b, a_padding, b_padding)
    # padded tokens are never keys: changing them leaves every unpadded output unchanged
    noisy_a, noisy_b = a.clone(), b.clone()
    noisy_a[a_padding], noisy_b[b_padding] = 50.0, -50.0
    new_a, new_b = layer(noisy_a, noisy_b, a_padding, b_padding)
    torch.testing.assert_close(new_a[~a_padding], out_a[~a_padding])
    torch.testing.assert_close(new_b[~b_padding], out_b[~b_padding])
    # cross-attention both ways: b's valid tokens move a's outputs, a's valid tokens move b's
    moved_b = b.clone()
    moved_b[0, 0] += torch.randn(8)  # not a constant: LayerNorm would remove it
    assert (layer(a, moved_b, a_padding, b_padding)[0][0] - out_a[0]).abs().max() > 1e-3
    moved_a = a.clone()
    moved_a[1, 1] += torch.randn(8)
    assert (layer(moved_a, b, a_padding, b_padding)[1][1] - out_b[1]).abs().max() > 1e-3
    # without the cross-attention (zeroed output projections) neither stream sees the other
    with torch.no_grad():
        for attention in layer.cross_attention:
            attention.out_proj.weight.zero_()
            attention.out_proj.bias.zero_()
    torch.testing.assert_close(layer(a, moved_b, a_padding, b_padding)[0], layer(a, b, a_padding, b_padding)[0])


# ----------------------------------------------------------------------------------------- UTDE
def test_time_embedding_by_hand():
    embedding = TimeEmbedding(4)
    with torch.no_grad():
        embedding.linear.weight.fill_(0.5)
        embedding.linear.bias.fill_(-1.0)
        embedding.periodic.weight.copy_(torch.tensor([[1.0], [2.0], [0.25]]))
        embedding.periodic.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    value = embedding(torch.tensor([3.0, 0.0]))
    expected = torch.tensor([[0.5 * 3 - 1, math.sin(3.0), math.sin(6.5), math.sin(1.75)],
                             [-1.0, 0.0, math.sin(0.5), math.sin(1.0)]])
    torch.testing.assert_close(value, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 under autocast, too
        late = embedding(torch.tensor([47.3]))
    assert late.dtype == torch.float32
    torch.testing.assert_close(late[0, 1:], torch.sin(torch.tensor([47.3, 95.1, 12.825])))


def test_multi_time_attention_masks_each_channel_by_hand():
    # query 0: weights exp(score) = 1, 2, 3, 4 over four keys. Variable 0 (value channels 0 and 3) observed at keys 0
    # and 2, variable 1 (channel 1) nowhere, variable 2 (channel 2) at key 1 only. Query 1: keys 1 and 3 score 500
    # and 600 below the query's maximum (a float32 softmax underflows there): floored at SCORE_FLOOR, they
    # average plainly
    scores = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]]))
    scores[0, 1] = torch.tensor([0.0, -500.0, 0.0, -600.0])
    values = torch.tensor([[[10.0, 7.0, 1.0, -1.0], [20.0, 8.0, 2.0, -2.0], [30.0, 9.0, 3.0, -3.0],
                            [40.0, 6.0, 4.0, -4.0]]])
    observed = torch.tensor([[[True, False, False], [False, False, True], [True, False, False],
                              [False, False, True]]])
    value_variable = torch.tensor([0, 1, 2, 0])
    out = multi_time_attention(scores, values, observed, value_variable)
    assert out.shape == (1, 1, 2, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([(10 * 1 + 30 * 3) / 4, 0.0, (2 * 2 + 4 * 4) / 6,
                                                          (-1 * 1 - 3 * 3) / 4]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([(10 + 30) / 2, 0.0, (2 + 4) / 2, (-1 - 3) / 2]))
    assert SCORE_FLOOR > math.log(torch.finfo(torch.float32).tiny)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast too
        torch.testing.assert_close(multi_time_attention(scores, values, observed, value_variable), out)


def test_utde_layout_and_xray_hours():
    model = build("utde")
    # EHR feature columns -> variable (METHODS.md 1.5): CRR 0-1, DBP 2, FiO2 3, GCS eye 4-11, motor 12-23, ..., pH 58
    for column, variable in {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 11: 3, 12: 4, 48: 6, 49: 7, 58: 16}.items():
        assert int(model.value_variable[column]) == variable
    assert model.value_variable.numel() == 59
    batch = stays(MIXED)
    batch.cxr_hours = torch.tensor([2.5, 0.0, 0.0, 6.0, 0.0, 0.0])
    # X-ray hour = prediction time (ehr_length) - cxr_hours; lengths 6, 3, 1, 6, 2, 4
    torch.testing.assert_close(model.xray_hours(batch)[[0, 3]], torch.tensor([6 - 2.5, 6 - 6.0]))
    with pytest.raises(ValueError, match="59 values"):
        get_model_class("utde")(N_LABELS, 49)


def test_utde_mtand_keys_are_the_observed_hours_of_each_variable():
    model = build("utde").eval()
    batch = stays(MIXED)
    row = 0
    with torch.no_grad():
        times = model.time_embedding(torch.arange(STEPS, dtype=torch.float32))
        irregular = model.irregular_embedding(batch, times)
        # a second computation, one channel at a time: every hour q queries the hours k < length where the
        # channel's variable was observed, with scores q(φ(q))·k(φ(k)) / sqrt(head size) per head
        heads, head_dim = model.heads, times.shape[1] // model.heads
        queries = model.time_query(times).view(STEPS, heads, head_dim)
        keys = model.time_key(times).view(STEPS, heads, head_dim)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) / math.sqrt(head_dim)
        observed = batch.ehr_mask[row, :LENGTHS[row]] > 0
        attended = torch.zeros(heads, STEPS, 59)
        for channel in range(59):
            hours = observed[:, int(model.value_variable[channel])].nonzero()[:, 0]
            if hours.numel():
                weights = scores[:, :, hours].softmax(-1)
                attended[:, :, channel] = weights @ batch.ehr[row, hours, channel]
        ever = observed.any(0).float()
        features = torch.cat([attended.transpose(0, 1).reshape(STEPS, -1), ever.expand(STEPS, -1)], dim=1)
        torch.testing.assert_close(irregular[row], model.irregular_projection(features), atol=1e-5, rtol=1e-5)
        # values where their variable was not observed are no keys
        channel, variable = 4, 3  # GCS eye opening, first one-hot column
        unobserved = (~observed[:, variable]).nonzero()[:, 0]
        assert unobserved.numel() and observed[:, variable].any()
        changed = stays(MIXED)
        changed.ehr[row, unobserved, channel] = 99.0
        torch.testing.assert_close(model.irregular_embedding(changed, times), irregular, rtol=0, atol=0)
        # +1 on every observed value of the channel moves each hour's attended value by exactly 1 (its weights sum
        # to 1), so the embedding by the sum over heads of that channel's projection weights
        changed = stays(MIXED)
        changed.ehr[row, observed[:, variable].nonzero()[:, 0], channel] += 1.0
        delta = model.irregular_embedding(changed, times) - irregular
        weight = model.irregular_projection.weight
        shift = sum(weight[:, h * 59 + channel] for h in range(heads))
        torch.testing.assert_close(delta[row], shift.expand(STEPS, -1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(delta[1:], torch.zeros_like(delta[1:]), rtol=0, atol=0)


def test_utde_output_depends_on_the_xray_time_of_paired_stays_only():
    model = build("utde").eval()
    batch = stays(MIXED)
    base = model(batch).logits
    moved = stays(MIXED)
    moved.cxr_hours[0] += 3.0  # paired stay 0: its X-ray 3 h earlier
    after = model(moved).logits
    assert (after[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[1:], base[1:], rtol=0, atol=0)
    unpaired = stays(MIXED)
    unpaired.cxr_hours[1] = 7.0  # stay 1 has no X-ray: its cxr_hours is never read
    torch.testing.assert_close(model(unpaired).logits, base, rtol=0, atol=0)


def test_utde_imputation_convolution_never_reads_padded_hours():
    model = build("utde", kernel_size=3).eval()  # a centred kernel 3 reaches one hour past the last valid one
    batch, changed = stays(MIXED), stays(MIXED)
    changed.ehr[torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]] = 100.0
    torch.testing.assert_close(model(changed).logits, model(batch).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        build("utde", kernel_size=2)


def test_utde_unpaired_stays_use_the_no_xray_token():
    model = build("utde").eval()
    batch = stays(MIXED)
    base = model(batch).logits
    with torch.no_grad():
        model.no_xray.add_(torch.linspace(-1.0, 1.0, 16))  # not a constant: LayerNorm would remove it
    after = model(batch).logits
    unpaired = batch.has_cxr == 0
    assert (after[unpaired] - base[unpaired]).abs().amax(dim=1).min() > 1e-5
    torch.testing.assert_close(after[~unpaired], base[~unpaired], rtol=0, atol=0)


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


# ----------------------------------------------------------------------------------------- cross attention
def test_cross_attention_exchanges_information_both_ways():
    model = build("cross_attention").eval()
    batch = stays(MIXED)
    with torch.no_grad():
        ehr, xray, ehr_padding, xray_padding = model.fuse(batch)
        assert xray.shape == (6, 4, 16)  # 2x2 layer4 tokens at 64 px
        new_image = stays(MIXED)
        new_image.cxr[0] = torch.randn(1, IMAGE, IMAGE)
        ehr_image, xray_image, _, _ = model.fuse(new_image)
        # the EHR stream of the paired stay follows its image (EHR queries attend to the X-ray tokens)
        valid = ~ehr_padding[0]
        assert (ehr_image[0, valid] - ehr[0, valid]).abs().max() > 1e-4
        torch.testing.assert_close(ehr_image[1:], ehr[1:], rtol=0, atol=0)
        new_ehr = stays(MIXED)
        new_ehr.ehr[0, :LENGTHS[0]] += torch.randn(LENGTHS[0], FEATURES)
        _, xray_ehr, _, _ = model.fuse(new_ehr)
        # the X-ray stream of the paired stay follows its EHR (X-ray queries attend to the EHR tokens)
        assert (xray_ehr[0] - xray[0]).abs().max() > 1e-4
        torch.testing.assert_close(xray_ehr[1:], xray[1:], rtol=0, atol=0)


def test_cross_attention_missing_xray_token():
    model = build("cross_attention").eval()
    batch = stays(MIXED)
    unpaired = batch.has_cxr == 0
    with torch.no_grad():
        tokens, padding = model.xray_tokens(batch)
        assert padding[unpaired].tolist() == [[False, True, True, True]] * 3
        assert not padding[~unpaired].any()
        torch.testing.assert_close(tokens[unpaired, 0], model.missing_xray.expand(3, -1), rtol=0, atol=0)
        base = model(batch).logits
        model.missing_xray.add_(torch.linspace(-1.0, 1.0, 16))
        after = model(batch).logits
    assert (after[unpaired] - base[unpaired]).abs().amax(dim=1).min() > 1e-5
    torch.testing.assert_close(after[~unpaired], base[~unpaired], rtol=0, atol=0)
    # no X-ray in the batch: one missing token per stay, the same logits for those stays
    none = stays(NONE)
    with torch.no_grad():
        tokens, padding = model.xray_tokens(none)
        assert tokens.shape == (6, 1, 16) and not padding.any()
        torch.testing.assert_close(model(none).logits[unpaired], after[unpaired], atol=1e-5, rtol=1e-5)


def test_cross_attention_patch_tokens_and_position_embedding_by_hand():
    frozen = dict(CXR, frozen_stages=4)
    model = build("cross_attention", cxr=frozen, max_grid=3).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for height, width in ((2, 2), (1, 1), (3, 2)):  # precomputed layer4 maps, pooled features, a 3x2 map
            features = torch.randn(2, 512, height, width, generator=generator)
            tokens = model.patch_tokens(features)
            assert tokens.shape == (2, height * width, 16)
            for i in range(height):
                for j in range(width):
                    expected = (model.grid_tokens.projection(features[:, :, i, j]) + model.grid_tokens.row_position[i]
                                + model.grid_tokens.column_position[j])
                    torch.testing.assert_close(tokens[:, i * width + j], expected)
        with pytest.raises(ValueError, match="max_grid=3"):
            model.patch_tokens(torch.randn(1, 512, 4, 4))
    batch = stays(MIXED)
    batch.cxr = torch.randn(6, 512, 1, 1) * batch.has_cxr[:, None, None, None]
    assert model(batch).logits.shape == (6, N_LABELS)
    assert isinstance(model.cxr_backbone, CXRBackbone) and not model.cxr_backbone.trainable_stages
