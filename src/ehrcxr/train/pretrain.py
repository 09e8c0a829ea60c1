"""Pretraining stages: the CXR encoder on the 14 CheXpert labels of train-split subjects' cached frontal images,
its pooled features of every cached image (computed once for all cells that keep it frozen), and a model's own
EHR encoder on its task's EHR alone (MedFuse's first stage)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ehrcxr.data.cxr import FRONTAL_VIEWS, load_cxr_cache
from ehrcxr.data.datasets import load_cell_data, standardise
from ehrcxr.models import Batch, ModelOutput, create_model
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.resources import CHEXPERT_LABELS
from ehrcxr.train.augment import augment_images
from ehrcxr.train.loop import (
    autocast, configure_device, fit, fit_options, macro_scores, pooled_cxr_features, resolve_device, seed_everything,
    training_key, write_atomic,
)

log = logging.getLogger("ehrcxr.pretrain")

# Pretraining's own augmentation (independent of cxr.augment, so a cell setting does not rerun pretraining):
# a horizontal flip with probability 0.5 and a shift of up to 10% of the side.
PRETRAIN_AUGMENT = {"hflip": 0.5, "degrees": 0.0, "translate": 0.1, "scale": (1.0, 1.0)}


def chexpert_image_labels(cxr_studies: pd.DataFrame, stays: pd.DataFrame, index: pd.DataFrame,
                          source: str = "cxr_studies") -> pd.DataFrame:
    """One row per usable cached frontal image: dicom_id, row, split (of its subject) and the 14 binary
    CheXpert targets (1 -> 1; 0, -1 and blank -> 0), sorted by dicom_id."""
    absent = sorted({"dicom_id", "subject_id", "view_position", *CHEXPERT_LABELS} - set(cxr_studies.columns))
    if absent:
        raise ValueError(f"{source}: missing column(s) {absent}")
    subject_split = stays[["subject_id", "split"]].drop_duplicates()
    if not subject_split["subject_id"].is_unique:
        bad = subject_split.loc[subject_split["subject_id"].duplicated(), "subject_id"].iloc[0]
        raise ValueError(f"stays: subject_id {bad} appears in more than one split")
    images = cxr_studies.loc[cxr_studies["view_position"].isin(FRONTAL_VIEWS),
                             ["dicom_id", "subject_id", *CHEXPERT_LABELS]].drop_duplicates("dicom_id")
    usable = index.loc[(index["status"] == "ok") & (index["row"] >= 0), ["dicom_id", "row"]]
    images = images.assign(dicom_id=images["dicom_id"].astype(str)).merge(
        usable.assign(dicom_id=usable["dicom_id"].astype(str)), on="dicom_id", how="inner")
    images = images.merge(subject_split, on="subject_id", how="inner")
    targets = (images[CHEXPERT_LABELS].apply(pd.to_numeric, errors="coerce") == 1).astype(np.float32)
    result = pd.concat([images[["dicom_id", "row", "split"]], targets], axis=1)
    return result.sort_values("dicom_id").reset_index(drop=True)


class _Classifier(nn.Module):
    def __init__(self, backbone: CXRBackbone, n_labels: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, n_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _batch(images: np.ndarray, rows: np.ndarray, device: torch.device, augment: dict | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The cached images of ``rows`` as standardised model input on ``device`` (augmented there when given)."""
    order = np.argsort(rows, kind="stable")
    pixels = np.empty((rows.size, *images.shape[1:]), dtype=np.uint8)
    pixels[order] = images[rows[order]]
    batch = torch.from_numpy(pixels).unsqueeze(1).to(device, non_blocking=device.type == "cuda").float() / 255.0
    if augment is not None:
        batch = augment_images(batch, augment, generator)
    batch = standardise(batch)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


def _validate(model: nn.Module, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, batch_size: int,
              device: torch.device) -> tuple[float, float]:
    """(mean BCE, macro AUROC over labels with both classes) on the validation images, in fp32."""
    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            logits.append(model(_batch(images, rows[start:start + batch_size], device)).float().cpu())
    if not logits:
        return float("nan"), float("nan")
    logits_all = torch.cat(logits)
    loss = float(F.binary_cross_entropy_with_logits(logits_all, torch.from_numpy(targets)))
    _, auroc = macro_scores(targets, torch.sigmoid(logits_all).numpy())
    return loss, auroc


def pretrain_cxr(cxr_studies_path: str | Path, stays_path: str | Path, cxr_images_path: str | Path,
                 cxr_index_path: str | Path, out_path: str | Path, history_path: str | Path, *, depth: int,
                 weights: str | None, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                 device: str = "auto", threads: int = 1) -> dict:
    """Train CXRBackbone(depth, weights, frozen_stages=0) + a 14-way linear head with BCE on the CheXpert
    labels of train-split subjects' images; keep the epoch with the best val macro AUROC and save its
    ``backbone_state_dict()`` to ``out_path``; per-epoch history to ``history_path``. Returns a summary."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive; got {epochs}, {batch_size}")
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    seed_everything(seed)
    images, index = load_cxr_cache(cxr_images_path, cxr_index_path)
    stays = pd.read_parquet(stays_path, columns=["subject_id", "split"])
    table = chexpert_image_labels(pd.read_parquet(cxr_studies_path), stays, index, source=str(cxr_studies_path))
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if train.empty:
        raise ValueError(f"{cxr_studies_path}: no usable frontal images of train-split subjects to pretrain on")
    train_rows, val_rows = train["row"].to_numpy(np.int64), val["row"].to_numpy(np.int64)
    train_targets = train[CHEXPERT_LABELS].to_numpy(np.float32)
    val_targets = val[CHEXPERT_LABELS].to_numpy(np.float32)
    log.info("CXR pretraining on %d train / %d val images (%s, ResNet-%d)", train_rows.size, val_rows.size,
             resolved, depth)

    model = _Classifier(CXRBackbone(depth=depth, weights=weights, frozen_stages=0), len(CHEXPERT_LABELS))
    model.to(resolved)
    if resolved.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator(device=resolved).manual_seed(seed)
    history, best_epoch, best_score, best_state = [], 0, -math.inf, None
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(train_rows.size, generator=generator).numpy()
        total_loss = 0.0
        for start in range(0, order.size, batch_size):
            chosen = order[start:start + batch_size]
            batch = _batch(images, train_rows[chosen], resolved, PRETRAIN_AUGMENT, augment_generator)
            targets = torch.from_numpy(train_targets[chosen]).to(resolved)
            with autocast(resolved):
                loss = F.binary_cross_entropy_with_logits(model(batch).float(), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total_loss += float(loss.detach()) * chosen.size
        val_loss, val_auroc = _validate(model, images, val_rows, val_targets, max(batch_size, 256), resolved)
        score = val_auroc if math.isfinite(val_auroc) else -math.inf
        if best_state is None or score > best_score:
            best_epoch, best_score, best_state = epoch, score, model.backbone.backbone_state_dict()
        history.append({"epoch": epoch, "train_loss": total_loss / order.size, "val_loss": val_loss,
                        "val_auroc": val_auroc, "seconds": time.perf_counter() - started})
        log.info("pretrain epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f (%.1f s)", epoch,
                 history[-1]["train_loss"], val_loss, val_auroc, history[-1]["seconds"])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(history_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.cpu() for key, value in best_state.items()}, out_path)
    pd.DataFrame(history, columns=["epoch", "train_loss", "val_loss", "val_auroc", "seconds"]).to_csv(
        history_path, index=False)
    return {"best_epoch": best_epoch, "best_val_auroc": best_score if math.isfinite(best_score) else float("nan"),
            "n_train": int(train_rows.size), "n_val": int(val_rows.size)}


def cxr_features(encoder_path: str | Path, cxr_images_path: str | Path, out_path: str | Path, *, depth: int,
                 device: str = "auto", threads: int = 1, batch_size: int = 256) -> int:
    """Write the pretrained ResNet-``depth`` encoder's globally pooled features of every cached image as an (N, C)
    float32 ``.npy`` (row i = cache row i): what a cell whose encoder is wholly frozen (frozen_stages 4) feeds its
    layers, so each image passes the encoder once per seed instead of once per cell. Returns N."""
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    started = time.perf_counter()
    backbone = CXRBackbone(depth=depth, weights=None, frozen_stages=4)
    backbone.load_pretrained(encoder_path)
    backbone.to(resolved)
    images = np.load(cxr_images_path, mmap_mode="r")
    features = pooled_cxr_features(backbone.prefix, images, resolved, batch_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save(path: Path) -> None:
        with open(path, "wb") as handle:  # a handle: np.save would append .npy to the temporary name
            np.save(handle, features)

    write_atomic(out_path, save)
    log.info("pooled features %s of %d cached images from %s in %.1f s", features.shape[1:], features.shape[0],
             encoder_path, time.perf_counter() - started)
    return int(features.shape[0])


class EHRPretrainClassifier(nn.Module):
    """A model's EHR encoder with a linear head on its (dropped-out) stay feature, trained on the EHR alone."""

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.out_dim, n_labels)

    def forward(self, batch: Batch) -> ModelOutput:
        features = self.encoder(batch.ehr, batch.ehr_length)
        if isinstance(features, tuple):  # a Transformer encoder also returns its tokens
            features = features[0]
        return ModelOutput(self.head(self.dropout(features)))


def pretrain_ehr(stays_path: str | Path, ehr_path: str | Path, out_path: str | Path, run_dir: str | Path, *,
                 task: str, model: str, params: dict, train: dict, seed: int, threads: int = 1) -> dict:
    """Pretrain ``model``'s ``ehr_encoder`` on the task's EHR alone and save its state dict to ``out_path``.

    The model is built as its cells build it (``create_model(model, ..., cxr=None, **params)``: the EHR encoder
    never depends on the CXR settings); its ``ehr_encoder`` plus a linear head (:class:`EHRPretrainClassifier`)
    is trained by :func:`ehrcxr.train.loop.fit` with the model's ``train`` settings (optimiser, scheduler,
    selection, ...) on every task stay of the train split, the epoch selected on the val split ('natural' cell
    without images). fit's model.pt,
    checkpoint.pt (a rerun resumes from it) and history.csv go to ``run_dir``. Returns a summary.
    """
    data = load_cell_data(stays_path, ehr_path, task, "natural", seed)
    seed_everything(seed)
    network = create_model(model, n_labels=len(data.labels), ehr_features=data.ehr_features, cxr=None, **params)
    encoder = getattr(network, "ehr_encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"model {model!r} has no ehr_encoder, so it cannot declare a pretrained 'ehr' part")
    classifier = EHRPretrainClassifier(encoder, len(data.labels), float(params.get("dropout", 0.0)))
    log.info("EHR pretraining of %s's ehr_encoder on %s: %d train / %d val stays", model, task,
             len(data.splits["train"]), len(data.splits["val"]))
    inputs = {"stays": stays_path, "ehr": ehr_path}
    result = fit(classifier, data, run_dir, **fit_options(train), seed=seed, threads=threads, log=log,
                 run_key=training_key(inputs, stage="pretrain_ehr", task=task, model=model, seed=seed,
                                      params=params, train=train))
    state = {key: value.detach().to("cpu", copy=True) for key, value in encoder.state_dict().items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, lambda path: torch.save(state, path))
    log.info("saved %s's EHR encoder (best epoch %d by %s) to %s", model, result.best_epoch,
             result.selection_metric, out_path)
    return {"best_epoch": result.best_epoch, "selection_metric": result.selection_metric,
            "n_train": len(data.splits["train"]), "n_val": len(data.splits["val"])}
