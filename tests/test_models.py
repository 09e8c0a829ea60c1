"""Tests for the model registry, the shared encoders and every registered model (tiny sizes)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from scipy.special import expit, rel_entr

from ehrcxr.models import Batch, create_model, get_model_class, list_models
from ehrcxr.models.drfuse import DrFuse, attention_rank_loss, logit_average_pool, masked_jsd
from ehrcxr.models.encoders import (CXRBackbone, EHRLSTMEncoder, EHRTransformerEncoder, build_cxr_backbone,
                                    frozen_cxr_prefix)

torch.set_num_threads(1)

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
MODEL_CONFIG = CONFIG["models"]
N_LABELS, FEATURES, STEPS, IMAGE = 3, 76, 6, 32
TINY_CXR = {"depth": 18, "weights": None, "frozen_stages": 2, "pretrained": None}
LENGTHS = [6, 3, 1, 6, 2, 4]


def make_batch(has_cxr: list[float], seed: int = 0) -> Batch:
    """A batch of len(has_cxr) stays with T=6, 76 features, 1x32x32 images (zero where missing)."""
    generator = torch.Generator().manual_seed(seed)
    size = len(has_cxr)
    has = torch.tensor(has_cxr, dtype=torch.float32)
    lengths = torch.tensor((LENGTHS * 2)[:size])
    ehr = torch.randn(size, STEPS, FEATURES, generator=generator)
    ehr[torch.arange(STEPS)[None, :] >= lengths[:, None]] = 0.0
    cxr = torch.randn(size, 1, IMAGE, IMAGE, generator=generator) * has[:, None, None, None]
    return Batch(ehr=ehr, ehr_mask=torch.zeros(size, STEPS, 17), ehr_length=lengths, cxr=cxr, has_cxr=has,
                 cxr_hours=torch.zeros(size), labels=torch.randint(0, 2, (size, N_LABELS), generator=generator).float(),
                 stay_id=torch.arange(size))


def architecture(name: str) -> str:
    """The registered model a config entry builds."""
    return MODEL_CONFIG[name].get("architecture", name)


def tiny_model(name: str, seed: int = 0):
    """The registered model with its config params, shrunk to hidden 16 (DDL-CXR given generated latents of
    shape 4x4x4 for stays 0-11)."""
    torch.manual_seed(seed)
    params = dict(MODEL_CONFIG[name]["params"], hidden=16)
    model = create_model(architecture(name), n_labels=N_LABELS, ehr_features=FEATURES, cxr=dict(TINY_CXR), **params)
    if hasattr(model, "set_generated"):
        model.set_generated(torch.arange(12), torch.randn(12, 4, 4, 4, generator=torch.Generator().manual_seed(7)))
    return model


def uses(name: str, modality: str) -> bool:
    return modality in MODEL_CONFIG[name]["modalities"]


def cxr_params(model):
    return [p for m in model.modules() if isinstance(m, CXRBackbone) for p in m.suffix.parameters()]


def ehr_params(model):
    return [p for n, m in model.named_children() if n.startswith("ehr") for p in m.parameters()]


def has_grad(parameters) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)


MIXED, NONE, ALL = [1, 0, 1, 1, 0, 0], [0] * 6, [1] * 6
FUSION_AND_CXR = [n for n in MODEL_CONFIG if uses(n, "cxr")]


# ----------------------------------------------------------------------------------------- registry
def test_registry_matches_config_and_unknown_name_lists_models():
    # every model shipped in ehrcxr.models has a config entry and vice versa (tests may register extra ones)
    shipped = {name for name in list_models() if get_model_class(name).__module__.startswith("ehrcxr.models.")}
    assert shipped == {architecture(name) for name in MODEL_CONFIG}
    with pytest.raises(KeyError, match="registered models: .*cxr_resnet, .*late_fusion"):
        create_model("no_such_model", n_labels=1, ehr_features=76, cxr=None)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIG))
def test_create_model_from_config_entry(name):
    cxr = {key: CONFIG["cxr"][key] for key in ("depth", "weights", "frozen_stages")} | {"pretrained": None}
    model = create_model(architecture(name), n_labels=25, ehr_features=76, cxr=cxr, **MODEL_CONFIG[name]["params"])
    assert model.registry_name == architecture(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


# ----------------------------------------------------------------------------------------- every model
@pytest.mark.parametrize("has_cxr", [MIXED, NONE, ALL], ids=["mixed", "none", "all"])
@pytest.mark.parametrize("name", sorted(MODEL_CONFIG))
def test_forward_backward(name, has_cxr):
    model = tiny_model(name).train()
    batch = make_batch(has_cxr)
    output = model(batch)
    assert output.logits.shape == (6, N_LABELS)
    assert torch.isfinite(output.logits).all()
    for key, value in output.aux_losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels)
    (loss + sum(output.aux_losses.values(), torch.zeros(()))).backward()
    if uses(name, "ehr"):
        assert has_grad(ehr_params(model))
    if uses(name, "cxr"):
        assert has_grad(cxr_params(model)) == (sum(has_cxr) > 0)
        frozen = [p for m in model.modules() if isinstance(m, CXRBackbone) for p in m.prefix.parameters()]
        assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", FUSION_AND_CXR)
def test_missing_image_pixels_do_not_matter(name, mode):
    model = tiny_model(name).train(mode == "train")
    batch = make_batch(MIXED)
    changed = make_batch(MIXED)
    missing = changed.has_cxr == 0
    changed.cxr[missing] = torch.randn(int(missing.sum()), 1, IMAGE, IMAGE) * 5
    torch.manual_seed(1)
    before = model(batch).logits
    torch.manual_seed(1)
    after = model(changed).logits
    torch.testing.assert_close(after[missing], before[missing], rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in sorted(MODEL_CONFIG) if uses(n, "ehr")])
def test_model_ignores_ehr_padding(name):
    model = tiny_model(name).eval()
    batch = make_batch(MIXED)
    changed = make_batch(MIXED)
    padding = torch.arange(STEPS)[None, :] >= changed.ehr_length[:, None]
    changed.ehr[padding] = 100.0
    torch.testing.assert_close(model(changed).logits, model(batch).logits, rtol=1e-5, atol=1e-5)


def test_cxr_resnet_unpaired_logits_are_the_prior():
    model = tiny_model("cxr_resnet").eval()
    with torch.no_grad():
        model.prior.copy_(torch.tensor([0.5, -1.0, 2.0]))
    logits = model(make_batch(MIXED)).logits
    for row in (1, 4, 5):
        assert logits[row].tolist() == [0.5, -1.0, 2.0]


# ----------------------------------------------------------------------------------------- EHR encoders
def test_lstm_encoder_last_valid_state_matches_unpadded_run():
    torch.manual_seed(0)
    encoder = EHRLSTMEncoder(FEATURES, 16, layers=2).eval()
    batch = make_batch(MIXED)
    last, sequence = encoder(batch.ehr, batch.ehr_length, return_sequence=True)
    assert last.shape == (6, 16) and sequence.shape == (6, STEPS, 16)
    for row, length in enumerate(batch.ehr_length.tolist()):
        _, (h_n, _) = encoder.lstm(batch.ehr[row:row + 1, :length])  # the stay alone, unpadded
        torch.testing.assert_close(last[row], h_n[-1, 0])
        torch.testing.assert_close(sequence[row, length - 1], h_n[-1, 0])
        assert sequence[row, length:].abs().sum() == 0
    weight_hh = encoder.lstm.weight_hh_l0.detach()  # orthogonal init: orthonormal columns
    torch.testing.assert_close(weight_hh.T @ weight_hh, torch.eye(16), atol=1e-5, rtol=0)


def test_bidirectional_lstm_and_transformer_ignore_padding():
    torch.manual_seed(0)
    lstm = EHRLSTMEncoder(FEATURES, 16, bidirectional=True).eval()
    transformer = EHRTransformerEncoder(FEATURES, 16, heads=4, dropout=0.2).eval()
    batch = make_batch(MIXED)
    noisy = batch.ehr.clone()
    noisy[torch.arange(STEPS)[None, :] >= batch.ehr_length[:, None]] = -50.0
    torch.testing.assert_close(lstm(noisy, batch.ehr_length), lstm(batch.ehr, batch.ehr_length))
    pooled, tokens = transformer(batch.ehr, batch.ehr_length)
    pooled_noisy, tokens_noisy = transformer(noisy, batch.ehr_length)
    torch.testing.assert_close(pooled_noisy, pooled)
    for row, length in enumerate(batch.ehr_length.tolist()):
        torch.testing.assert_close(tokens_noisy[row, :length], tokens[row, :length])
        torch.testing.assert_close(pooled[row], tokens[row, :length].mean(0))
    assert transformer.position.abs().max() <= 0.1


# ----------------------------------------------------------------------------------------- CXR backbone
def test_backbone_prefix_suffix_split_and_frozen_prefix():
    torch.manual_seed(0)
    backbone = CXRBackbone(depth=18, frozen_stages=2)
    assert backbone.out_dim == 512 and backbone.prefix_channels == 128
    backbone.train()
    assert not backbone.prefix.training and backbone.suffix.training
    assert all(not p.requires_grad for p in backbone.prefix.parameters())
    assert all(p.requires_grad for p in backbone.suffix.parameters())
    backbone.eval()
    image = torch.randn(2, 1, IMAGE, IMAGE)
    features = backbone.prefix(image)
    assert features.shape == (2, 128, 4, 4)
    torch.testing.assert_close(backbone(image), backbone.suffix(features))
    torch.testing.assert_close(backbone(features), backbone(image))
    # the same computation written out with torchvision's own ResNet forward (fc removed)
    resnet = torchvision.models.resnet18()
    resnet.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    resnet.fc = torch.nn.Identity()
    resnet.load_state_dict(backbone.backbone_state_dict())
    torch.testing.assert_close(backbone(image), resnet.eval()(image))
    assert CXRBackbone(depth=50, frozen_stages=1).prefix_channels == 256
    assert isinstance(CXRBackbone(depth=34, frozen_stages=0).prefix, torch.nn.Identity)


def test_backbone_branch_shares_prefix_only():
    backbone = CXRBackbone(depth=18, frozen_stages=3)
    other = backbone.branch()
    assert other.prefix is backbone.prefix
    assert other.suffix is not backbone.suffix
    assert all(a is not b for a, b in zip(other.suffix.parameters(), backbone.suffix.parameters()))
    model = DrFuse(N_LABELS, FEATURES, cxr=dict(TINY_CXR), hidden=16)
    assert frozen_cxr_prefix(model) is model.cxr_distinct_backbone.prefix is model.cxr_shared_backbone.prefix
    model.train()
    assert not model.cxr_shared_backbone.prefix.training
    assert frozen_cxr_prefix(DrFuse(N_LABELS, FEATURES, cxr={"frozen_stages": 0}, hidden=16)) is None
    assert frozen_cxr_prefix(tiny_model("ehr_lstm")) is None
    assert frozen_cxr_prefix(torch.nn.ModuleList([CXRBackbone(frozen_stages=1), CXRBackbone(frozen_stages=1)])) is None


def test_backbone_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    source = CXRBackbone(depth=18, frozen_stages=1)
    state = source.backbone_state_dict()
    expected = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(state) == expected
    torch.save(state, tmp_path / "cxr_encoder.pt")
    torch.manual_seed(1)
    target = build_cxr_backbone({"depth": 18, "frozen_stages": 3, "pretrained": str(tmp_path / "cxr_encoder.pt")})
    image = torch.randn(2, 1, IMAGE, IMAGE)
    torch.testing.assert_close(target.eval()(image), source.eval()(image))
    # a torchvision RGB state dict (with fc) loads with the grey conv1 = sum of the RGB filters
    rgb = torchvision.models.resnet18().state_dict()
    target.load_backbone_state_dict(rgb)
    torch.testing.assert_close(target.backbone_state_dict()["conv1.weight"][:, 0], rgb["conv1.weight"].sum(1))
    with pytest.raises(KeyError, match="ResNet-18"):
        target.load_backbone_state_dict(torchvision.models.resnet34().state_dict())
    with pytest.raises(ValueError, match="unknown cxr config keys"):
        build_cxr_backbone({"depht": 18})


# ----------------------------------------------------------------------------------------- DrFuse
def test_logit_average_pool_matches_definition_and_is_stable():
    h1 = torch.tensor([-3.0, -0.5, 0.0, 1.2, 4.0], dtype=torch.float64)
    h2 = torch.tensor([2.0, -1.5, 0.0, 1.2, -4.0], dtype=torch.float64)
    p = (expit(h1.numpy()) + expit(h2.numpy())) / 2
    np.testing.assert_allclose(logit_average_pool(h1, h2).numpy(), np.log(p / (1 - p)), rtol=1e-12)
    extreme = logit_average_pool(torch.tensor([100.0, 50.0, -80.0]), torch.tensor([-100.0, 50.0, -80.0]))
    # σ(100)+σ(−100) = 1 -> logit(1/2) = 0; equal inputs give the input back
    torch.testing.assert_close(extreme, torch.tensor([0.0, 50.0, -80.0]))


def test_masked_jsd_matches_hand_computation():
    h1 = torch.tensor([[0.0, 1.0], [2.0, -1.0], [9.0, -9.0]])
    h2 = torch.tensor([[0.0, -1.0], [0.5, 3.0], [-9.0, 9.0]])
    paired = torch.tensor([True, True, False])
    expected = []
    for row in range(2):
        p, q = expit(h1[row].double().numpy()), expit(h2[row].double().numpy())
        m = (p + q) / 2
        expected.append(0.5 * (rel_entr(p, m).sum() + rel_entr(q, m).sum()))
    assert masked_jsd(h1, h2, paired).item() == pytest.approx(np.mean(expected), rel=1e-5)
    # one coordinate by hand: p = 1/2, q = σ(0.5); the unpaired row is ignored entirely
    p, q = 0.5, 1 / (1 + math.exp(-0.5))
    m = (p + q) / 2
    hand = 0.5 * (p * math.log(p / m) + q * math.log(q / m))
    single = masked_jsd(torch.tensor([[0.0], [5.0]]), torch.tensor([[0.5], [-5.0]]), torch.tensor([True, False]))
    assert single.item() == pytest.approx(hand, rel=1e-5)
    assert masked_jsd(h1, h2, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_attention_rank_loss_divides_each_term_by_its_violated_entries():
    # (B=2, C=2, [EHR, shared, CXR]); row 1 is unpaired and violates everything, so it must be ignored
    attention = torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.3, 0.6]], [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]])
    loss_ehr = torch.tensor([[0.1, 0.9], [5.0, 5.0]])
    loss_shared = torch.tensor([[0.5, 0.2], [0.0, 0.0]])
    loss_cxr = torch.tensor([[0.3, 0.4], [0.0, 0.0]])
    paired = torch.tensor([True, False])
    # (CXR,EHR):    d0 CXR worse -> −1 -> max(0, 0.3−0.2) = 0.1; d1 better -> +1 -> max(0, 0.1−0.6) = 0 -> 0.1/1
    # (shared,EHR): d0 −1 -> max(0, 0.5−0.2) = 0.3;               d1 +1 -> max(0, 0.1−0.3) = 0 -> 0.3/1
    # (shared,CXR): d0 −1 -> max(0, 0.5−0.3) = 0.2;               d1 +1 -> max(0, 0.6−0.3) = 0.3 -> 0.5/2
    # mean of the three = (0.1 + 0.3 + 0.25) / 3 (a mean over all paired entries would give 0.15)
    value = attention_rank_loss(attention, loss_ehr, loss_shared, loss_cxr, paired)
    assert value.item() == pytest.approx(0.65 / 3, rel=1e-6)
    assert attention_rank_loss(attention, loss_ehr, loss_shared, loss_cxr, torch.tensor([False, False])).item() == 0.0
    satisfied = torch.tensor([[[0.1, 0.2, 0.7], [0.1, 0.7, 0.2]]])  # every pair ordered as its losses ask
    assert attention_rank_loss(satisfied, torch.tensor([[0.9, 0.9]]), torch.tensor([[0.5, 0.1]]),
                               torch.tensor([[0.1, 0.5]]), torch.tensor([True])).item() == 0.0


def test_drfuse_orthogonality_uses_the_projected_shared_feature():
    model = tiny_model("drfuse").eval()
    last = model.shared_projection[-1]
    with torch.no_grad():  # the projection now maps every shared feature to e_0
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0
    batch = make_batch(MIXED)
    out = model(batch)
    _, ehr_distinct = model.encode_ehr(batch)
    _, cxr_distinct = model.encode_cxr(batch)
    # |cos(e_0, d)| = |d_0| / ||d||: over all stays for the EHR, over the paired ones for the CXR
    ehr_expected = (ehr_distinct[:, 0].abs() / ehr_distinct.norm(dim=1)).mean()
    paired = batch.has_cxr > 0.5
    cxr_expected = (cxr_distinct[paired, 0].abs() / cxr_distinct[paired].norm(dim=1)).mean()
    lambdas = model.lambdas
    assert out.aux_losses["orth_ehr"].item() == pytest.approx(lambdas["orth_ehr"] * ehr_expected.item(), rel=1e-5)
    assert out.aux_losses["orth_cxr"].item() == pytest.approx(lambdas["orth_cxr"] * cxr_expected.item(), rel=1e-5)


def test_drfuse_unpaired_image_leaves_aux_losses_unchanged_and_no_pairs_gives_zero():
    model = tiny_model("drfuse").train()
    batch, changed = make_batch(MIXED), make_batch(MIXED)
    missing = changed.has_cxr == 0
    changed.cxr[missing] = torch.rand(int(missing.sum()), 1, IMAGE, IMAGE) * 3
    torch.manual_seed(2)
    before = model(batch)
    torch.manual_seed(2)
    after = model(changed)
    for key in before.aux_losses:
        assert after.aux_losses[key].item() == before.aux_losses[key].item(), key
    unpaired = model(make_batch(NONE)).aux_losses
    assert set(unpaired) == {"shared", "ehr", "cxr", "jsd", "orth_ehr", "orth_cxr", "attn_rank"}
    for key in ("cxr", "jsd", "orth_cxr", "attn_rank"):
        assert unpaired[key].item() == 0.0, key
    assert unpaired["shared"].item() > 0 and unpaired["ehr"].item() > 0


def test_drfuse_lambdas_scale_aux_losses_and_attention_masks_missing_cxr():
    base, scaled = tiny_model("drfuse").eval(), tiny_model("drfuse").eval()
    scaled.lambdas = {key: 0.5 for key in scaled.lambdas}
    batch = make_batch(MIXED)
    base_out, scaled_out = base(batch), scaled(batch)
    for key, value in base_out.aux_losses.items():
        assert scaled_out.aux_losses[key].item() == pytest.approx(0.5 * value.item(), rel=1e-6)
    tokens = torch.randn(6, 3, 16)
    _, attention = base.disease_attention(tokens, batch.has_cxr > 0.5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(6, N_LABELS))
    assert (attention[batch.has_cxr == 0][..., 2] == 0).all()
    assert (attention[batch.has_cxr == 1][..., 2] > 0).all()


def test_encode_paired_cxr_under_bf16_autocast_keeps_unpaired_rows_zero():
    # on CUDA the trainer runs the forward pass under bf16 autocast; with a trainable stage the backbone's output is
    # bf16, and the unpaired rows' zeros must take that dtype (CPU autocast reproduces it)
    from ehrcxr.models.encoders import encode_paired_cxr

    torch.manual_seed(0)
    backbone = build_cxr_backbone(dict(TINY_CXR)).train()
    batch = make_batch(MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = encode_paired_cxr(backbone, batch.cxr, batch.has_cxr)
    paired = batch.has_cxr > 0.5
    assert features.dtype == torch.bfloat16 and features.shape == (6, backbone.out_dim)
    assert bool((features[~paired] == 0).all()) and bool((features[paired] != 0).any())
