"""The one training loop for every model: BCE + auxiliary losses, AdamW or Adam with an optional scheduler, early
stopping and model selection on validation macro AUPRC or AUROC (validation loss when no label has both classes in
'val'), fp32 evaluation, X-ray augmentation on the device, atomic per-epoch checkpoints that make a killed run
resume to the identical result.

Methods extend the loop through optional methods of their model (defaults: today's loop), never by copying it:

* ``forward(batch) -> ModelOutput(logits, aux_losses)``: auxiliary losses are added to the task loss;
* ``configure_optimizers(make_optimizer) -> list[Optimizer]``: several optimisers (``make_optimizer(params)``
  builds one with the cell's optimiser settings); the scheduler, if any, drives each of them;
* ``training_step(batch, step: TrainStep) -> Tensor``: take over one optimisation step (manual steps with
  several backward passes); ``step`` offers the cell's loss, autocast, ``backward`` and the optimisers;
* ``on_after_backward()``: act on gradients after every backward pass, before the optimiser step;
* ``on_fit_start(data, inputs)``: once before training, with the cell data and the run's input files;
* ``on_train_epoch_start(epoch, step)`` / ``on_train_epoch_end(epoch, step)``: epoch boundaries (may add
  layers: parameters that appear are added to the first optimiser as a new parameter group);
* ``hook_state_dict()`` / ``load_hook_state_dict(state)``: hook state kept in the checkpoint; loaded before
  the model's weights, so a model can first rebuild what its hooks added.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
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

from ehrcxr.data.datasets import CellData, StaySet, normalise_images, standardise
from ehrcxr.evaluate.metrics import has_both_classes, macro
from ehrcxr.models.base import Batch, ModelOutput
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.train.augment import augment_images, check_augment

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auprc", "val_auroc", "lr", "seconds"]
OPTIMISERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
SELECTION_METRICS = ("val_auprc", "val_auroc")
FEATURE_PROBE_ROWS = 16  # rows recomputed to check a stored feature file against the model's encoder ...
FEATURE_PROBE_TOLERANCE = 1e-2  # ... within this fraction of their largest magnitude


@dataclass
class FitResult:
    """Outcome of ``fit``: the selected epoch, its validation AUPRC (NaN when undefined), the selection
    criterion ('val_auprc', 'val_auroc' or 'val_loss'), how many labels have both classes in 'val', the history
    and whether X-ray augmentation was applied."""

    best_epoch: int
    best_val_auprc: float
    selection_metric: str
    val_labels_with_both_classes: int
    epochs_run: int
    stopped_early: bool
    history: pd.DataFrame
    device: str
    prefix_seconds: float
    augmented: bool = False


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


def selection_criterion(data: CellData, log: logging.Logger, metric: str = "val_auprc") -> tuple[str, int]:
    """(``metric`` or 'val_loss', number of labels with both classes in 'val'). Macro AUPRC/AUROC leave
    single-class labels out; when every label has a single class they are undefined, so the epoch with the
    lowest validation loss is selected instead, with a warning. The val labels are fixed: decided once."""
    if metric not in SELECTION_METRICS:
        raise ValueError(f"selection must be one of {', '.join(SELECTION_METRICS)}; got {metric!r}")
    labels = data.splits["val"].labels.numpy()
    both = [has_both_classes(labels[:, j]) for j in range(labels.shape[1])]
    cell = f"cell {data.task}/{data.missing} seed {data.seed}"
    name = metric.removeprefix("val_").upper()
    if not any(both):
        log.warning("%s: the validation set has a single class for all %d label(s), so validation %s is "
                    "undefined; selecting the epoch with the lowest validation loss instead", cell, len(both), name)
        return "val_loss", 0
    single = [label for label, ok in zip(data.labels, both) if not ok]
    if single:
        log.warning("%s: the validation set has a single class for %d of %d labels (%s); model selection uses "
                    "the macro %s of the other %d", cell, len(single), len(both), ", ".join(single), name,
                    sum(both))
    return metric, sum(both)


def _selection_score(selection_metric: str, scores: dict[str, float]) -> float:
    """Higher is better: the validation metric, or minus the validation loss; -inf when undefined."""
    score = -scores["val_loss"] if selection_metric == "val_loss" else scores[selection_metric]
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


def prepare_batch(batch: Batch, device: torch.device, augment: dict | None = None,
                  generator: torch.Generator | None = None) -> Batch:
    """Move ``batch`` to ``device``; uint8 X-ray pixels become model input there: scaled to [0, 1], augmented
    when ``augment`` settings are given (training), standardised, and zero where the stay has no X-ray.
    Precomputed prefix features pass through as float32."""
    cuda = device.type == "cuda"
    batch = batch.to(device, non_blocking=cuda)
    if batch.cxr.dtype == torch.uint8:
        images = batch.cxr.float() / 255.0
        if augment is not None:
            images = augment_images(images, augment, generator)
        present = (batch.has_cxr > 0.5).to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
        batch.cxr = standardise(images) * present
    else:
        batch.cxr = batch.cxr.float()
    if cuda and batch.cxr.dim() == 4:
        batch.cxr = batch.cxr.contiguous(memory_format=torch.channels_last)
    return batch


def label_loss(logits: torch.Tensor, labels: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """BCE-with-logits on independent labels; cross-entropy on the one-hot class of a multiclass task."""
    if multiclass:
        return F.cross_entropy(logits, labels.argmax(dim=1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def label_probabilities(logits: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """Sigmoid of each label's logit, or the softmax over the classes of a multiclass task."""
    return torch.softmax(logits, dim=1) if multiclass else torch.sigmoid(logits)


def task_loss(output: ModelOutput, batch: Batch, multiclass: bool = False) -> torch.Tensor:
    """The label loss (:func:`label_loss`) plus every auxiliary loss of the model (in fp32)."""
    loss = label_loss(output.logits.float(), batch.labels, multiclass)
    for aux in output.aux_losses.values():
        loss = loss + aux.float()
    return loss


def _evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, multiclass: bool = False
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, mean label loss) of ``model`` over ``loader``: eval mode, no grad and fp32 (no
    autocast), so predictions keep their resolution and rank ties do not move AUROC/AUPRC."""
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for batch in loader:
            batch = prepare_batch(batch, device)
            logits.append(model(batch).logits.detach().float().cpu())
            labels.append(batch.labels.cpu())
    if not logits:
        return np.zeros((0, 0)), np.zeros((0, 0)), float("nan")
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    loss = float(label_loss(logits_all, labels_all, multiclass))
    return labels_all.numpy(), label_probabilities(logits_all, multiclass).numpy(), loss


def predict(model: nn.Module, stay_set: StaySet, batch_size: int = 256, device: str | torch.device = "auto"
            ) -> np.ndarray:
    """Probabilities (sigmoid of logits; softmax for a multiclass task), shape (len(stay_set), n_labels), in
    stay_set order (fp32)."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    n_labels = int(stay_set.labels.shape[1])
    if len(stay_set) == 0:
        return np.zeros((0, n_labels), dtype=np.float32)
    _, probabilities, _ = _evaluate(model, _loader(stay_set, batch_size, device, threads=1), device,
                                    stay_set.multiclass)
    return probabilities


def prefix_features(prefix: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device,
                    batch_size: int, pool: bool = False) -> torch.Tensor:
    """Features of a frozen CXR prefix (eval mode, fp32, on the CPU) for the cache ``rows`` of ``images``; with
    ``pool`` globally average-pooled to (N, C, 1, 1), which is all a fully frozen backbone's suffix then does."""
    prefix.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            batch = normalise_images(images[rows[start:start + batch_size]]).to(device)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            features = prefix(batch).float()
            if pool:
                features = F.adaptive_avg_pool2d(features, 1)
            chunks.append(features.contiguous().cpu())
    return torch.cat(chunks)


def pooled_cxr_features(prefix: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 256
                        ) -> np.ndarray:
    """(N, C) float32 pooled features of a fully frozen backbone for every row of the image cache (the file
    rule ``cxr_features`` writes once per seed and ResNet depth, read by ``precompute_cxr_features``)."""
    rows = np.arange(images.shape[0])
    features = prefix_features(prefix, images, rows, device, batch_size, pool=True)
    return features.flatten(1).numpy()


def _stored_pooled_features(prefix: nn.Module, channels: int, data: CellData, rows: np.ndarray, path: str | Path,
                            device: torch.device) -> torch.Tensor:
    """The pooled features of ``rows`` from a ``cxr_features`` file, checked against the model's own prefix on
    the first rows (a file written with another encoder or image cache is an error, not a silent swap)."""
    stored = np.load(path, mmap_mode="r")
    if stored.ndim != 2 or stored.shape[0] != data.images.shape[0] or stored.shape[1] != channels:
        raise ValueError(f"{path}: CXR features of shape {stored.shape} do not fit the image cache "
                         f"({data.images.shape[0]} images) and this encoder ({channels} features); rerun cxr_features")
    features = torch.from_numpy(np.ascontiguousarray(stored[rows], dtype=np.float32))
    features = features.view(rows.size, channels, 1, 1)
    probe = rows[:FEATURE_PROBE_ROWS]
    own = prefix_features(prefix, data.images, probe, device, probe.size, pool=True)
    worst, scale = float((own - features[:probe.size]).abs().max()), float(own.abs().max())
    if worst > FEATURE_PROBE_TOLERANCE * scale + 1e-6:  # relative: TF32 convolutions on a GPU differ by ~1e-3
        raise ValueError(f"{path}: stored CXR features differ from this model's frozen encoder (max |diff| {worst:.3g} "
                         f"on the first {probe.size} rows): written with another encoder or image cache; rerun "
                         f"cxr_features")
    return features


def _cxr_backbones(model: nn.Module) -> list[nn.Module]:
    from ehrcxr.models.encoders import CXRBackbone

    return [module for module in model.modules() if isinstance(module, CXRBackbone)]


def _wholly_frozen(model: nn.Module) -> bool:
    """Whether the model has CXR backbones and keeps every ResNet stage of each frozen (frozen_stages 4)."""
    backbones = _cxr_backbones(model)
    return bool(backbones) and all(backbone.frozen_stages == 4 for backbone in backbones)


def precompute_cxr_features(model: nn.Module, data: CellData, device: torch.device, batch_size: int,
                            log: logging.Logger, features_path: str | Path | None = None) -> float:
    """If ``model`` has a frozen CXR prefix, make every StaySet serve its features for the cache rows the cell
    needs instead of images, and return the seconds taken (0 when nothing was done). With every ResNet stage
    frozen and a ``features_path`` (the pooled features ``cxr_features`` wrote once for the pretrained encoder),
    they are read from that file; otherwise the prefix runs once here (fp32)."""
    from ehrcxr.models.encoders import frozen_cxr_prefix

    prefix = frozen_cxr_prefix(model)
    if prefix is None or data.images is None:
        return 0.0
    rows = data.cxr_rows_needed()
    if rows.size == 0:
        return 0.0
    started = time.perf_counter()
    if features_path and _wholly_frozen(model):
        features = _stored_pooled_features(prefix, _cxr_backbones(model)[0].out_dim, data, rows, features_path, device)
        source = f"read from {features_path}"
    else:
        features = prefix_features(prefix, data.images, rows, device, batch_size)
        source = "computed"
    for stay_set in data.splits.values():
        stay_set.use_cxr_features(features, rows)
    seconds = time.perf_counter() - started
    log.info("frozen CXR prefix: %d images -> features %s %s in %.1f s", rows.size, tuple(features.shape[1:]),
             source, seconds)
    return seconds


def _augmentation(model: nn.Module, data: CellData, augment: dict | None, log: logging.Logger) -> dict | None:
    """The augmentation settings to apply in training: None without images, without settings, or when every
    ResNet stage of the model is frozen (its features are then computed once, per seed or per cell, see
    ``precompute_cxr_features``, and augmenting would mean running the whole network on every batch)."""
    augment = check_augment(augment)
    if augment is None or data.images is None or not _cxr_backbones(model):
        return None
    if _wholly_frozen(model):
        log.info("X-ray augmentation off: frozen_stages 4 serves precomputed features")
        return None
    return augment


@dataclass
class TrainStep:
    """What a model's ``training_step`` and epoch hooks may use: the cell, its device and optimisers, the run's
    maximum number of epochs, the task loss, autocast and a backward pass that runs the model's
    ``on_after_backward``."""

    model: nn.Module
    data: CellData
    device: torch.device
    optimizers: list[torch.optim.Optimizer]
    epochs: int = 1

    def loss(self, output: ModelOutput, batch: Batch) -> torch.Tensor:
        return task_loss(output, batch, self.data.splits["train"].multiclass)

    def autocast(self):
        return autocast(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        hook = getattr(self.model, "on_after_backward", None)
        if hook is not None:
            hook()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)


def default_training_step(model: nn.Module, batch: Batch, step: TrainStep) -> torch.Tensor:
    """Forward under autocast, task loss, backward (+ ``on_after_backward``), step every optimiser."""
    with step.autocast():
        loss = step.loss(model(batch), batch)
    step.zero_grad()
    step.backward(loss)
    for optimizer in step.optimizers:
        optimizer.step()
    return loss.detach()


def _make_optimizers(model: nn.Module, optimiser: str, lr: float, weight_decay: float
                     ) -> list[torch.optim.Optimizer]:
    """The model's ``configure_optimizers`` (given a factory with the cell's settings), else one optimiser
    over every trainable parameter."""
    if optimiser not in OPTIMISERS:
        raise ValueError(f"optimiser must be one of {', '.join(OPTIMISERS)}; got {optimiser!r}")

    def make_optimizer(parameters) -> torch.optim.Optimizer:
        return OPTIMISERS[optimiser](parameters, lr=lr, weight_decay=weight_decay)

    configure = getattr(model, "configure_optimizers", None)
    if configure is None:
        return [make_optimizer([p for p in model.parameters() if p.requires_grad])]
    optimizers = list(configure(make_optimizer))
    if not optimizers:
        raise ValueError(f"{type(model).__name__}.configure_optimizers returned no optimiser")
    return optimizers


def _register_new_parameters(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Add trainable parameters no optimiser holds (layers a hook created) to the first optimiser as one
    new parameter group, at the learning rate its first group has reached (a scheduler may have lowered it) and
    with that group's ``initial_lr``, so the scheduler moves the new group in step; returns how many were added."""
    held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if new:
        first = optimizers[0].param_groups[0]
        optimizers[0].add_param_group({"params": new, "lr": first["lr"],
                                       **{key: first[key] for key in ("initial_lr",) if key in first}})
    return len(new)


def _make_schedulers(scheduler: dict | None, optimizers: list[torch.optim.Optimizer], epochs: int) -> list:
    """One scheduler per optimiser: 'plateau' (ReduceLROnPlateau on validation loss, ``factor``, ``patience``)
    or 'cosine' (CosineAnnealingLR over ``epochs``, ``eta_min``); none when ``scheduler`` is None."""
    if scheduler is None:
        return []
    name = scheduler.get("name")
    if name == "plateau":
        return [torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(scheduler.get("factor", 0.5)),
            patience=int(scheduler.get("patience", 10))) for optimizer in optimizers]
    if name == "cosine":
        return [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs,
                                                           eta_min=float(scheduler.get("eta_min", 0.0)))
                for optimizer in optimizers]
    raise ValueError(f"scheduler name must be plateau or cosine; got {name!r}")


def _call_hook(model: nn.Module, name: str, *args) -> None:
    hook = getattr(model, name, None)
    if hook is not None:
        hook(*args)


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


def _frozen_prefix_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's frozen CXR prefixes: never trained, always built from the pretrained encoder
    (or the configured weights) before ``fit``, so checkpoints leave them out (a ResNet-18 is 45 MB per copy)."""
    return {f"{name}.prefix.{key}".lstrip(".") for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, CXRBackbone) for key in module.prefix.state_dict()}


def _trained_state(state: dict, frozen: set[str]) -> dict:
    """``state`` without the frozen prefix keys."""
    return {key: value for key, value in state.items() if key not in frozen}


def _fits(model: nn.Module, state: dict, frozen: set[str]) -> bool:
    """True if ``state`` has exactly the model's trained state-dict keys, each with the model's shape."""
    own = _trained_state(model.state_dict(), frozen)
    return own.keys() == state.keys() and all(own[key].shape == state[key].shape for key in own)


def _write_history(rows: list[dict], path: Path) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    write_atomic(path, lambda temporary: history.to_csv(temporary, index=False))
    return history


def fit_options(train: dict, cxr: dict | None = None) -> dict:
    """``fit``'s keyword arguments from a resolved ``train:`` section (and the ``cxr:`` section's augment);
    keys a config leaves out take fit's defaults."""
    options = dict(epochs=int(train["epochs"]), batch_size=int(train["batch_size"]), lr=float(train["lr"]),
                   weight_decay=float(train["weight_decay"]), patience=int(train["patience"]),
                   device=train.get("device", "auto"), augment=(cxr or {}).get("augment"))
    for key, convert in (("optimiser", str), ("selection", str), ("min_epochs", int), ("scheduler", dict)):
        if train.get(key) is not None:
            options[key] = convert(train[key])
    return options


def training_key(inputs: dict, **identity) -> str:
    """Digest of what a training run depends on: ``identity`` (stage, cell, settings; every 'device' key left
    out, so another device resumes the same run) and the size and modification time of each input file. A
    checkpoint is resumed only under the same key."""
    def without_device(value):
        if isinstance(value, dict):
            return {key: without_device(item) for key, item in value.items() if key != "device"}
        return value

    key = {**without_device(identity),
           "inputs": {name: [str(path), Path(path).stat().st_size, Path(path).stat().st_mtime_ns]
                      for name, path in sorted(inputs.items()) if path}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def fit(model: nn.Module, data: CellData, out_dir: str | Path, *, epochs: int, batch_size: int, lr: float,
        weight_decay: float, patience: int, seed: int, device: str = "auto", threads: int = 1,
        run_key: str = "", log: logging.Logger | None = None, optimiser: str = "adamw",
        scheduler: dict | None = None, selection: str = "val_auprc", min_epochs: int = 1,
        augment: dict | None = None, inputs: dict | None = None) -> FitResult:
    """Train ``model`` on ``data`` 'train' and select the epoch with the best 'val' ``selection`` metric (macro
    AUPRC or AUROC; the lowest 'val' loss when no label has both classes there, see ``selection_criterion``);
    stop after ``patience`` epochs without gain, never before ``min_epochs``. ``optimiser`` (adamw/adam) with
    ``lr`` and ``weight_decay``, optional ``scheduler`` (see ``_make_schedulers``), X-ray ``augment`` settings
    (see ``_augmentation``), and the model's hooks (module docstring; ``inputs`` reach ``on_fit_start``).

    Writes ``model.pt`` (best state), ``checkpoint.pt`` (every epoch, atomically: weights without the frozen CXR
    prefix, which a resumed run rebuilds as before, optimisers, schedulers, hook state, random states) and
    ``history.csv`` into ``out_dir``. A checkpoint there is
    resumed from only when it was written under the same ``run_key`` (a digest of the cell's settings and
    inputs) and selection criterion; otherwise training starts over."""
    log = log or logging.getLogger("ehrcxr.train")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, model_path, history_path = out_dir / "checkpoint.pt", out_dir / "model.pt", out_dir / "history.csv"
    for split in ("train", "val"):
        if len(data.splits[split]) == 0:
            raise ValueError(f"cell {data.task}/{data.missing}: the {split} set is empty")
    if epochs < 1 or patience < 1 or batch_size < 1 or min_epochs < 1:
        raise ValueError(f"epochs, patience, batch_size and min_epochs must be positive; got {epochs}, {patience}, "
                         f"{batch_size}, {min_epochs}")
    resolved = resolve_device(device)
    configure_device(resolved, threads)
    seed_everything(seed)
    model.to(resolved)
    if resolved.type == "cuda":
        model.to(memory_format=torch.channels_last)
    augment = _augmentation(model, data, augment, log)
    prefix_seconds = 0.0 if augment else precompute_cxr_features(model, data, resolved, max(batch_size, 256), log,
                                                                 (inputs or {}).get("cxr_features"))
    selection_metric, val_labels_with_both_classes = selection_criterion(data, log, selection)
    _call_hook(model, "on_fit_start", data, dict(inputs or {}))

    generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator(device=resolved).manual_seed(seed)
    optimizers = _make_optimizers(model, optimiser, lr, weight_decay)
    schedulers = _make_schedulers(scheduler, optimizers, epochs)
    step = TrainStep(model, data, resolved, optimizers, epochs)
    training_step = getattr(model, "training_step", None)
    train_loader = _loader(data.splits["train"], batch_size, resolved, threads, generator)
    val_loader = _loader(data.splits["val"], max(batch_size, 256), resolved, threads)

    hook_state = getattr(model, "hook_state_dict", None)
    start_epoch, best_epoch, best_score, stale = 1, 0, float("-inf"), 0
    best_state: dict | None = None
    best_hooks = None  # the hook state that goes with best_state (hooks may add layers later)
    history: list[dict] = []
    frozen = _frozen_prefix_keys(model)
    checkpoint = _load_checkpoint(checkpoint_path, run_key, selection_metric, log)
    if checkpoint is not None and checkpoint["hooks"] is None and not _fits(model, checkpoint["model"], frozen):
        log.warning("ignoring checkpoint %s: its weights do not fit the model (the model's code changed since); "
                    "training starts over", checkpoint_path)
        checkpoint = None
    if checkpoint is not None:
        if checkpoint["hooks"] is not None:
            model.load_hook_state_dict(checkpoint["hooks"])
            model.to(resolved)
            _register_new_parameters(model, optimizers)
        built = model.state_dict()  # its frozen prefix as built: the one the checkpoint's run trained on
        model.load_state_dict({**built, **checkpoint["model"]})
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        for scheduler_, state in zip(schedulers, checkpoint["schedulers"], strict=True):
            scheduler_.load_state_dict(state)
        start_epoch = checkpoint["epoch"] + 1
        best_epoch, best_score, stale = checkpoint["best_epoch"], checkpoint["best_score"], checkpoint["stale"]
        best_state = {**{key: built[key].detach().to("cpu", copy=True) for key in frozen}, **checkpoint["best_state"]}
        best_hooks, history = checkpoint["best_hooks"], checkpoint["history"]
        _set_rng_state(checkpoint["rng"], generator)
        augment_generator.set_state(checkpoint["augment_rng"])
        log.info("resuming from %s after epoch %d (best epoch %d)", checkpoint_path, checkpoint["epoch"], best_epoch)

    epoch = start_epoch - 1
    stopped_early = stale >= patience and epoch >= min_epochs
    while not stopped_early and epoch < epochs:
        epoch += 1
        started = time.perf_counter()
        _call_hook(model, "on_train_epoch_start", epoch, step)
        _register_new_parameters(model, optimizers)
        model.train()
        total_loss, total_count = 0.0, 0
        for batch in train_loader:
            batch = prepare_batch(batch, resolved, augment, augment_generator)
            if training_step is not None:
                loss = training_step(batch, step)
            else:
                loss = default_training_step(model, batch, step)
            total_loss += float(loss) * len(batch)
            total_count += len(batch)
        _call_hook(model, "on_train_epoch_end", epoch, step)
        _register_new_parameters(model, optimizers)
        val_labels, val_probabilities, val_loss = _evaluate(model, val_loader, resolved, data.splits["val"].multiclass)
        val_auprc, val_auroc = macro_scores(val_labels, val_probabilities)
        lr_now = optimizers[0].param_groups[0]["lr"]
        for scheduler_ in schedulers:
            if isinstance(scheduler_, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler_.step(val_loss)
            else:
                scheduler_.step()
        score = _selection_score(selection_metric, {"val_auprc": val_auprc, "val_auroc": val_auroc,
                                                    "val_loss": val_loss})
        if best_state is None or score > best_score:
            best_epoch, best_score, stale = epoch, score, 0
            best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
            best_hooks = hook_state() if hook_state else None
            _atomic_save(best_state, model_path)
        else:
            stale += 1
        stopped_early = stale >= patience and epoch >= min_epochs
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": total_loss / total_count, "val_loss": val_loss,
                        "val_auprc": val_auprc, "val_auroc": val_auroc, "lr": lr_now, "seconds": seconds})
        _atomic_save({"model": _trained_state(model.state_dict(), frozen),
                      "optimizers": [o.state_dict() for o in optimizers],
                      "schedulers": [s.state_dict() for s in schedulers],
                      "hooks": hook_state() if hook_state else None, "epoch": epoch, "best_epoch": best_epoch,
                      "best_score": best_score, "stale": stale, "best_state": _trained_state(best_state, frozen),
                      "best_hooks": best_hooks,
                      "history": history, "rng": _rng_state(generator),
                      "augment_rng": augment_generator.get_state(), "run_key": run_key,
                      "selection_metric": selection_metric},
                     checkpoint_path)
        _write_history(history, history_path)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUPRC %.4f, val AUROC %.4f, lr %.3g (best epoch %d) "
                 "%.1f s", epoch, history[-1]["train_loss"], val_loss, val_auprc, val_auroc, lr_now, best_epoch,
                 seconds)
    if stopped_early:
        log.info("early stop after epoch %d: no %s gain for %d epochs", epoch, selection_metric, patience)

    if best_hooks is not None:
        model.load_hook_state_dict(best_hooks)
        model.to(resolved)
    model.load_state_dict(best_state)
    if not model_path.exists():
        _atomic_save(best_state, model_path)
    history_frame = _write_history(history, history_path)
    return FitResult(best_epoch=best_epoch, best_val_auprc=float(history[best_epoch - 1]["val_auprc"]),
                     selection_metric=selection_metric, val_labels_with_both_classes=val_labels_with_both_classes,
                     epochs_run=epoch, stopped_early=stopped_early, history=history_frame,
                     device=str(resolved), prefix_seconds=prefix_seconds, augmented=augment is not None)
