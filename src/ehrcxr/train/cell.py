"""One benchmark cell: (task, model, missing, seed) -> trained model, test predictions and metrics."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ehrcxr.data.datasets import EVAL_SETS, load_cell_data
from ehrcxr.models import create_model
from ehrcxr.train.loop import (
    fit, fit_options, macro_scores, predict, resolve_device, seed_everything, training_key, write_atomic,
)

log = logging.getLogger("ehrcxr.train")

TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "patience")
# predictions.parquet holds the val stays (thresholds and model choice of the analyses) and both test sets, each
# scored as trained (p_<label>) and with one modality withheld (p_nocxr_<label>, p_noehr_<label>)
PREDICTED_SETS = ("val", *EVAL_SETS)
WITHHELD = ("cxr", "ehr")


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def run_key(inputs: dict, task: str, model: str, missing: str, seed: int, settings: dict) -> str:
    """The cell's training key (:func:`ehrcxr.train.loop.training_key`): its settings and input files."""
    return training_key(inputs, task=task, model=model, missing=missing, seed=seed, settings=settings)


def load_pretrained_ehr(network, path: str | Path, model: str) -> None:
    """Load an EHR encoder state dict (from the pretrain_ehr stage) into ``network.ehr_encoder``."""
    encoder = getattr(network, "ehr_encoder", None)
    if encoder is None:
        raise ValueError(f"model {model!r} declares a pretrained 'ehr' part but has no ehr_encoder attribute")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the EHR encoder of {model!r} (pretrained with other params?): "
                         f"{error}") from error


def run_cell(inputs: dict, out_dir: str | Path, task: str, model: str, missing: str, seed: int,
             settings: dict, threads: int = 1) -> dict:
    """Train ``model`` on the (task, missing, seed) cell and write predictions.parquet, metrics.json,
    model.pt, history.csv and checkpoint.pt into ``out_dir`` (resuming from a checkpoint there). metrics.json
    records which criterion selected the model (``selection_metric``: 'val_auprc', or 'val_loss' when no
    label has both classes in the val split) and ``val_labels_with_both_classes``.

    inputs: 'stays', 'ehr', optional 'cxr_index', 'cxr_images' and the pretrained parts 'cxr_encoder'
    (CXR backbone) and 'ehr_encoder' (loaded into the model's ``ehr_encoder``). settings: the model's resolved
    settings (:func:`ehrcxr.settings.model_settings`: modalities, params, train, cxr). Returns the metrics dict.
    """
    train_params, cxr_params = settings["train"], settings.get("cxr") or {}
    for key in ("stays", "ehr"):
        if key not in inputs:
            raise KeyError(f"run_cell inputs lack {key!r}")
    absent = [key for key in TRAIN_KEYS if key not in train_params]
    if absent:
        raise KeyError(f"train parameters lack {absent}")
    modalities = list(settings.get("modalities", []))
    unknown = sorted(set(modalities) - {"ehr", "cxr"})
    if not modalities or unknown:
        raise ValueError(f"model {model!r}: modalities must be a non-empty subset of [ehr, cxr]; got {modalities}")
    uses_cxr = "cxr" in modalities
    if uses_cxr and not inputs.get("cxr_images"):
        raise ValueError(f"model {model!r} uses the CXR but no 'cxr_images' input was given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_cell_data(inputs["stays"], inputs["ehr"], task, missing, seed,
                          cxr_index_path=inputs.get("cxr_index"),
                          cxr_images_path=inputs.get("cxr_images") if uses_cxr else None)
    seed_everything(seed)
    cxr = None
    if uses_cxr:
        cxr = {**cxr_params, "pretrained": inputs.get("cxr_encoder")}
    network = create_model(settings.get("architecture", model), n_labels=len(data.labels),
                           ehr_features=data.ehr_features, cxr=cxr, **dict(settings.get("params") or {}))
    if inputs.get("ehr_encoder"):
        load_pretrained_ehr(network, inputs["ehr_encoder"], model)
    result = fit(network, data, out_dir, **fit_options(train_params, cxr_params), seed=seed, threads=threads,
                 log=log, inputs=inputs, run_key=run_key(inputs, task, model, missing, seed, settings))

    resolved = resolve_device(train_params.get("device", "auto"))
    batch_size = max(int(train_params["batch_size"]), 256)
    frames, metrics = [], {}
    for eval_set in PREDICTED_SETS:
        stay_set = data.splits[eval_set]
        probabilities = predict(network, stay_set, batch_size=batch_size, device=resolved)
        labels = stay_set.labels.numpy()
        if eval_set in EVAL_SETS:
            auprc, auroc = macro_scores(labels, probabilities)
            metrics[eval_set] = {"auroc": _json_number(auroc), "auprc": _json_number(auprc)}
        columns = {"stay_id": stay_set.stay_id.numpy(), "eval_set": eval_set,
                   "has_cxr": stay_set.has_cxr.numpy().astype(np.int8)}
        columns |= {f"y_{label}": labels[:, column].astype(np.int8) for column, label in enumerate(data.labels)}
        scores = {"p": probabilities}
        for modality in WITHHELD:  # the same trained model with one input withheld (no retraining)
            scores[f"p_no{modality}"] = predict(network, stay_set.withheld(modality), batch_size=batch_size,
                                                device=resolved)
        columns |= {f"{prefix}_{label}": values[:, column].astype(np.float64)
                    for prefix, values in scores.items() for column, label in enumerate(data.labels)}
        frames.append(pd.DataFrame(columns))
    predictions = pd.concat(frames, ignore_index=True)
    write_atomic(out_dir / "predictions.parquet", lambda path: predictions.to_parquet(path, index=False))
    summary = {"task": task, "model": model, "missing": missing, "seed": int(seed), "labels": data.labels,
               "n_stays": data.sizes(), "best_epoch": int(result.best_epoch), "augmented": result.augmented,
               "selection_metric": result.selection_metric,
               "val_labels_with_both_classes": result.val_labels_with_both_classes, "metrics": metrics}
    write_atomic(out_dir / "metrics.json", lambda path: path.write_text(json.dumps(summary, indent=2)))
    log.info("%s/%s/%s seed %d: best epoch %d by %s; %s", task, model, missing, seed, result.best_epoch,
             result.selection_metric,
             "; ".join(f"{name} AUROC {m['auroc']} AUPRC {m['auprc']}" for name, m in metrics.items()))
    return summary
