"""The one training loop for every model: AdamW, BCE + auxiliary losses, early stopping and model selection
on validation macro AUPRC (validation loss when no label has both classes in 'val'), atomic per-epoch
checkpoints that make a killed run resume to the identical result."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ehrcxr.data.datasets import CellData, StaySet, normalise_images
from ehrcxr.evaluate.metrics import has_both_classes, macro
from ehrcxr.models.base import Batch

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auprc", "val_auroc", "seconds"]


@dataclass
class FitResult:
    """Outcome of ``fit``: the selected epoch, its validation AUPRC (NaN when undefined), the selection
    criterion ('val_auprc' or 'val_loss'), how many labels have both classes in 'val', and the history."""

    best_epoch: int
    best_val_auprc: float
    selection_metric: str
    val_labels_with_both_classes: int
    epochs_run: int
    stopped_early: bool
    history: pd.DataFrame
    device: str
    prefix_seconds: float


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_device(device: torch.device, threads: int) -> None:
    """CPU: ``threads`` intra-op threads and deterministic algorithms; CUDA: TF32 matmuls allowed."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(threads)))
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def macro_scores(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """(macro AUPRC, macro AUROC) over the labels whose column holds both classes; NaN when none does."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    if labels.ndim == 1:  # one label (mortality) as a column; an empty (0, L) set stays 2-D
        labels, probabilities = labels[:, None], probabilities[:, None]
    return macro(labels, probabilities, "auprc"), macro(labels, probabilities, "auroc")


def selection_criterion(data: CellData, log: logging.Logger) -> tuple[str, int]:
    """('val_auprc' or 'val_loss', number of labels with both classes in 'val'). Macro AUPRC leaves
    single-class labels out; when every label has a single class it is undefined, so the epoch with the
    lowest validation loss is selected instead, with a warning. The val labels are fixed: decided once."""
    labels = data.splits["val"].labels.numpy()
    both = [has_both_classes(labels[:, j]) for j in range(labels.shape[1])]
    cell = f"cell {data.task}/{data.missing} seed {data.seed}"
    if not any(both):
        log.warning("%s: the validation set has a single class for all %d label(s), so validation AUPRC is "
                    "undefined; selecting the epoch with the lowest validation loss instead", cell, len(both))
        return "val_loss", 0
    single = [name for name, ok in zip(data.labels, both) if not ok]
    if single:
        log.warning("%s: the validation set has a single class for %d of %d labels (%s); model selection uses "
                    "the macro AUPRC of the other %d", cell, len(single), len(both), ", ".join(single),
                    sum(both))
    return "val_auprc", sum(both)


def _selection_score(selection_metric: str, val_auprc: float, val_loss: float) -> float:
    """Higher is better: validation AUPRC, or minus validation loss; -inf when undefined."""
    score = val_auprc if selection_metric == "val_auprc" else -val_loss
    return score if np.isfinite(score) else float("-inf")


def _loader(stay_set: StaySet, batch_size: int, device: torch.device, threads: int,
            generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """DataLoader over ``stay_set`` collating whole Batches; shuffled by a sampler that draws only from
    ``generator`` (when given), so the order of a resumed run does not depend on how many iterators (and
    worker seeds) earlier epochs created."""
    cuda = device.type == "cuda"
    workers = max(1, min(int(threads), 8)) if cuda else 0
    sampler = torch.utils.data.RandomSampler(stay_set, generator=generator) if generator is not None else None
    return torch.utils.data.DataLoader(
        stay_set, batch_size=batch_size, sampler=sampler, collate_fn=stay_set.collate, num_workers=workers,
        pin_memory=cuda, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def _to_device(batch: Batch, device: torch.device) -> Batch:
    batch = batch.to(device, non_blocking=device.type == "cuda")
    if device.type == "cuda" and batch.cxr.dim() == 4:
        batch.cxr = batch.cxr.float().contiguous(memory_format=torch.channels_last)
    else:
        batch.cxr = batch.cxr.float()
    return batch


def _evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, mean BCE) of ``model`` over ``loader`` (eval mode, no grad)."""
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, device)
            with autocast(device):
                output = model(batch)
            logits.append(output.logits.float().cpu())
            labels.append(batch.labels.cpu())
    if not logits:
        return np.zeros((0, 0)), np.zeros((0, 0)), float("nan")
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    loss = float(F.binary_cross_entropy_with_logits(logits_all, labels_all))
    return labels_all.numpy(), torch.sigmoid(logits_all).numpy(), loss


def predict(model: nn.Module, stay_set: StaySet, batch_size: int = 256, device: str | torch.device = "auto"
            ) -> np.ndarray:
    """Probabilities (sigmoid of logits), shape (len(stay_set), n_labels), in stay_set order."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    n_labels = int(stay_set.labels.shape[1])
    if len(stay_set) == 0:
        return np.zeros((0, n_labels), dtype=np.float32)
    _, probabilities, _ = _evaluate(model, _loader(stay_set, batch_size, device, threads=1), device)
    return probabilities


def precompute_cxr_features(model: nn.Module, data: CellData, device: torch.device, batch_size: int,
                            log: logging.Logger) -> float:
    """If ``model`` has a frozen CXR prefix, run it once over the cache rows the cell needs and make every
    StaySet serve those features; returns the seconds taken (0 when nothing was done)."""
    from ehrcxr.models.encoders import frozen_cxr_prefix

    prefix = frozen_cxr_prefix(model)
    if prefix is None or data.images is None:
        return 0.0
    rows = data.cxr_rows_needed()
    if rows.size == 0:
        return 0.0
    started = time.perf_counter()
    prefix.eval()
    chunks = []
    store_dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            images = normalise_images(data.images[rows[start:start + batch_size]]).to(device)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                features = prefix(images)
            chunks.append(features.to(store_dtype).contiguous().cpu())
    features = torch.cat(chunks)
    for stay_set in data.splits.values():
        stay_set.use_cxr_features(features, rows)
    seconds = time.perf_counter() - started
    log.info("frozen CXR prefix: %d images -> features %s in %.1f s", rows.size, tuple(features.shape[1:]),
             seconds)
    return seconds


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "shuffle": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and move the result onto ``path``, so a killed job never leaves a
    half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _atomic_save(obj, path: Path) -> None:
    write_atomic(path, lambda temporary: torch.save(obj, temporary))


def _load_checkpoint(path: Path, run_key: str, selection_metric: str, log: logging.Logger) -> dict | None:
    """The checkpoint at ``path`` if it exists, loads and was written under ``run_key`` by a run selecting on
    ``selection_metric`` (its best score means that metric); else None (logged)."""
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a checkpoint from another torch version or a damaged file
        log.warning("ignoring unreadable checkpoint %s (%s: %s); training from the start",
                    path, type(error).__name__, error)
        return None
    if checkpoint.get("run_key") != run_key or checkpoint.get("selection_metric") != selection_metric:
        log.warning("ignoring checkpoint %s: written for other settings or inputs (or selection criterion); "
                    "training from the start", path)
        return None
    return checkpoint


def _write_history(rows: list[dict], path: Path) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    write_atomic(path, lambda temporary: history.to_csv(temporary, index=False))
    return history


def fit(model: nn.Module, data: CellData, out_dir: str | Path, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, patience: int, seed: int, device: str = "auto", threads: int = 1,
        run_key: str = "", log: logging.Logger | None = None) -> FitResult:
    """Train ``model`` on ``data`` 'train', select the epoch with the best 'val' macro AUPRC (the lowest 'val'
    loss when no label has both classes there, see ``selection_criterion``), stop after ``patience`` epochs
    without gain. Writes ``model.pt`` (best state), ``checkpoint.pt`` (every epoch,
    atomically) and ``history.csv`` into ``out_dir``. A checkpoint there is resumed from only when it was
    written under the same ``run_key`` (a digest of the cell's settings and inputs) and selection criterion;
    otherwise training starts over."""
    log = log or logging.getLogger("ehrcxr.train")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path, history_path = out_dir / "checkpoint.pt", out_dir / "model.pt", out_dir / "history.csv"
    for split in ("train", "val"):
        if len(data.splits[split]) == 0:
            raise ValueError(f"cell {data.task}/{data.missing}: the {split} set is empty")
    if epochs < 1 or patience < 1 or batch_size < 1:
        raise ValueError(f"epochs, patience and batch_size must be positive; got {epochs}, {patience}, {batch_size}")
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    seed_everything(seed)
    model.to(resolved)
    if resolved.type == "cuda":
        model.to(memory_format=torch.channels_last)
    prefix_seconds = precompute_cxr_features(model, data, resolved, max(batch_size, 256), log)
    selection_metric, val_labels_with_both_classes = selection_criterion(data, log)

    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    train_loader = _loader(data.splits["train"], batch_size, resolved, threads, generator)
    val_loader = _loader(data.splits["val"], max(batch_size, 256), resolved, threads)

    start_epoch, best_epoch, best_score, stale = 1, 0, float("-inf"), 0
    best_state: dict | None = None
    history: list[dict] = []
    checkpoint = _load_checkpoint(checkpoint_path, run_key, selection_metric, log)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        start_epoch = checkpoint["epoch"] + 1
        best_epoch, best_score, stale = checkpoint["best_epoch"], checkpoint["best_score"], checkpoint["stale"]
        best_state, history = checkpoint["best_state"], checkpoint["history"]
        _set_rng_state(checkpoint["rng"], generator)
        log.info("resuming from %s after epoch %d (best epoch %d)", checkpoint_path, checkpoint["epoch"], best_epoch)

    epoch = start_epoch - 1
    stopped_early = stale >= patience
    while not stopped_early and epoch < epochs:
        epoch += 1
        started = time.perf_counter()
        model.train()
        total_loss, total_count = 0.0, 0
        for batch in train_loader:
            batch = _to_device(batch, resolved)
            with autocast(resolved):
                output = model(batch)
                loss = F.binary_cross_entropy_with_logits(output.logits.float(), batch.labels)
                for aux in output.aux_losses.values():
                    loss = loss + aux.float()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total_loss += float(loss.detach()) * len(batch)
            total_count += len(batch)
        val_labels, val_probabilities, val_loss = _evaluate(model, val_loader, resolved)
        val_auprc, val_auroc = macro_scores(val_labels, val_probabilities)
        score = _selection_score(selection_metric, val_auprc, val_loss)
        if best_state is None or score > best_score:
            best_epoch, best_score, stale = epoch, score, 0
            best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
            _atomic_save(best_state, model_path)
        else:
            stale += 1
        stopped_early = stale >= patience
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": total_loss / total_count, "val_loss": val_loss,
                        "val_auprc": val_auprc, "val_auroc": val_auroc, "seconds": seconds})
        _atomic_save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": epoch,
                      "best_epoch": best_epoch, "best_score": best_score, "stale": stale,
                      "best_state": best_state, "history": history, "rng": _rng_state(generator),
                      "run_key": run_key, "selection_metric": selection_metric},
                     checkpoint_path)
        _write_history(history, history_path)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUPRC %.4f, val AUROC %.4f (best epoch %d) %.1f s",
                 epoch, history[-1]["train_loss"], val_loss, val_auprc, val_auroc, best_epoch, seconds)
    if stopped_early:
        log.info("early stop after epoch %d: no %s gain for %d epochs", epoch, selection_metric, patience)

    model.load_state_dict(best_state)
    if not model_path.exists():
        _atomic_save(best_state, model_path)
    history_frame = _write_history(history, history_path)
    return FitResult(best_epoch=best_epoch, best_val_auprc=float(history[best_epoch - 1]["val_auprc"]),
                     selection_metric=selection_metric, val_labels_with_both_classes=val_labels_with_both_classes,
                     epochs_run=epoch, stopped_early=stopped_early, history=history_frame,
                     device=str(resolved), prefix_seconds=prefix_seconds)
