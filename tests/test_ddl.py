"""DDL-CXR: the autoencoder's adaptive label weight, the diffusion model's conditioning, contrastive term and
schedules, DDIM generation, the EHR windows, and the prediction model's use of the generated latent (tiny sizes)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ehrcxr.ddl.autoencoder import LabelledAutoencoder, adaptive_label_weight, autoencoder_losses
from ehrcxr.ddl.diffusion import ConditionalLatentDiffusion, context_windows, contrastive_term, diffusion_losses
from ehrcxr.ddl.generation import ddim_generate, ddim_scheduler, prediction_inputs
from ehrcxr.models import Batch, create_model

torch.set_num_threads(1)

LATENT = (4, 4, 4)
FEATURES = 6
TINY_DIFFUSION = dict(unet_channels=[16, 16], layers_per_block=1, head_channels=8, norm_num_groups=8, hidden=16,
                      heads=2, ehr_layers=1, dropout=0.0, timesteps=1000, beta_start=0.0015, beta_end=0.0195)


def tiny_diffusion(seed: int = 0, **variant) -> ConditionalLatentDiffusion:
    torch.manual_seed(seed)
    return ConditionalLatentDiffusion(LATENT, FEATURES, **TINY_DIFFUSION, **variant).eval()


def inputs(seed: int = 0, size: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, *LATENT, generator=generator), torch.randn(size, *LATENT, generator=generator),
            torch.randn(size, 5, FEATURES, generator=generator), torch.tensor([5, 3, 1][:size]))


# ----------------------------------------------------------------------------------------- autoencoder
def test_adaptive_label_weight_is_the_ratio_of_gradient_norms_clamped():
    layer = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (torch.tensor([3.0, 4.0]) * layer).sum()  # gradient (3, 4): norm 5
    label = (torch.tensor([0.6, 0.8]) * layer).sum()  # gradient (0.6, 0.8): norm 1
    assert adaptive_label_weight(nll, label, layer).item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert adaptive_label_weight(nll, label, layer, max_weight=2.0).item() == 2.0
    assert not adaptive_label_weight(nll, label, layer).requires_grad


def test_autoencoder_latent_shape_and_losses_of_the_original():
    torch.manual_seed(0)
    model = LabelledAutoencoder(image_size=16, block_out_channels=[8, 8, 8], norm_num_groups=4)
    assert model.latent_shape == (4, 4, 4) and model.label_head.in_features == 64
    pixels = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    images = model.prepare(pixels)  # resized to 16 px and standardised ((x - 0.5) / 0.25)
    assert images.shape == (2, 1, 16, 16) and images.min() >= -2.0 - 1e-6 and images.max() <= 2.0 + 1e-6
    targets = torch.tensor([[1.0] * 14, [0.0] * 14])
    losses = autoencoder_losses(model, images, targets, kl_weight=1e-6, max_label_weight=1e4,
                                generator=torch.Generator().manual_seed(0))
    # with logvar 0 the nll is the L1 error summed per image, averaged over the batch
    assert losses["nll"].item() == pytest.approx(losses["rec_loss"].item() * 16 * 16, rel=1e-5)
    expected = losses["nll"] + 1e-6 * losses["kl"] + losses["label_weight"] * losses["label_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["label_weight"].item() > 0


# ----------------------------------------------------------------------------------------- diffusion
def test_training_schedule_is_ldm_linear_in_sqrt_beta():
    model = tiny_diffusion()
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000) ** 2
    np.testing.assert_allclose(model.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    z, noise, t = torch.ones(2, *LATENT), torch.full((2, *LATENT), 2.0), torch.tensor([0, 999])
    alpha = np.cumprod(1 - betas)[[0, 999]]
    expected = np.sqrt(alpha) * 1.0 + np.sqrt(1 - alpha) * 2.0
    np.testing.assert_allclose(model.add_noise(z, noise, t)[:, 0, 0, 0].numpy(), expected, rtol=1e-5)


def test_ddim_steps_are_ldm_uniform_discretisation():
    scheduler = ddim_scheduler(tiny_diffusion(), steps=10)
    assert scheduler.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_denoiser_reads_z0_and_ehr_only_when_conditioned():
    z0, z1, ehr, lengths = inputs()
    t = torch.tensor([10, 500, 900])
    other_z0, other_ehr = z0 + 1.0, ehr + 1.0
    for variant in ({}, {"condition_x0": False}, {"condition_ehr": False}):
        model = tiny_diffusion(**variant)
        with torch.no_grad():
            def eps(z0_, ehr_):
                tokens, keep, _ = model.context(ehr_, lengths)
                return model.denoise(z1, z0_, t, tokens, keep)

            base = eps(z0, ehr)
            x0_changes = not torch.allclose(eps(other_z0, ehr), base)
            ehr_changes = not torch.allclose(eps(z0, other_ehr), base)
        assert x0_changes == variant.get("condition_x0", True)
        assert ehr_changes == variant.get("condition_ehr", True)


def test_ehr_context_ignores_padding_hours():
    model = tiny_diffusion()
    _, _, ehr, lengths = inputs()
    changed = ehr.clone()
    changed[1, 3:] = 50.0  # stay 1 has 3 valid hours
    with torch.no_grad():
        tokens, keep, cls = model.context(ehr, lengths)
        tokens2, _, cls2 = model.context(changed, lengths)
    assert keep[1].tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(cls2, cls)
    torch.testing.assert_close(tokens2[1, :3], tokens[1, :3])


def test_contrastive_term_by_hand_and_zero_beyond_the_margin():
    noise = torch.zeros(2, 1, 1, 2)
    eps_true = torch.full((2, 1, 1, 2), 0.5)  # squared error 0.25
    eps_corrupt = torch.zeros(2, 1, 1, 2)  # squared error 0: the corrupted context scores better
    weights = torch.tensor([0.5, 1.0])
    # relu(0.25 - 0 + 0.2) = 0.45 per element; mean over elements, times w, mean over the batch
    assert contrastive_term(noise, eps_true, eps_corrupt, 0.2, weights).item() == pytest.approx((0.225 + 0.45) / 2)
    worse = torch.full((2, 1, 1, 2), 0.7)  # 0.49 - 0.25 = 0.24 > margin 0.2 everywhere
    assert contrastive_term(noise, eps_true, worse, 0.2, weights).item() == 0.0
    barely = torch.full((2, 1, 1, 2), 0.6)  # 0.36 - 0.25 = 0.11 < 0.2: relu(0.25 - 0.36 + 0.2) = 0.09
    assert contrastive_term(noise, eps_true, barely, 0.2, weights).item() == pytest.approx((0.045 + 0.09) / 2)


def test_diffusion_loss_terms_follow_weights_ramp_and_variant():
    z0, z1, ehr, lengths = inputs()
    labels = torch.zeros(3, 14)

    def losses(model, **options):
        settings = dict(aux_weight=1.4, contrastive_weight=1.0, margin=0.2, ramp=0.5) | options
        return diffusion_losses(model, z0, z1, ehr, lengths, labels, generator=torch.Generator().manual_seed(3),
                                **settings)

    model = tiny_diffusion()
    full = losses(model)
    assert full["aux_loss"] > 0 and full["contrastive_loss"] > 0
    expected = full["simple_loss"] + 1.4 * full["aux_loss"] + 0.5 * full["contrastive_loss"]
    assert full["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses(model, ramp=0.0)["contrastive_loss"].item() == 0.0  # the ramp starts at epoch 0
    no_aux = losses(model, aux_weight=0.0)
    assert no_aux["aux_loss"].item() == 0.0
    assert no_aux["simple_loss"].item() == pytest.approx(full["simple_loss"].item())
    blind = losses(tiny_diffusion(condition_ehr=False))
    assert blind["aux_loss"].item() == 0.0 and blind["contrastive_loss"].item() == 0.0


# ----------------------------------------------------------------------------------------- windows, generation
def test_context_windows_by_hand():
    ehr = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)  # stay 0: 0..5, stay 1: 6..11
    windows, lengths = context_windows(ehr, np.array([0, 1, 1]), np.array([1, 4, 6]), np.array([4, 6, 6]))
    assert lengths.tolist() == [3, 2, 1]  # an empty window keeps the hour before its end
    assert windows[..., 0].tolist() == [[1, 2, 3], [10, 11, 0], [11, 0, 0]]


def test_prediction_inputs_use_the_grid_xray_and_its_age():
    stays = pd.DataFrame({"stay_id": [10, 11, 12, 13], "cxr_dicom_id": ["a", None, "c", "d"],
                          "cxr_hours": [40.0, np.nan, 2.0, 5.0]})
    index = pd.DataFrame({"dicom_id": ["a", "c", "d"], "row": [0, 1, -1], "status": ["ok", "ok", "corrupt"]})
    stay_row = pd.Series([0, 1, 2], index=[12, 10, 11])
    table = prediction_inputs(stays, index, stay_row, ehr_length=np.array([30, 48, 48]))
    # stay 11 has no X-ray, 13's is unusable; stay 12's EHR ends at hour 30, so its X-ray is 28 h old there
    assert table["stay_id"].tolist() == [10, 12]
    assert table["latent_row"].tolist() == [0, 1] and table["tensor_row"].tolist() == [1, 0]
    assert table["x0_age_hours"].tolist() == [8.0, 28.0] and table["end_hour"].tolist() == [48.0, 30.0]


def test_latent_scale_runs_the_diffusion_on_scaled_latents_and_generation_undoes_it():
    z0, z1, ehr, lengths = inputs(size=3)
    scaled, plain = tiny_diffusion(latent_scale=0.5), tiny_diffusion()
    assert scaled.config["latent_scale"] == 0.5
    options = dict(aux_weight=1.0, contrastive_weight=1.0, margin=0.2, ramp=0.5)
    with torch.no_grad():
        losses = diffusion_losses(scaled, z0, z1, ehr, lengths, torch.zeros(3, 14),
                                  generator=torch.Generator().manual_seed(3), **options)
        reference = diffusion_losses(plain, 0.5 * z0, 0.5 * z1, ehr, lengths, torch.zeros(3, 14),
                                     generator=torch.Generator().manual_seed(3), **options)
    for key in losses:
        torch.testing.assert_close(losses[key], reference[key])
    sample = dict(steps=3, eta=1.0, seed=2, batch_size=3, device=torch.device("cpu"))
    generated = ddim_generate(scaled, z0, ehr, lengths, **sample)
    np.testing.assert_allclose(generated, ddim_generate(plain, 0.5 * z0, ehr, lengths, **sample) / 0.5,
                               rtol=1e-5, atol=1e-5)


def test_ddim_clips_the_predicted_latent_to_the_models_clip_range():
    z0, _, ehr, lengths = inputs(size=3)
    plain, clipped = tiny_diffusion(), tiny_diffusion(clip_range=0.05)
    assert not ddim_scheduler(plain, 4).config.clip_sample
    assert ddim_scheduler(clipped, 4).config.clip_sample and ddim_scheduler(clipped, 4).config.clip_sample_range == 0.05
    # eta 0 and one step from t = 1: z = sqrt(abar_0) * clip(x0_hat) + sqrt(1 - abar_0) * eps_hat, so the clipped
    # sample stays within sqrt(abar_0) * 0.05 + sqrt(1 - abar_0) * max |eps_hat| of 0, the unclipped one does not
    sample = dict(steps=1, eta=0.0, seed=2, batch_size=3, device=torch.device("cpu"))
    abar0 = float(clipped.alphas_cumprod[0])
    with torch.no_grad():
        tokens, keep, _ = clipped.context(ehr, lengths)
        x_t = torch.randn(LATENT, generator=torch.Generator().manual_seed(2)).expand(3, *LATENT)
        eps = clipped.denoise(x_t, z0, torch.ones(3, dtype=torch.long), tokens, keep)
    bound = abar0 ** 0.5 * 0.05 + (1 - abar0) ** 0.5 * float(eps.abs().max()) + 1e-6
    assert np.abs(ddim_generate(clipped, z0, ehr, lengths, **sample)).max() <= bound
    assert np.abs(ddim_generate(plain, z0, ehr, lengths, **sample)).max() > bound


def test_ddim_generation_is_reproducible_and_depends_on_the_seed():
    model = tiny_diffusion()
    z0, _, ehr, lengths = inputs(size=3)
    options = dict(steps=4, eta=1.0, batch_size=2, device=torch.device("cpu"))
    first = ddim_generate(model, z0, ehr, lengths, seed=5, **options)
    again = ddim_generate(model, z0, ehr, lengths, seed=5, **options)
    other = ddim_generate(model, z0, ehr, lengths, seed=6, **options)
    assert first.shape == (3, *LATENT) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    deterministic = dict(options, eta=0.0)  # eta 0: every sample starts from the one fixed x_T
    same_inputs = ddim_generate(model, z0[[0, 0]], ehr[[0, 0]], lengths[[0, 0]], seed=5, **deterministic)
    np.testing.assert_allclose(same_inputs[0], same_inputs[1], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- prediction model
def ddl_batch(has_cxr: list[float], seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    size = len(has_cxr)
    has = torch.tensor(has_cxr)
    return Batch(ehr=torch.randn(size, 5, 76, generator=generator), ehr_mask=torch.zeros(size, 5, 17),
                 ehr_length=torch.tensor([5, 3, 2, 4][:size]),
                 cxr=torch.randn(size, 1, 32, 32, generator=generator) * has[:, None, None, None], has_cxr=has,
                 cxr_hours=torch.zeros(size), labels=torch.zeros(size, 2), stay_id=torch.tensor([7, 3, 9, 5][:size]))


def ddl_model(latents: torch.Tensor):
    torch.manual_seed(0)
    model = create_model("ddl_cxr", n_labels=2, ehr_features=76, hidden=16, heads=2, dropout=0.0, patch=2,
                         cxr={"depth": 18, "weights": None, "frozen_stages": 4})
    model.set_generated(torch.tensor([3, 5, 7, 9]), latents)
    return model.eval()


def test_ddl_cxr_reads_the_generated_latent_of_each_paired_stay_by_stay_id():
    latents = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(1))
    batch = ddl_batch([1.0, 1.0, 0.0, 1.0])  # stays 7, 3, 9 (no X-ray), 5
    with torch.no_grad():
        base = ddl_model(latents)(batch).logits
        changed = latents.clone()
        changed[3] += 3.0  # stay 9's latent: it has no X-ray in this batch
        changed[0] += 3.0  # stay 3's latent
        after = ddl_model(changed)(batch).logits
    assert not torch.allclose(after[1], base[1])  # stay 3 reads its own generated latent
    torch.testing.assert_close(after[[0, 2, 3]], base[[0, 2, 3]])  # nobody else's, and not stay 9 (withheld)


def test_ddl_cxr_without_an_xray_uses_the_no_xray_token_and_needs_every_paired_latent():
    model = ddl_model(torch.randn(4, *LATENT))
    batch = ddl_batch([0.0, 0.0])
    with torch.no_grad():
        base = model(batch).logits
        model.no_xray.add_(1.0)
        assert not torch.allclose(model(batch).logits, base)
    missing = ddl_batch([1.0])
    missing.stay_id = torch.tensor([8])
    with pytest.raises(ValueError, match="stay_id 8 has an X-ray but no generated latent"):
        model(missing)


def test_quality_table_means_paired_differences_and_gap_strata():
    from ehrcxr.ddl.quality import quality_table
    from ehrcxr.evaluate.bootstrap import resample_counts

    rng = np.random.default_rng(0)
    n = 40
    labels = (rng.random((n, 3)) < 0.5).astype(np.float32)
    gaps = np.r_[np.full(20, 15.0), np.full(20, 40.0)]  # strata [12, 24) h and >= 36 h
    copy = {"latent_mse": rng.random(n), "feature_distance": rng.random(n), "probabilities": rng.random((n, 3))}
    full = {"latent_mse": copy["latent_mse"] - 0.1, "feature_distance": copy["feature_distance"],
            "probabilities": labels * 0.9 + 0.05}  # ranks the labels perfectly
    table = quality_table({"full": full, "copy_x0": copy}, labels, gaps, n_boot=50, ci=0.9, seed=4)
    rows = table.set_index(["generator", "gap", "metric"])
    assert sorted(set(table["gap"])) == [">= 36 h", "[12, 24) h", "all"]  # the empty [24, 36) stratum has no rows
    assert rows.loc[("copy_x0", "all", "latent_mse"), "estimate"] == pytest.approx(copy["latent_mse"].mean())
    mse = rows.loc[("full", "all", "latent_mse")]
    # a constant per-pair improvement of 0.1: the paired difference is -0.1 under every resample
    assert (mse["versus_copy_x0"], mse["diff_ci_low"], mse["diff_ci_high"]) == pytest.approx((-0.1, -0.1, -0.1))
    assert mse["p_value"] < 0.05 and np.isnan(rows.loc[("copy_x0", "all", "latent_mse"), "p_value"])
    assert rows.loc[("full", "all", "chexpert_auroc"), "estimate"] == pytest.approx(1.0)
    old = rows.loc[("copy_x0", ">= 36 h", "feature_distance")]
    assert old["estimate"] == pytest.approx(copy["feature_distance"][20:].mean()) and old["n_pairs"] == 20
    # the CI of a mean: percentiles of the resampled means, resamples drawn as resample_counts with seed [seed, 0]
    counts = resample_counts(n, 50, np.random.default_rng([4, 0]))
    means = counts @ copy["latent_mse"] / counts.sum(1)
    low, high = rows.loc[("copy_x0", "all", "latent_mse"), ["ci_low", "ci_high"]]
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [5, 95])))


def test_resampled_chexpert_auroc_equals_sklearn_on_each_expanded_resample():
    from sklearn.metrics import roc_auc_score

    from ehrcxr.ddl.quality import _resampled
    from ehrcxr.evaluate.bootstrap import resample_counts

    rng = np.random.default_rng(1)
    n = 12
    labels = (rng.random((n, 3)) < 0.5).astype(np.float32)
    labels[:, 2] = 0.0
    labels[0, 2] = 1.0  # label 2 has a single positive: single-class (left out) in resamples that miss row 0
    values = {"latent_mse": rng.random(n), "feature_distance": rng.random(n), "probabilities": rng.random((n, 3))}
    counts = resample_counts(n, 30, np.random.default_rng(2))
    aurocs = _resampled(values, labels, counts)["chexpert_auroc"]
    for b, row in enumerate(np.vstack([np.ones((1, n), dtype=counts.dtype), counts])):
        index = np.repeat(np.arange(n), row)
        per_label = [roc_auc_score(labels[index, j], values["probabilities"][index, j]) for j in range(3)
                     if 0 < labels[index, j].sum() < index.size]
        assert aurocs[b] == pytest.approx(np.mean(per_label) if per_label else np.nan, nan_ok=True)
