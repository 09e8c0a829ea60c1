"""DAFT and MMTM, the fusion methods that act between the CNN stages, and the shared helper that runs the stages on
the paired rows with an exchange between them. Each model is checked against a second computation written out
here from its equations (stage by stage with the backbone's own layers), so removing the FiLM or the gates fails."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from ehrcxr.models import create_model
from ehrcxr.models.daft import DAFTBlock, affine_transform
from ehrcxr.models.encoders import (CXRBackbone, encode_paired_cxr, encode_paired_cxr_with_exchange,
                                    squeeze_paired)
from ehrcxr.models.mmtm import MMTMLayer
from test_models import ALL, FEATURES, IMAGE, MIXED, N_LABELS, NONE, make_batch

HIDDEN = 16
TINY_CXR = {"depth": 18, "weights": None, "frozen_stages": 2, "pretrained": None}  # maps 128x4x4, 256x2x2, 512x1x1


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny(name: str, seed: int = 0, **params):
    torch.manual_seed(seed)
    return create_model(name, n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(TINY_CXR), hidden=HIDDEN,
                        **params).eval()


def stages(backbone: CXRBackbone) -> list[torch.nn.Module]:
    """The trainable ResNet stages, read off the suffix directly (not through the code under test)."""
    return [module for name, module in backbone.suffix.named_children() if name.startswith("layer")]


def stage_maps(backbone: CXRBackbone, images: torch.Tensor, modulate):
    """Run the prefix and each stage by hand; ``modulate(index, map)`` after each, its result going on."""
    x = backbone.prefix(images)
    for index, stage in enumerate([None] + stages(backbone)):
        if stage is not None:
            x = stage(x)
        x = modulate(index, x)
    return x


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def with_changed(batch, rows, ehr: bool = False, image: bool = False, seed: int = 5):
    changed = copy.deepcopy(batch)
    generator = torch.Generator().manual_seed(seed)
    for row in rows:
        if ehr:
            length = int(changed.ehr_length[row])
            changed.ehr[row, :length] = torch.randn(length, FEATURES, generator=generator)
        if image:
            changed.cxr[row] = torch.randn(1, IMAGE, IMAGE, generator=generator)
    return changed


# ----------------------------------------------------------------------------------------- shared helper
def recorder(calls: list, describe):
    """An exchange that changes nothing and appends (index, describe(rows), map shape) to ``calls``."""
    def record(index, rows, feature_map):
        calls.append((index, describe(rows), tuple(feature_map.shape)))
        return feature_map
    return record


def test_exchange_runs_on_paired_rows_between_stages_and_its_result_goes_on():
    torch.manual_seed(0)
    backbone = CXRBackbone(depth=18, frozen_stages=2).eval()
    batch = make_batch(MIXED)
    calls = []
    plain = encode_paired_cxr_with_exchange(backbone, batch.cxr, batch.has_cxr, recorder(calls, lambda r: r.tolist()))
    assert calls == [(0, [0, 2, 3], (3, 128, 4, 4)), (1, [0, 2, 3], (3, 256, 2, 2)), (2, [0, 2, 3], (3, 512, 1, 1))]
    torch.testing.assert_close(plain, encode_paired_cxr(backbone, batch.cxr, batch.has_cxr))
    assert plain[[1, 4, 5]].abs().sum() == 0

    # a change at the prefix output must reach the pooled output: halve the map going into layer3
    halved = encode_paired_cxr_with_exchange(backbone, batch.cxr, batch.has_cxr,
                                             lambda index, rows, x: x * 0.5 if index == 0 else x)
    by_hand = torch.stack([stage_maps(backbone, batch.cxr[[row]], lambda i, x: x * 0.5 if i == 0 else x)[0]
                           .mean(dim=(1, 2)) for row in (0, 2, 3)])
    torch.testing.assert_close(halved[[0, 2, 3]], by_hand)
    assert not torch.allclose(halved[[0, 2, 3]], plain[[0, 2, 3]])


def test_exchange_without_any_x_ray_skips_the_cnn_but_runs_every_point():
    backbone = CXRBackbone(depth=18, frozen_stages=2)
    backbone.feature_map = None  # the CNN must not run
    batch = make_batch(NONE)
    calls = []
    features = encode_paired_cxr_with_exchange(backbone, batch.cxr, batch.has_cxr, recorder(calls, lambda r: r.numel()))
    assert calls == [(0, 0, (0, 128, 1, 1)), (1, 0, (0, 256, 1, 1)), (2, 0, (0, 512, 1, 1))]
    assert features.shape == (6, 512) and features.abs().sum() == 0


def test_squeeze_paired_by_hand():
    feature_map = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])  # one paired row, 2 channels, 1x2 map
    missing = torch.tensor([7.0, 8.0])
    squeeze = squeeze_paired(feature_map, torch.tensor([1]), missing, 3)
    torch.testing.assert_close(squeeze, torch.tensor([[7.0, 8.0], [2.0, -1.0], [7.0, 8.0]]))


# ----------------------------------------------------------------------------------------- DAFT
def test_affine_transform_by_hand_and_identity():
    feature_map = torch.tensor([[[[1.0, -2.0], [0.5, 4.0]], [[3.0, 0.0], [-1.0, 2.0]]]])  # (1, 2, 2, 2)
    scale, shift = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    expected = torch.tensor([[[[2.5, -3.5], [1.5, 8.5]], [[0.0, 3.0], [4.0, 1.0]]]])
    torch.testing.assert_close(affine_transform(feature_map, scale, shift), expected)
    assert torch.equal(affine_transform(feature_map, torch.ones(1, 2), torch.zeros(1, 2)), feature_map)
    torch.testing.assert_close(affine_transform(torch.tensor([[1.0, 2.0]]), scale, shift), torch.tensor([[2.5, 1.0]]))


def test_daft_block_bias_free_bottleneck_by_hand():
    block = DAFTBlock(image_channels=2, ehr_dim=1, channels=2, bottleneck_factor=1.5)  # int(3 / 1.5) = 2
    assert block.aux[0].bias is None and block.aux[2].bias is None
    with torch.no_grad():
        block.aux[0].weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, -1.0, 0.0]]))
        block.aux[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]))
    scale, shift = block(torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0]]))
    # hidden = relu([0.5 + 1, -2]) = [1.5, 0]; out = [1.5, 0, 3, 1.5] -> scale [1.5, 0], shift [3, 1.5]
    torch.testing.assert_close(scale, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(shift, torch.tensor([[3.0, 1.5]]))


def daft_reference(model, batch) -> torch.Tensor:
    """DAFT written out: FiLM of every map by Linear -> ReLU -> Linear of [GAP ∥ EHR], then the concat head."""
    ehr = model.ehr_encoder(batch.ehr, batch.ehr_length)[0]
    paired = batch.has_cxr > 0.5

    def film(index, x):
        aux = model.blocks[index].aux
        out = torch.relu(torch.cat([x.mean(dim=(2, 3)), ehr[paired]], 1) @ aux[0].weight.T) @ aux[2].weight.T
        channels = x.shape[1]
        return out[:, :channels, None, None] * x + out[:, channels:, None, None]

    image = torch.zeros(len(batch), 512)
    image[paired] = stage_maps(model.cxr_backbone, batch.cxr[paired], film).mean(dim=(2, 3))
    has = paired.float()[:, None]
    fused = torch.cat([ehr, (image @ model.cxr_projection.weight.T + model.cxr_projection.bias) * has, has], 1)
    return fused @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("has_cxr", [MIXED, ALL, NONE], ids=["mixed", "all", "none"])
def test_daft_matches_its_equations(has_cxr):
    model, batch = tiny("daft"), make_batch(has_cxr)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, daft_reference(model, batch))


def test_daft_ehr_changes_a_paired_stay_through_the_image_path_only_with_film():
    model, batch = tiny("daft"), make_batch(MIXED)
    with torch.no_grad():
        model.head.weight[:, :HIDDEN] = 0.0  # cut the EHR's direct path to the head
    changed = with_changed(batch, range(6), ehr=True)
    paired, unpaired = [0, 2, 3], [1, 4, 5]
    with torch.no_grad():
        before, after = model(batch).logits, model(changed).logits
        assert (after - before)[paired].abs().amax(dim=1).min() > 1e-5  # the EHR reaches them through the FiLM
        assert torch.equal(after[unpaired], before[unpaired])  # no image path: nothing left
        for block in model.blocks:  # FiLM removed: scale 1, shift 0
            block.forward = lambda squeeze, ehr: (torch.ones_like(squeeze), torch.zeros_like(squeeze))
        assert torch.equal(model(changed).logits, model(batch).logits)


def test_daft_identity_film_is_late_fusion_on_the_unmodulated_map():
    model, batch = tiny("daft"), make_batch(MIXED)
    for block in model.blocks:
        block.forward = lambda squeeze, ehr: (torch.ones_like(squeeze), torch.zeros_like(squeeze))
    with torch.no_grad():
        ehr = model.ehr_encoder(batch.ehr, batch.ehr_length)[0]
        has = batch.has_cxr[:, None]
        image = model.cxr_projection(encode_paired_cxr(model.cxr_backbone, batch.cxr, batch.has_cxr)) * has
        torch.testing.assert_close(model(batch).logits, model.head(torch.cat([ehr, image, has], 1)))


def daft_ehr_reference(model, batch) -> torch.Tensor:
    """CareBench's variant written out: EHR <- scale * EHR + shift at every point; head on the EHR alone."""
    state = model.ehr_encoder(batch.ehr, batch.ehr_length)[0]
    paired = batch.has_cxr > 0.5

    def film(index, x):
        nonlocal state
        squeeze = model.no_image_squeeze[index].expand(len(batch), -1).clone()
        if x is not None:
            squeeze[paired] = x.mean(dim=(2, 3))
        aux = model.blocks[index].aux
        out = torch.relu(torch.cat([squeeze, state], 1) @ aux[0].weight.T) @ aux[2].weight.T
        state = out[:, :HIDDEN] * state + out[:, HIDDEN:]
        return x

    if paired.any():
        stage_maps(model.cxr_backbone, batch.cxr[paired], film)
    else:
        for index in range(3):
            film(index, None)
    return state @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("has_cxr", [MIXED, NONE], ids=["mixed", "none"])
def test_daft_ehr_variant_matches_carebench_equations(has_cxr):
    model, batch = tiny("daft", modulate="ehr"), make_batch(has_cxr)
    with torch.no_grad():
        for squeeze in model.no_image_squeeze:
            squeeze.normal_()
        torch.testing.assert_close(model(batch).logits, daft_ehr_reference(model, batch))
    assert model.head.in_features == HIDDEN and not hasattr(model, "cxr_projection")


def test_daft_demo_sizes_and_unknown_variant():
    torch.manual_seed(0)
    model = create_model("daft", n_labels=1, ehr_features=76, cxr={"frozen_stages": 3}, hidden=64)
    # bottleneck int((C + 64) / 7): 320 / 7 -> 45 at the layer3 output, 576 / 7 -> 82 after layer4
    assert [tuple(block.aux[0].weight.shape) for block in model.blocks] == [(45, 320), (82, 576)]
    assert [tuple(block.aux[2].weight.shape) for block in model.blocks] == [(512, 45), (1024, 82)]
    with pytest.raises(ValueError, match="modulate must be one of"):
        create_model("daft", n_labels=1, ehr_features=76, cxr=None, modulate="image")


# ----------------------------------------------------------------------------------------- MMTM
def test_mmtm_layer_by_hand():
    layer = MMTMLayer(image_channels=3, ehr_dim=2, ratio=4)  # joint width int(2 * 5 / 4) = 2
    assert layer.squeeze.out_features == 2
    with torch.no_grad():
        layer.squeeze.weight.fill_(0.1)
        layer.squeeze.bias.copy_(torch.tensor([0.0, -5.0]))
        layer.image_excitation.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]]))
        layer.image_excitation.bias.copy_(torch.tensor([0.0, -3.0, 1.0]))
        layer.ehr_excitation.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
        layer.ehr_excitation.bias.copy_(torch.tensor([0.0, 0.5]))
    image_gate, ehr_gate = layer(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 5.0]]))
    # joint = relu([1.5, -3.5]) = [1.5, 0]; image E = [1.5, -3, -0.5]; EHR E = [3, 0.5]
    torch.testing.assert_close(image_gate, torch.tensor([[sigmoid(1.5), sigmoid(-3.0), sigmoid(-0.5)]]))
    torch.testing.assert_close(ehr_gate, torch.tensor([[sigmoid(3.0), sigmoid(0.5)]]))


def test_mmtm_gates_lie_in_the_unit_interval_and_each_depends_on_both_modalities():
    torch.manual_seed(0)
    layer = MMTMLayer(image_channels=8, ehr_dim=4)
    image, ehr = torch.randn(5, 8), torch.randn(5, 4)
    image_gate, ehr_gate = layer(image, ehr)
    assert ((image_gate > 0) & (image_gate < 1)).all() and ((ehr_gate > 0) & (ehr_gate < 1)).all()
    image_gate_new_ehr, _ = layer(image, ehr + 1.0)
    _, ehr_gate_new_image = layer(image + 1.0, ehr)
    assert (image_gate_new_ehr - image_gate).abs().max() > 1e-3  # the CXR gate reads the EHR
    assert (ehr_gate_new_image - ehr_gate).abs().max() > 1e-3  # the EHR gate reads the CXR


def mmtm_reference(model, batch) -> torch.Tensor:
    """MMTM written out: gates from the joint squeeze rescale each map (which goes on) and the EHR."""
    state = model.ehr_encoder(batch.ehr, batch.ehr_length)[0]
    paired = batch.has_cxr > 0.5

    def transfer(index, x):
        nonlocal state
        layer = model.exchanges[index]
        squeeze = model.no_image_squeeze[index].expand(len(batch), -1).clone()
        if x is not None:
            squeeze[paired] = x.mean(dim=(2, 3))
        joint = torch.relu(F.linear(torch.cat([squeeze, state], 1), layer.squeeze.weight, layer.squeeze.bias))
        image_gate = torch.sigmoid(F.linear(joint, layer.image_excitation.weight, layer.image_excitation.bias))
        state = state * torch.sigmoid(F.linear(joint, layer.ehr_excitation.weight, layer.ehr_excitation.bias))
        return None if x is None else x * image_gate[paired][:, :, None, None]

    image = torch.zeros(len(batch), 512)
    if paired.any():
        image[paired] = stage_maps(model.cxr_backbone, batch.cxr[paired], transfer).mean(dim=(2, 3))
    else:
        for index in range(3):
            transfer(index, None)
    projected = F.linear(state, model.ehr_projection.weight, model.ehr_projection.bias)
    return F.linear(torch.cat([projected, image, paired.float()[:, None]], 1), model.head.weight, model.head.bias)


@pytest.mark.parametrize("has_cxr", [MIXED, ALL, NONE], ids=["mixed", "all", "none"])
def test_mmtm_matches_its_equations(has_cxr):
    model, batch = tiny("mmtm"), make_batch(has_cxr)
    with torch.no_grad():
        for squeeze in model.no_image_squeeze:
            squeeze.normal_()
        torch.testing.assert_close(model(batch).logits, mmtm_reference(model, batch))


def capture_gates(model):
    gates = {}
    for index, layer in enumerate(model.exchanges):
        layer.register_forward_hook(lambda module, args, out, index=index: gates.__setitem__(index, out))
    return gates


def test_mmtm_stage_gates_depend_on_both_modalities_of_a_paired_stay():
    model, batch = tiny("mmtm"), make_batch(MIXED)
    gates = capture_gates(model)
    with torch.no_grad():
        model(batch)
        before = {index: (image.clone(), ehr.clone()) for index, (image, ehr) in gates.items()}
        model(with_changed(batch, [0], ehr=True))
        assert (gates[0][0][0] - before[0][0][0]).abs().max() > 1e-4  # row 0's CXR gate moved with its EHR
        model(with_changed(batch, [0], image=True))
        assert (gates[0][1][0] - before[0][1][0]).abs().max() > 1e-4  # row 0's EHR gate moved with its image
        assert torch.equal(gates[0][1][[1, 4, 5]], before[0][1][[1, 4, 5]])  # other stays' gates did not


def test_mmtm_without_gates_gives_other_logits():
    model, batch = tiny("mmtm"), make_batch(MIXED)
    with torch.no_grad():
        gated = model(batch).logits
        for layer in model.exchanges:
            layer.forward = lambda image, ehr: (torch.ones_like(image), torch.ones_like(ehr))
        ungated = model(batch).logits
    assert (gated - ungated).abs().amax(dim=1).min() > 1e-5  # every stay: paired and EHR-only


# ----------------------------------------------------------------------------------------- missing X-ray
@pytest.mark.parametrize("name, params", [("daft", {}), ("daft", {"modulate": "ehr"}), ("mmtm", {})],
                         ids=["daft", "daft_ehr", "mmtm"])
def test_unpaired_stays_read_the_learned_squeeze_never_their_image(name, params):
    model, batch = tiny(name, **params).train(), make_batch(MIXED)
    unpaired = batch.has_cxr == 0
    changed = copy.deepcopy(batch)
    changed.cxr[unpaired] = torch.randn(int(unpaired.sum()), 1, IMAGE, IMAGE) * 5
    torch.manual_seed(1)
    before = model(batch).logits
    torch.manual_seed(1)
    after = model(changed).logits
    assert torch.equal(after[unpaired], before[unpaired])
    if hasattr(model, "no_image_squeeze"):  # the stand-in squeeze moves EHR-only stays, not paired ones
        model.eval()
        with torch.no_grad():
            reference = model(batch).logits
            model.no_image_squeeze[0].add_(1.0)
            moved = model(batch).logits
        assert torch.equal(moved[~unpaired], reference[~unpaired])
        assert (moved[unpaired] - reference[unpaired]).abs().max() > 1e-5
