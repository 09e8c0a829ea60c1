"""How close DDL-CXR's generated latents come to the truth: on the test-split pairs, each generator samples x₁'s
latent from (z₀, EHR of [t₀, t₁]) and is scored against the true latent of x₁ — in latent space, in the feature space
of the pretrained CXR encoder (both latents decoded) and by the CheXpert labels of x₁ read from the generated latent
by the autoencoder's label head — overall and by the time between the two X-rays. Differences to "copy x0" are paired
over shared resamples of the pairs. On synthetic data a figure shows decoded examples (never on real patients)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from ehrcxr.analysis.core import bootstrap_p_value
from ehrcxr.analysis.publish import format_ci, format_p, pyplot, save_figure, write_table
from ehrcxr.data.datasets import normalise_images, usable_cache_rows
from ehrcxr.ddl.autoencoder import LabelledAutoencoder, load_autoencoder
from ehrcxr.ddl.diffusion import PairTensors, load_diffusion, pair_tensors, read_tensor
from ehrcxr.ddl.generation import ddim_generate
from ehrcxr.evaluate.bootstrap import resample_counts, summarise_resamples, weighted_auroc
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.train.loop import configure_device, resolve_device, seed_everything

log = logging.getLogger("ehrcxr.ddl")

METRICS = {"latent_mse": "latent MSE to x₁ (lower is better)",
           "feature_distance": "cosine distance to x₁ in CXR-encoder features (lower is better)",
           "chexpert_auroc": "macro AUROC of x₁'s CheXpert labels from the latent (higher is better)"}
QUALITY_COLUMNS = ["generator", "gap", "metric", "estimate", "ci_low", "ci_high", "versus_copy_x0", "diff_ci_low",
                   "diff_ci_high", "p_value", "n_pairs"]
GAP_EDGES = (12.0, 24.0, 36.0, np.inf)  # hours between x0 and x1 (pairs are > 12 h apart)
COPY = "copy_x0"


def _features(autoencoder: LabelledAutoencoder, encoder: CXRBackbone, latents: np.ndarray, image_size: int,
              device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Pooled CXR-encoder features (N, D) of the decoded latents, resized to the encoder's cache size."""
    out = []
    with torch.no_grad():
        for start in range(0, latents.shape[0], batch_size):
            images = autoencoder.decode(torch.from_numpy(latents[start:start + batch_size]).to(device))
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
            out.append(encoder(images).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.out_dim), dtype=np.float32)


def _per_pair(autoencoder, encoder, generated: np.ndarray, truth: np.ndarray, truth_features: np.ndarray,
              image_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Per-pair latent MSE and feature cosine distance, and the label head's probabilities (N, 14)."""
    features = _features(autoencoder, encoder, generated, image_size, device)
    cosine = (features * truth_features).sum(1) / (np.linalg.norm(features, axis=1) *
                                                   np.linalg.norm(truth_features, axis=1) + 1e-12)
    with torch.no_grad():
        logits = autoencoder.label_head(torch.from_numpy(generated).to(device).flatten(1)).float().cpu()
    return {"latent_mse": ((generated - truth) ** 2).reshape(len(generated), -1).mean(1),
            "feature_distance": 1.0 - cosine, "probabilities": torch.sigmoid(logits).numpy()}


def _resampled(values: dict[str, np.ndarray], labels: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric under row 0 (all pairs) and each resample row of ``counts`` (B, N): (1 + B,) each. The macro
    AUROC leaves out, per row, the labels with a single class in that resample (as ``macro_scores``)."""
    weights = np.vstack([np.ones((1, counts.shape[1]), dtype=counts.dtype), counts])
    out = {metric: weights @ values[metric] / weights.sum(1) for metric in ("latent_mse", "feature_distance")}
    per_label = np.column_stack([weighted_auroc(labels[:, j], values["probabilities"][:, j], weights)
                                 for j in range(labels.shape[1])])
    defined = np.isfinite(per_label)
    with np.errstate(invalid="ignore"):
        out["chexpert_auroc"] = np.where(defined, per_label, 0.0).sum(1) / defined.sum(1)
    return out


def quality_table(per_generator: dict[str, dict[str, np.ndarray]], labels: np.ndarray, gaps: np.ndarray, *,
                  n_boot: int, ci: float, seed: int) -> pd.DataFrame:
    """Rows of :data:`QUALITY_COLUMNS` per generator, gap stratum ('all' first) and metric; differences to copy x0
    are paired on the same resampled pairs."""
    rows = []
    strata = [("all", np.ones(gaps.size, dtype=bool))] + [
        (f"[{low:g}, {high:g}) h" if np.isfinite(high) else f">= {low:g} h", (gaps >= low) & (gaps < high))
        for low, high in zip(GAP_EDGES[:-1], GAP_EDGES[1:])]
    for s, (name, members) in enumerate(strata):
        if members.sum() < 2:
            continue
        counts = resample_counts(int(members.sum()), n_boot, np.random.default_rng([seed, s]))
        resampled = {generator: _resampled({k: v[members] for k, v in values.items()}, labels[members], counts)
                     for generator, values in per_generator.items()}
        for generator, by_metric in resampled.items():
            for metric, values in by_metric.items():
                estimate, low, high = summarise_resamples(values, ci)
                difference = values - resampled[COPY][metric] if COPY in resampled else np.full_like(values, np.nan)
                diff, diff_low, diff_high = summarise_resamples(difference, ci)
                rows.append(dict(generator=generator, gap=name, metric=metric, estimate=estimate, ci_low=low,
                                 ci_high=high, versus_copy_x0=diff, diff_ci_low=diff_low, diff_ci_high=diff_high,
                                 p_value=float(bootstrap_p_value(difference)) if generator != COPY else np.nan,
                                 n_pairs=int(members.sum())))
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def examples_figure(autoencoder: LabelledAutoencoder, images: np.ndarray, x0_rows: np.ndarray, x1_rows: np.ndarray,
                    generated: dict[str, np.ndarray], gaps: np.ndarray, device: torch.device):
    """x0 (real), each generator's decoded latent and x1 (real) for the given test pairs (synthetic data only)."""
    plt = pyplot()
    names = list(generated)
    columns = ["x0 (real)", *[f"{name} (decoded)" for name in names], "x1 (real)"]
    figure, axes = plt.subplots(len(x0_rows), len(columns), figsize=(1.8 * len(columns), 1.9 * len(x0_rows)),
                                squeeze=False)
    with torch.no_grad():
        decoded = {name: autoencoder.decode(torch.from_numpy(latents).to(device)).float().cpu().numpy()[:, 0]
                   for name, latents in generated.items()}
    for i in range(len(x0_rows)):
        panels = [images[x0_rows[i]] / 255.0, *[decoded[name][i] * 0.25 + 0.5 for name in names],
                  images[x1_rows[i]] / 255.0]
        for j, (axis, panel) in enumerate(zip(axes[i], panels)):
            axis.imshow(np.clip(panel, 0, 1), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([]), axis.set_yticks([])
            if i == 0:
                axis.set_title(columns[j], fontsize=8)
        axes[i][0].set_ylabel(f"{gaps[i]:.0f} h apart", fontsize=8)
    figure.suptitle("Synthetic test pairs: the X-ray x1 generated from x0 and the EHR in between", fontsize=9)
    figure.tight_layout()
    return figure


def _display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "generator": table["generator"], "gap": table["gap"], "n": table["n_pairs"], "metric": table["metric"],
        "estimate [CI]": [format_ci(r.estimate, r.ci_low, r.ci_high, 4) for r in table.itertuples()],
        "vs copy x0 [CI]": ["" if r.generator == COPY else format_ci(r.versus_copy_x0, r.diff_ci_low, r.diff_ci_high, 4)
                            for r in table.itertuples()],
        "p": table["p_value"].map(format_p)})


def run_quality(pairs_path, latents_path, index_path, images_path, ehr_path, autoencoder_path, cxr_encoder_path,
                diffusion_paths: dict[str, str | None], table_stem, figure_stem, *, depth: int, generation: dict,
                n_boot: int, ci: float, seed: int, examples: int = 0, device: str = "auto", threads: int = 1
                ) -> pd.DataFrame:
    """Score each generator (name -> its diffusion model, None for copy x0) on the test pairs; write the table and,
    with ``examples`` > 0 (synthetic data only), the figure of that many decoded test pairs."""
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    seed_everything(seed)
    latents = np.load(latents_path, mmap_mode="r")
    ehr, lengths, stay_row = read_tensor(ehr_path)
    rows = usable_cache_rows(pd.read_parquet(index_path, columns=["dicom_id", "row", "status"]), index_path)
    pairs = pd.read_parquet(pairs_path)
    test = pairs[(pairs["split"] == "test") & pairs["x0_dicom_id"].astype(str).isin(rows.index)
                 & pairs["x1_dicom_id"].astype(str).isin(rows.index) & pairs["stay_id"].isin(stay_row.index)]
    data: PairTensors = pair_tensors(test, np.asarray(latents), rows, ehr, stay_row, lengths)
    if len(data) == 0:
        raise ValueError(f"{pairs_path}: no test-split pair with both X-rays cached to score the generators on")
    autoencoder = load_autoencoder(autoencoder_path, resolved)
    encoder = CXRBackbone(depth=depth, weights=None, frozen_stages=4)
    encoder.load_pretrained(cxr_encoder_path)
    encoder.to(resolved).eval()
    images = np.load(images_path, mmap_mode="r")
    truth = data.z1.numpy()
    truth_features = _features(autoencoder, encoder, truth, int(images.shape[1]), resolved)
    generated = {}
    for name, path in diffusion_paths.items():
        if path is None:
            generated[name] = data.z0.numpy()
        else:
            generated[name] = ddim_generate(load_diffusion(path, resolved), data.z0, data.ehr, data.lengths,
                                            steps=int(generation["steps"]), eta=float(generation["eta"]), seed=seed,
                                            batch_size=int(generation["batch_size"]), device=resolved)
    per_generator = {name: _per_pair(autoencoder, encoder, values, truth, truth_features, int(images.shape[1]),
                                     resolved) for name, values in generated.items()}
    gaps = test["gap_hours"].to_numpy(np.float64)
    table = quality_table(per_generator, data.labels.numpy(), gaps, n_boot=n_boot, ci=ci, seed=seed)
    notes = [f"{len(data)} test-split pairs (x0, x1) of AP X-rays > 12 h apart; each generator samples x1's latent from "
             f"z0 and the EHR of [t0, t1] (DDIM, {generation['steps']} steps, eta {generation['eta']:g}, one fixed "
             "noise); copy_x0 is z0 itself.",
             *[f"{metric}: {text}." for metric, text in METRICS.items()],
             f"{ci:.0%} percentile CIs over {n_boot} resamples of the pairs; 'vs copy x0' is paired on the same "
             "resamples, with a two-sided bootstrap p-value."]
    write_table(table, table_stem, title="DDL-CXR generation quality on the test pairs", display=_display(table),
                notes=notes)
    if examples > 0 and figure_stem is not None:
        chosen = np.argsort(-gaps, kind="stable")[:examples]
        x0_rows = rows.reindex(test["x0_dicom_id"].astype(str)).to_numpy()[chosen]
        x1_rows = rows.reindex(test["x1_dicom_id"].astype(str)).to_numpy()[chosen]
        save_figure(examples_figure(autoencoder, images, x0_rows, x1_rows,
                                    {name: values[chosen] for name, values in generated.items()}, gaps[chosen],
                                    resolved), figure_stem)
    log.info("generation quality of %s on %d test pairs:\n%s", ", ".join(generated), len(data),
             _display(table[table["gap"] == "all"]).to_string(index=False))
    return table
