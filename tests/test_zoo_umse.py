"""Tests for UMSE (tiny sizes, one thread): triplet tokens built by hand, time-embedded X-ray patch tokens, the MBT
bottleneck chosen per stay by the missing-X-ray flag (checked against a second, one-stay-at-a-time computation),
the learned weighting of the two summaries, and the generic model contract."""
from __future__ import annotations

import math

import pytest
import torch
from test_models import FEATURES, MIXED, N_LABELS, NONE, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.data.ehr import channel_layout
from ehrcxr.models import Batch, create_model, get_model_class
from ehrcxr.models.umse import observed_triplets

torch.set_num_threads(1)

IMAGE = 64  # layer4 of a ResNet-18 gives 2x2 maps at 64 px: 4 X-ray patch tokens
CXR = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}
VARIABLES, VALUES = 17, 59
PAIRED, UNPAIRED = [0, 2, 3], [1, 4, 5]  # the rows of MIXED with and without an X-ray
HEART_RATE, GLUCOSE, GCS_EYE, CAPILLARY, SYSTOLIC, PH = 8, 7, 3, 0, 13, 16  # variable positions
COLUMN = {HEART_RATE: 50, GLUCOSE: 49, SYSTOLIC: 55, PH: 58}  # their value channels (continuous)
GCS_EYE_COLUMNS, CAPILLARY_COLUMNS = range(4, 12), range(0, 2)  # one-hot channels
CATEGORY_ROW = {CAPILLARY: 0, GCS_EYE: 2}  # first row in the category table: CRR 2 rows, then GCS eye 8 rows


def stays(has_cxr: list[float], seed: int = 0) -> Batch:
    """make_batch's stays with 64 px images and observation masks (~40% of the valid variable-hours, the mask
    channels 59..75 equal to ehr_mask), X-rays taken 0.5..5 h before the prediction time."""
    batch = make_batch(has_cxr, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    size = len(has_cxr)
    valid = (torch.arange(STEPS)[None, :] < batch.ehr_length[:, None]).float()
    batch.ehr_mask = (torch.rand(size, STEPS, VARIABLES, generator=generator) < 0.4).float() * valid[..., None]
    batch.ehr[..., VALUES:] = batch.ehr_mask
    batch.cxr = torch.randn(size, 1, IMAGE, IMAGE, generator=generator) * batch.has_cxr[:, None, None, None]
    batch.cxr_hours = (0.5 + 4.5 * torch.rand(size, generator=generator)) * batch.has_cxr
    return batch


def build(seed: int = 0, **params):
    torch.manual_seed(seed)
    params = {"hidden": 16, "heads": 2, "layers": 2, "max_ehr_len": 64} | params
    return create_model("umse", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(CXR), **params)


def scalar_embedding_by_hand(module, x: float) -> torch.Tensor:
    """ReLU(LayerNorm(w·x + b)) written out (biased variance, eps 1e-5)."""
    linear, norm = module.layers[0], module.layers[1]
    h = linear.weight[:, 0] * x + linear.bias
    centred = h - h.mean()
    normed = centred / torch.sqrt((centred ** 2).mean() + 1e-5) * norm.weight + norm.bias
    return normed.clamp_min(0.0)


def sinusoid_by_hand(count: int, dim: int) -> torch.Tensor:
    return torch.tensor([[math.sin(p / 10000 ** (i / dim)) if i % 2 == 0 else math.cos(p / 10000 ** ((i - 1) / dim))
                          for i in range(dim)] for p in range(count)])


def randomise_norms(model) -> None:
    """LayerNorm scales and shifts away from 1 and 0, so that a test sees them."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))


# ----------------------------------------------------------------------------------------- triplet tokens
def test_layout_assumed_by_hand():
    layout = channel_layout()
    assert [layout.feature_names[COLUMN[v]] for v in (HEART_RATE, GLUCOSE, SYSTOLIC, PH)] == [
        "Heart Rate", "Glucose", "Systolic blood pressure", "pH"]
    assert layout.variables[GCS_EYE] == "Glascow coma scale eye opening"
    assert [layout.feature_variable[c] for c in GCS_EYE_COLUMNS] == [GCS_EYE] * 8
    assert layout.categorical[CAPILLARY] and layout.categorical[GCS_EYE] and not layout.categorical[HEART_RATE]


def test_triplet_tokens_by_hand():
    """Stay 0 (3 valid hours): heart rate 0.5 at hour 0, GCS eye category 2 and heart rate −1 at hour 1, and a heart
    rate flagged in padding hour 3 (no token). Stay 1 (4 hours): pH, heart rate, capillary refill category 1,
    heart rate + systolic at hour 3: 5 measurements, the most recent 4 kept (max_ehr_len 4)."""
    model = build(max_ehr_len=4).eval()
    randomise_norms(model)
    generator = torch.Generator().manual_seed(3)
    ehr = torch.randn(2, 4, FEATURES, generator=generator)  # every other channel holds noise: never read
    mask = torch.zeros(2, 4, VARIABLES)

    def observe(row, hour, variable, value=None, category=None):
        mask[row, hour, variable] = 1.0
        if category is None:
            ehr[row, hour, COLUMN[variable]] = value
        else:
            columns = list(GCS_EYE_COLUMNS if variable == GCS_EYE else CAPILLARY_COLUMNS)
            ehr[row, hour, columns] = 0.0
            ehr[row, hour, columns[category]] = 1.0

    observe(0, 0, HEART_RATE, 0.5)
    observe(0, 1, GCS_EYE, category=2)
    observe(0, 1, HEART_RATE, -1.0)
    observe(0, 3, HEART_RATE, 9.0)  # hour 3 >= length 3: padding
    observe(1, 0, PH, 0.1)          # the oldest of 5: dropped
    observe(1, 1, HEART_RATE, 0.2)
    observe(1, 2, CAPILLARY, category=1)
    observe(1, 3, HEART_RATE, 0.3)
    observe(1, 3, SYSTOLIC, -0.4)
    ehr[..., VALUES:] = mask
    batch = Batch(ehr=ehr, ehr_mask=mask, ehr_length=torch.tensor([3, 4]), cxr=torch.zeros(2, 1, IMAGE, IMAGE),
                  has_cxr=torch.zeros(2), cxr_hours=torch.zeros(2), labels=torch.zeros(2, N_LABELS),
                  stay_id=torch.arange(2))
    with torch.no_grad():
        tokens, padding = model.ehr_tokens(batch)

        def continuous(variable, value, hour):
            return (model.ehr_variable.weight[variable] + scalar_embedding_by_hand(model.ehr_value, value)
                    + scalar_embedding_by_hand(model.time_embedding, hour))

        def categorical(variable, category, hour):
            return (model.ehr_variable.weight[variable]
                    + model.ehr_category.weight[CATEGORY_ROW[variable] + category]
                    + scalar_embedding_by_hand(model.time_embedding, hour))

        expected = torch.stack([
            torch.stack([continuous(HEART_RATE, 0.5, 0), categorical(GCS_EYE, 2, 1), continuous(HEART_RATE, -1.0, 1),
                         torch.zeros(16)]),
            torch.stack([continuous(HEART_RATE, 0.2, 1), categorical(CAPILLARY, 1, 2), continuous(HEART_RATE, 0.3, 3),
                         continuous(SYSTOLIC, -0.4, 3)])])
    assert tokens.shape == (2, 4, 16)
    assert padding.tolist() == [[False, False, False, True], [False, False, False, False]]
    torch.testing.assert_close(tokens, expected)


def test_token_count_is_the_observed_measurements_capped():
    batch = stays(MIXED)
    batch.ehr_mask[0, 5, :] = 1.0  # row 0: 6 valid hours
    batch.ehr_mask[1, 4, :] = 1.0  # row 1: 3 valid hours: hour 4 is padding
    valid = (torch.arange(STEPS)[None, :] < batch.ehr_length[:, None])[..., None]
    observed = ((batch.ehr_mask > 0.5) & valid).sum(dim=(1, 2))
    for cap in (1000, 7):
        row, hour, variable, slot, kept = observed_triplets(batch.ehr_mask, batch.ehr_length, cap)
        assert kept.tolist() == observed.clamp(max=cap).tolist()
        assert torch.bincount(row, minlength=6).tolist() == kept.tolist()
        assert bool((hour < batch.ehr_length[row]).all()) and bool((batch.ehr_mask[row, hour, variable] == 1).all())
        assert sorted(zip(row.tolist(), slot.tolist())) == [(r, s) for r in range(6) for s in range(int(kept[r]))]
        for r in range(6):  # the kept ones are each stay's most recent, in time order
            order = (hour[row == r] * VARIABLES + variable[row == r])[slot[row == r].argsort()]
            everything = ((batch.ehr_mask[r] > 0.5) & valid[r]).flatten().nonzero()[:, 0]
            assert order.tolist() == everything[everything.numel() - int(kept[r]):].tolist()
    model = build(max_ehr_len=7)
    tokens, padding = model.ehr_tokens(batch)
    assert tokens.shape[1] == 7 and (~padding).sum(1).tolist() == observed.clamp(max=7).tolist()


# ----------------------------------------------------------------------------------------- X-ray tokens
def test_xray_patch_tokens_carry_the_time_of_the_xray():
    model = build().eval()
    randomise_norms(model)
    batch = stays(MIXED)
    rows = torch.tensor(PAIRED)
    with torch.no_grad():
        tokens = model.xray_tokens(batch, rows)
        feature_map = model.cxr_backbone.feature_map(batch.cxr[rows])  # (3, 512, 2, 2)
        assert tokens.shape == (3, 4, 16) and feature_map.shape[2:] == (2, 2)
        for p, row in enumerate(PAIRED):
            hour = float(batch.ehr_length[row]) - float(batch.cxr_hours[row])  # hours since admission
            extra = scalar_embedding_by_hand(model.time_embedding, hour) + model.ehr_variable.weight[VARIABLES]
            for k in range(4):
                patch = feature_map[p, :, k // 2, k % 2] @ model.patch_projection.weight.T + model.patch_projection.bias
                torch.testing.assert_close(tokens[p, k], patch + extra, atol=1e-5, rtol=1e-5)
        # the X-ray's time reaches a paired stay's output; an unpaired stay's cxr_hours never does
        before = model(batch).logits
        batch.cxr_hours[[0, 1]] += torch.tensor([3.0, 7.0])
        after = model(batch).logits
    assert (after[0] - before[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- skip bottleneck
def one_stay(model, batch: Batch, row: int, with_xray: bool):
    """A second computation of UMSE for one stay alone (no batch, no padding): its logits, EHR CLS output and
    bottleneck after each layer, with or without the X-ray stream."""
    tokens, padding = model.ehr_tokens(batch)
    ehr = model.ehr_input_norm(torch.cat([model.ehr_cls[0], tokens[row][~padding[row]]]))
    bottleneck = model.bottleneck[0]
    count = bottleneck.shape[0]
    if with_xray:
        xray = torch.cat([model.xray_cls[0], model.xray_tokens(batch, torch.tensor([row]))[0]])
        xray = model.xray_input_norm(xray) + sinusoid_by_hand(*xray.shape)
    bottlenecks = []
    for ehr_layer, xray_layer in zip(model.ehr_layers, model.xray_layers):
        ehr_out = ehr_layer(torch.cat([bottleneck, ehr])[None])[0]
        ehr, update = ehr_out[count:], ehr_out[:count]
        if with_xray:
            xray_out = xray_layer(torch.cat([bottleneck, xray])[None])[0]
            xray, update = xray_out[count:], (update + xray_out[:count]) / 2
        bottleneck = update
        bottlenecks.append(bottleneck)
    weight = torch.softmax(model.summary_logits, 0)
    summary = weight[0] * ehr[0] + weight[1] * xray[0] if with_xray else ehr[0]
    return model.head(summary), ehr[0], bottlenecks


def test_bottleneck_is_chosen_by_the_missing_flag():
    model = build(bottlenecks=2).eval()
    randomise_norms(model)
    batch = stays(MIXED)
    with torch.no_grad():
        logits = model(batch).logits
        ehr_summary, rows, _, bottlenecks = model.fuse(batch)
        assert rows.tolist() == PAIRED and len(bottlenecks) == 2 and bottlenecks[0].shape == (6, 2, 16)
        for row in range(6):
            paired = row in PAIRED
            expected_logits, expected_summary, expected_bottlenecks = one_stay(model, batch, row, with_xray=paired)
            torch.testing.assert_close(logits[row], expected_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ehr_summary[row], expected_summary, atol=1e-5, rtol=1e-5)
            for got, expected in zip(bottlenecks, expected_bottlenecks):
                torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
            if paired:  # the X-ray's bottleneck update reaches the next layer's EHR stream: the EHR-only path differs
                _, ehr_only_summary, ehr_only_bottlenecks = one_stay(model, batch, row, with_xray=False)
                assert (bottlenecks[0][row] - ehr_only_bottlenecks[0]).abs().max() > 1e-3
                assert (ehr_summary[row] - ehr_only_summary).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_unpaired_stays_never_depend_on_the_xray_stream(mode):
    model = build().train(mode == "train")
    batch, changed = stays(MIXED), stays(MIXED)
    changed.cxr = torch.randn(changed.cxr.shape) * 5  # new pixels for every stay, paired or not
    changed.cxr_hours = changed.cxr_hours + 3.0
    torch.manual_seed(1)
    before = model.fuse(batch)
    torch.manual_seed(1)
    after = model.fuse(changed)
    unpaired = torch.tensor(UNPAIRED)
    for got, expected in zip(after[3], before[3]):
        torch.testing.assert_close(got[unpaired], expected[unpaired], rtol=0, atol=0)
        assert (got[PAIRED] - expected[PAIRED]).abs().amax(dim=(1, 2)).min() > 1e-4
    torch.testing.assert_close(after[0][unpaired], before[0][unpaired], rtol=0, atol=0)
    if mode == "eval":  # nor do the X-ray stream's weights: their logits stay the EHR-only computation
        with torch.no_grad():
            for parameter in model.xray_layers.parameters():
                parameter.add_(0.5)
            model.xray_cls.add_(1.0)
            moved = model(changed).logits
            reference = torch.stack([one_stay(model, changed, row, with_xray=False)[0] for row in UNPAIRED])
        torch.testing.assert_close(moved[unpaired], reference, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- summary weighting
def test_learned_weighting_of_the_two_summaries():
    model = build().eval()
    with torch.no_grad():
        model.summary_logits.copy_(torch.tensor([0.7, -0.4]))
    batch = stays(MIXED)
    with torch.no_grad():
        logits = model(batch).logits
        ehr_summary, rows, xray_summary, _ = model.fuse(batch)
    ehr_weight = math.exp(0.7) / (math.exp(0.7) + math.exp(-0.4))
    for p, row in enumerate(PAIRED):
        mixed = ehr_weight * ehr_summary[row] + (1 - ehr_weight) * xray_summary[p]
        torch.testing.assert_close(logits[row], model.head(mixed), atol=1e-6, rtol=1e-6)
    for row in UNPAIRED:  # the EHR summary alone, whatever the weights
        torch.testing.assert_close(logits[row], model.head(ehr_summary[row]), atol=1e-6, rtol=1e-6)
    # the weights are learned from the paired stays only
    model.train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits, batch.labels).backward()
    assert model.summary_logits.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    none = stays(NONE)
    torch.nn.functional.binary_cross_entropy_with_logits(model(none).logits, none.labels).backward()
    assert model.summary_logits.grad is None or not model.summary_logits.grad.any()


# ----------------------------------------------------------------------------------------- the model contract
@pytest.mark.parametrize("has_cxr", [MIXED, NONE, [1] * 6], ids=["mixed", "none", "all"])
def test_forward_backward(has_cxr):
    model = build().train()
    batch = stays(has_cxr)
    output = model(batch)
    assert output.logits.shape == (6, N_LABELS) and torch.isfinite(output.logits).all()
    assert output.aux_losses == {}
    torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels).backward()
    ehr_parts = [p for name, p in model.named_parameters() if name.startswith(("ehr_", "time_embedding"))]
    assert has_grad(ehr_parts)
    assert has_grad(cxr_params(model)) == (sum(has_cxr) > 0)
    assert all(p.grad is None and not p.requires_grad for p in model.cxr_backbone.prefix.parameters())
    if has_cxr == MIXED:  # every trainable part is used
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_ehr_padding_and_missing_images_do_not_matter():
    model = build().eval()
    batch, changed = stays(MIXED), stays(MIXED)
    padding = torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]
    changed.ehr[padding] = 100.0
    changed.ehr_mask[padding] = 1.0  # an "observation" flagged in a padding hour is no token
    missing = changed.has_cxr == 0
    changed.cxr[missing] = torch.randn(int(missing.sum()), 1, IMAGE, IMAGE) * 5
    torch.testing.assert_close(model(changed).logits, model(batch).logits, rtol=1e-5, atol=1e-5)


def test_no_observation_bf16_autocast_and_layout_check():
    model = build().train()
    batch = stays(MIXED)
    batch.ehr_mask[1] = 0.0  # a stay without a single measurement: its CLS alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="59 values"):
        get_model_class("umse")(N_LABELS, 49)
