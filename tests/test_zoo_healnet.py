"""Tests for HEALNet (models/healnet.py): the latent array's fusion schedule written out by hand, the skipped X-ray
update of a stay without an X-ray, Fourier position encodings, weight tying, EHR padding masks (tiny sizes)."""
from __future__ import annotations

import math

import pytest
import torch
from test_models import FEATURES, MIXED, N_LABELS, NONE, STEPS, cxr_params, has_grad, make_batch

from ehrcxr.models import Batch, create_model
from ehrcxr.models.healnet import LatentAttentionBlock, fourier_encode, grid_positions

torch.set_num_threads(1)

# frozen_stages 4: batch.cxr holds the last feature map itself (512 x 2 x 2), so the X-ray keys are known exactly
FEATURE_MAP = {"depth": 18, "weights": None, "frozen_stages": 4, "pretrained": None}
IMAGES = {"depth": 18, "weights": None, "frozen_stages": 3, "pretrained": None}  # 64 px -> layer4 map 2 x 2
PAIRED, UNPAIRED = [0, 2, 3], [1, 4, 5]  # the rows of MIXED
TIED_LAYERS = {1: [0], 2: [0, 1], 3: [0, 1, 1]}  # weight set of each fusion layer: own first, then one shared


def stays(has_cxr: list[float], seed: int = 0, images: bool = False) -> Batch:
    """make_batch's stays with an X-ray input of the paired rows: 2x2 feature maps of 512 channels, or 64 px images."""
    batch = make_batch(has_cxr, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    shape = (1, 64, 64) if images else (512, 2, 2)
    batch.cxr = torch.randn(len(has_cxr), *shape, generator=generator) * batch.has_cxr[:, None, None, None]
    return batch


def build(seed: int = 0, cxr: dict | None = None, **params):
    torch.manual_seed(seed)
    params = {"hidden": 16, "n_latents": 4, "depth": 2, "cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8,
              "latent_dim_head": 8, "num_freq_bands": 2, "max_freq": 6.0} | params
    return create_model("healnet", n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(cxr or FEATURE_MAP), **params)


def written_out_logits(model, batch: Batch, row: int, image: bool) -> torch.Tensor:
    """One stay alone, its EHR keys cut to its valid hours (no mask needed): per fusion layer, the EHR
    cross-attention block then the layer's self-attention blocks, then (``image``) the same for the X-ray; head on
    the mean latent."""
    length = int(batch.ehr_length[row])
    hours = fourier_encode(torch.linspace(-1, 1, STEPS)[:, None], model.max_freq, model.num_freq_bands)
    ehr = torch.cat([batch.ehr[row, :length], hours[:length]], dim=-1)[None]
    xray = model.cxr_context(batch.cxr[row:row + 1])
    latents = model.latents[None]
    for weights in TIED_LAYERS[model.depth]:
        steps = [(model.ehr_updates[weights], ehr)] + ([(model.cxr_updates[weights], xray)] if image else [])
        for cross, context in steps:
            latents = cross(latents, context)
            for block in model.latent_blocks[weights]:
                latents = block(latents)
    return model.head(latents.mean(dim=1))[0]


# ----------------------------------------------------------------------------------------- Fourier encoding
def test_fourier_encoding_matches_hand_values():
    # 2 x 5 grid: rows at -1, 1; columns at -1, -0.5, 0, 0.5, 1; bands 2, max_freq 6 -> frequencies 1 and 3.
    # Per axis: [sin(pi p), sin(3 pi p), cos(pi p), cos(3 pi p), p]
    encoded = fourier_encode(grid_positions(2, 5), max_freq=6.0, num_freq_bands=2)
    assert encoded.shape == (10, 10)
    expected = {(0, 1): [0, 0, -1, -1, -1] + [-1, 1, 0, 0, -0.5],  # row -1; column -0.5: sin(-pi/2), sin(-3pi/2)
                (1, 3): [0, 0, -1, -1, 1] + [1, -1, 0, 0, 0.5],
                (1, 2): [0, 0, -1, -1, 1] + [0, 0, 1, 1, 0]}
    for (row, column), values in expected.items():
        torch.testing.assert_close(encoded[row * 5 + column], torch.tensor(values, dtype=torch.float32),
                                   atol=1e-6, rtol=0)
    # one axis (EHR hours), 3 bands up to max_freq 10: frequencies 1, 3, 5; hour positions -1, 0, 1
    hours = fourier_encode(grid_positions(3), max_freq=10.0, num_freq_bands=3)
    torch.testing.assert_close(hours, torch.tensor([[0, 0, 0, -1, -1, -1, -1], [0, 0, 0, 1, 1, 1, 0],
                                                    [0, 0, 0, -1, -1, -1, 1]], dtype=torch.float32),
                               atol=1e-6, rtol=0)
    frequencies = fourier_encode(torch.tensor([[0.25]]), max_freq=10.0, num_freq_bands=3)[0]
    torch.testing.assert_close(frequencies[:3], torch.tensor([math.sin(f * math.pi / 4) for f in (1, 3, 5)]))


def test_keys_are_raw_inputs_followed_by_their_position_encoding():
    model = build(num_freq_bands=1, max_freq=10.0).eval()  # one band, frequency 1: [sin(pi p), cos(pi p), p]
    batch = stays(MIXED)
    xray = model.cxr_context(batch.cxr[PAIRED])
    assert xray.shape == (3, 4, 512 + 6)
    torch.testing.assert_close(xray[:, :, :512], batch.cxr[PAIRED].flatten(2).transpose(1, 2))
    # 2 x 2 map, row-major: (row -1, col -1), (-1, 1), (1, -1), (1, 1); sin(+-pi) = 0, cos(+-pi) = -1
    expected = torch.tensor([[0, -1, -1, 0, -1, -1], [0, -1, -1, 0, -1, 1],
                             [0, -1, 1, 0, -1, -1], [0, -1, 1, 0, -1, 1]], dtype=torch.float32)
    torch.testing.assert_close(xray[:, :, 512:], expected.expand(3, -1, -1), atol=1e-6, rtol=0)
    ehr, padding = model.ehr_context(batch)
    assert ehr.shape == (6, STEPS, FEATURES + 3)
    torch.testing.assert_close(ehr[:, :, :FEATURES], batch.ehr)
    hour = torch.linspace(-1, 1, STEPS)  # the served window: hour t at -1 + 2t/(T - 1)
    torch.testing.assert_close(ehr[0, :, FEATURES:], torch.stack([torch.sin(math.pi * hour),
                                                                torch.cos(math.pi * hour), hour], dim=1))
    assert padding.tolist()[1] == [False] * 3 + [True] * 3  # row 1 has 3 valid hours


# ----------------------------------------------------------------------------------------- fusion schedule
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_output_matches_the_fusion_schedule_written_out(depth):
    model = build(depth=depth, self_per_cross_attn=2).eval()
    batch = stays(MIXED)
    logits = model(batch).logits
    for row in range(6):
        expected = written_out_logits(model, batch, row, image=row in PAIRED)
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)


def test_stay_without_xray_skips_the_image_update():
    model = build(depth=3).eval()
    batch = stays(MIXED)
    logits = model(batch).logits
    ehr_only = model(stays(NONE)).logits  # the same stays, no X-ray anywhere
    torch.testing.assert_close(logits[UNPAIRED], ehr_only[UNPAIRED], atol=1e-6, rtol=0)
    for row in UNPAIRED:  # unchanged by every X-ray step: EHR updates alone, not a zero-image update
        torch.testing.assert_close(logits[row], written_out_logits(model, batch, row, image=False),
                                   atol=1e-5, rtol=1e-5)
    for row in PAIRED:  # paired stays do take the X-ray steps
        assert (logits[row] - written_out_logits(model, batch, row, image=False)).abs().max() > 1e-3


def test_paired_output_depends_on_its_image_and_where_its_features_lie():
    model = build().eval()
    batch = stays(MIXED)
    logits = model(batch).logits
    changed = stays(MIXED)
    changed.cxr[0] = torch.randn(512, 2, 2, generator=torch.Generator().manual_seed(5))
    after = model(changed).logits
    assert (after[0] - logits[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[1:], logits[1:], atol=1e-6, rtol=0)
    # the same features at other positions (map flipped left-right): only the Fourier encoding tells them apart
    flipped = stays(MIXED)
    flipped.cxr[2] = flipped.cxr[2].flip(-1)
    assert (model(flipped).logits[2] - logits[2]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- weight tying
def test_layers_after_the_first_share_weights_and_size_stops_growing():
    def size(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    tied = {depth: build(depth=depth) for depth in (1, 2, 3, 5)}
    assert size(tied[1]) < size(tied[2]) == size(tied[3]) == size(tied[5])
    assert [tied[5].layer_weights(layer) for layer in range(5)] == [0, 1, 1, 1, 1]
    assert len(tied[5].ehr_updates) == len(tied[5].cxr_updates) == len(tied[5].latent_blocks) == 2
    untied = {depth: build(depth=depth, weight_tie_layers=False) for depth in (1, 2, 3)}
    assert size(untied[1]) == size(tied[1])
    assert size(untied[3]) - size(untied[2]) == size(untied[2]) - size(untied[1]) == size(tied[2]) - size(tied[1])
    # depth 3 reuses depth 2's weights: the shared layer runs twice, so the output differs from depth 2's
    tied[3].load_state_dict(tied[2].state_dict())
    batch = stays(MIXED)
    tied[2].eval(), tied[3].eval()
    assert (tied[3](batch).logits - tied[2](batch).logits).abs().min() > 1e-5


# ----------------------------------------------------------------------------------------- EHR padding
def test_ehr_padding_hours_are_masked_keys():
    model = build().eval()
    batch, changed = stays(MIXED), stays(MIXED)
    padding = torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]
    changed.ehr[padding] = 100.0
    logits = model(changed).logits
    torch.testing.assert_close(logits, model(batch).logits, atol=1e-6, rtol=0)
    for row in (1, 2, 4):  # rows with padding: the same as attending to the valid hours only
        torch.testing.assert_close(logits[row], written_out_logits(model, changed, row, image=row in PAIRED),
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("snn", [True, False])
def test_attention_block_matches_hand_formula(snn):
    torch.manual_seed(0)
    block = LatentAttentionBlock(latent_dim=8, context_dim=5, heads=2, dim_head=3, dropout=0.2, snn=snn).eval()
    latents, context = torch.randn(1, 4, 8), torch.randn(1, 6, 5)
    padding = torch.tensor([[False, False, False, False, True, True]])
    norm = torch.nn.functional.layer_norm
    query = block.to_query(norm(latents, (8,), block.norm.weight, block.norm.bias))
    normed_context = norm(context, (5,), block.context_norm.weight, block.context_norm.bias)
    key, value = block.to_key_value(normed_context).chunk(2, -1)
    heads = []
    for head in range(2):
        columns = slice(3 * head, 3 * head + 3)
        scores = query[0, :, columns] @ key[0, :4, columns].T / math.sqrt(3) / 0.5  # temperature 0.5; 4 valid keys
        heads.append(scores.softmax(-1) @ value[0, :4, columns])
    mixed = block.to_out[0](torch.cat(heads, dim=1))
    attended = torch.where(mixed > 0, mixed, 0.01 * mixed) + latents[0]  # LeakyReLU(0.01), residual
    ff = block.feedforward
    values, gates = ff.expand(norm(attended, (8,), ff.norm.weight, ff.norm.bias)).chunk(2, -1)
    activation = torch.nn.functional.selu if snn else torch.nn.functional.gelu
    expected = ff.contract(values * activation(gates)) + attended
    torch.testing.assert_close(block(latents, context, padding)[0], expected)
    assert isinstance(ff.dropout, torch.nn.AlphaDropout) == snn


@pytest.mark.parametrize("has_cxr", [MIXED, NONE], ids=["mixed", "none"])
def test_every_part_trains_and_the_cnn_only_with_an_xray(has_cxr):
    model = build(cxr=IMAGES).train()
    batch = stays(has_cxr, images=True)
    output = model(batch)
    assert output.logits.shape == (6, N_LABELS) and output.aux_losses == {}
    torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels).backward()
    unused = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused == (set() if has_cxr == MIXED else {"cxr_backbone", "cxr_updates"})
    assert has_grad(cxr_params(model)) == (has_cxr == MIXED)


def test_published_size_builds_and_runs():
    # CareBench: 256 latents x 256, 4 + 4 heads of 64, depth 1, 4 bands up to 10 (MODEL_PARAMS_README Ph-b)
    model = build(hidden=256, n_latents=256, depth=1, cross_heads=4, latent_heads=4, cross_dim_head=64,
                  latent_dim_head=64, num_freq_bands=4, max_freq=10.0).eval()
    assert model.latents.shape == (256, 256)
    assert model.ehr_updates[0].context_norm.normalized_shape == (FEATURES + 9,)
    assert model(stays(MIXED)).logits.shape == (6, N_LABELS)
