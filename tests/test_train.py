"""Cell datasets, the trainer (learning, early stopping, resume, determinism), run_cell and CXR pretraining."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from ehrcxr.data.datasets import CellData, StaySet, load_cell_data, normalise_images
from ehrcxr.models import ModelOutput, create_model, register
from ehrcxr.models.encoders import CXRBackbone
from ehrcxr.resources import CHEXPERT_LABELS
from ehrcxr.train.cell import run_cell, run_key
from ehrcxr.train.loop import (
    fit, macro_scores, precompute_cxr_features, predict, prepare_batch, seed_everything, selection_criterion,
)
from ehrcxr.train.pretrain import chexpert_image_labels, cxr_features, pretrain_cxr

N_STAYS, HOURS, N_VALUES, N_VARIABLES, IMAGE = 160, 4, 3, 2, 16
CORRUPT_STAY = 5  # its paired image is in the cache index with status 'corrupt'
TRAIN = dict(epochs=12, batch_size=16, lr=0.05, weight_decay=0.0, patience=20, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@register("tiny_test_model")
class TinyModel(nn.Module):
    """Logistic regression on the first EHR hour (+ the mean image brightness when built with a CXR)."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ehr_head = nn.Linear(ehr_features, n_labels)
        self.cxr_head = nn.Linear(1, n_labels) if cxr is not None else None

    def forward(self, batch) -> ModelOutput:
        logits = self.ehr_head(self.dropout(batch.ehr[:, 0, :]))
        if self.cxr_head is not None:
            brightness = batch.cxr.mean(dim=(1, 2, 3)).unsqueeze(1)
            logits = logits + self.cxr_head(brightness) * batch.has_cxr.unsqueeze(1)
        return ModelOutput(logits, {"l2": 1e-4 * self.ehr_head.weight.pow(2).sum()})


@register("scheduled_logit_test_model")
class ScheduledLogitModel(nn.Module):
    """Predicts the logit ``schedule[e - 1]`` for every stay in epoch e (counted by the ``train()`` call that
    starts each epoch; a buffer, so checkpoints keep it), so each epoch's validation loss is known in advance."""

    def __init__(self, n_labels: int, ehr_features: int, cxr: dict | None = None, schedule: tuple = ()):
        super().__init__()
        self.n_labels = n_labels
        self.register_buffer("schedule", torch.tensor(schedule, dtype=torch.float32))
        self.register_buffer("epochs_started", torch.zeros((), dtype=torch.long))
        self.unused = nn.Parameter(torch.zeros(()))  # the optimiser needs a parameter

    def train(self, mode: bool = True) -> "ScheduledLogitModel":
        if mode:
            self.epochs_started += 1
        return super().train(mode)

    def forward(self, batch) -> ModelOutput:
        logit = self.schedule[self.epochs_started - 1] + 0 * self.unused
        return ModelOutput(logit.expand(len(batch), self.n_labels), {})


# Validation loss of an all-negative val set is softplus(logit): lowest at epoch 4 (logit -3). With patience 2,
# epochs 5 and 6 bring no gain and training stops before epoch 7 (-4, which would have been lower still).
SCHEDULE = (0.5, -1.0, 2.0, -3.0, 1.0, -2.0, -4.0, 0.0)


def stay_plan() -> pd.DataFrame:
    """Ground truth per stay i: split (i % 10: 0-5 train, 6-7 val, 8-9 test), mortality-task membership,
    whether a paired image exists (i % 4 != 0) and is usable (not CORRUPT_STAY)."""
    i = np.arange(N_STAYS)
    split = np.where(i % 10 < 6, "train", np.where(i % 10 < 8, "val", "test"))
    return pd.DataFrame({"i": i, "stay_id": 1000 + i, "subject_id": 1 + i, "split": split,
                         "in_mortality_task": i % 15 != 14, "paired": i % 4 != 0,
                         "usable": (i % 4 != 0) & (i != CORRUPT_STAY),
                         "length": 1 + i % HOURS, "cxr_hours": (i % 7).astype(float)})


def write_cell_files(tmp_path, label_from: str = "ehr") -> dict:
    """stays.parquet, ehr/mortality.nc and a hand-made image cache; mortality is (ehr value 0 at hour 0 > 0)
    or (the paired image is bright), depending on ``label_from``."""
    rng = np.random.default_rng(7)
    plan = stay_plan()
    values = rng.normal(size=(N_STAYS, HOURS, N_VALUES)).astype(np.float32)
    mask = rng.integers(0, 2, size=(N_STAYS, HOURS, N_VARIABLES)).astype(np.uint8)
    bright = rng.random(N_STAYS) < 0.4
    mortality = values[:, 0, 0] > 0 if label_from == "ehr" else bright
    dicom = np.where(plan["paired"], [f"img{i}" for i in plan["i"]], None)
    stays = plan[["stay_id", "subject_id", "split", "in_mortality_task"]].assign(
        mortality=mortality.astype(np.int8), cxr_dicom_id=dicom,
        cxr_hours=np.where(plan["paired"], plan["cxr_hours"], np.nan))
    stays_path = tmp_path / "stays.parquet"
    stays.to_parquet(stays_path)
    # the EHR file lists stays in reverse order, so the loader must align them by stay_id
    ehr = xr.Dataset({"values": (("stay", "hour", "feature"), values[::-1]),
                      "mask": (("stay", "hour", "variable"), mask[::-1]),
                      "length": (("stay",), plan["length"].to_numpy()[::-1])},
                     coords={"stay_id": ("stay", plan["stay_id"].to_numpy()[::-1])})
    ehr_path = tmp_path / "mortality.nc"
    ehr.to_netcdf(ehr_path, engine="h5netcdf")
    # cache rows in a shuffled order; pixel level 200 (bright) or 40 (dark) plus noise
    paired = plan.loc[plan["paired"], "i"].to_numpy()
    rows = rng.permutation(paired.size)
    images = np.zeros((paired.size, IMAGE, IMAGE), dtype=np.uint8)
    level = np.where(bright[paired], 200, 40)
    images[rows] = (level[:, None, None] + rng.integers(-20, 21, size=(paired.size, IMAGE, IMAGE))).astype(np.uint8)
    status = np.where(paired == CORRUPT_STAY, "corrupt", "ok")
    index = pd.DataFrame({"dicom_id": [f"img{i}" for i in paired], "row": np.where(status == "ok", rows, -1),
                          "status": status})
    images_path, index_path = tmp_path / "images.npy", tmp_path / "index.parquet"
    np.save(images_path, images)
    index.to_parquet(index_path)
    return {"stays": str(stays_path), "ehr": str(ehr_path), "cxr_index": str(index_path),
            "cxr_images": str(images_path), "values": values, "images": images, "row_of": dict(zip(paired, rows)),
            "mortality": mortality}


def load(files: dict, missing: str = "natural", seed: int = 1, with_cxr: bool = True, images: bool = True):
    return load_cell_data(files["stays"], files["ehr"], "mortality", missing, seed,
                          cxr_index_path=files["cxr_index"] if with_cxr else None,
                          cxr_images_path=files["cxr_images"] if (with_cxr and images) else None)


def test_natural_cell_sets_tensors_and_images(tmp_path):
    files = write_cell_files(tmp_path)
    data = load(files)
    plan = stay_plan()
    task = plan[plan["in_mortality_task"]]
    expected = {"train": task[task["split"] == "train"], "val": task[task["split"] == "val"],
                "paired_test": task[(task["split"] == "test") & task["usable"]],
                "partial_test": task[task["split"] == "test"]}
    assert data.labels == ["mortality"]
    for name, frame in expected.items():
        stay_set = data.splits[name]
        assert stay_set.stay_id.tolist() == frame["stay_id"].tolist(), name
        assert stay_set.has_cxr.tolist() == frame["usable"].astype(float).tolist(), name
    assert data.ehr_features == N_VALUES + N_VARIABLES

    train = data.splits["train"]
    batch = train.collate([0, 1, 2, 3, 4])  # stays i = 0, 1, 2, 3, 4 (all train)
    i = np.arange(5)
    np.testing.assert_array_equal(batch.ehr[:, :, :N_VALUES].numpy(), files["values"][i])
    assert batch.ehr_length.tolist() == [1, 2, 3, 4, 1]
    # cxr_hours = max(length - hours_from_intime, 0); stays 1..3 paired at hours 1, 2, 3 -> 1, 1, 1
    assert batch.cxr_hours.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert batch.has_cxr.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    row = files["row_of"][2]
    # collate serves the cached uint8 pixels; prepare_batch scales them on the device (zeros where missing)
    assert batch.cxr.dtype == torch.uint8 and batch.cxr.shape == (5, 1, IMAGE, IMAGE) and not batch.cxr[[0, 4]].any()
    np.testing.assert_array_equal(batch.cxr[2, 0].numpy(), files["images"][row])
    ready = prepare_batch(batch, torch.device("cpu"))
    np.testing.assert_allclose(ready.cxr[2, 0].numpy(), (files["images"][row] / 255.0 - 0.5) / 0.25, atol=1e-6)
    assert ready.cxr.dtype == torch.float32 and not ready.cxr[[0, 4]].any()
    assert batch.labels[:, 0].tolist() == files["mortality"][i].astype(float).tolist()
    # the corrupt image's stay (i = 5, train) has no CXR
    position = train.stay_id.tolist().index(1000 + CORRUPT_STAY)
    assert train.has_cxr[position] == 0 and train.cxr_row[position] == -1


def test_missing_rate_withholds_train_val_cxrs_only(tmp_path):
    files = write_cell_files(tmp_path)
    plan = stay_plan()
    usable = plan[plan["in_mortality_task"] & plan["usable"]]
    fit_pool = usable[usable["split"].isin(["train", "val"])]
    n_withheld = int(round(0.5 * len(fit_pool)))
    data = load(files, "miss0.5", seed=3)
    train, val = data.splits["train"], data.splits["val"]
    assert train.stay_id.tolist() + val.stay_id.tolist() == (
        fit_pool[fit_pool["split"] == "train"]["stay_id"].tolist() + fit_pool[fit_pool["split"] == "val"]["stay_id"].tolist())
    withheld = len(fit_pool) - int(train.has_cxr.sum() + val.has_cxr.sum())
    assert withheld == n_withheld
    assert (train.cxr_row[train.has_cxr == 0] == -1).all() and (train.cxr_hours[train.has_cxr == 0] == 0).all()
    assert data.splits["paired_test"].has_cxr.tolist() == [1.0] * len(usable[usable["split"] == "test"])
    partial = data.splits["partial_test"]
    assert partial.has_cxr.tolist() == plan[plan["in_mortality_task"] & (plan["split"] == "test")]["usable"].astype(float).tolist()
    again = load(files, "miss0.5", seed=3).splits["train"].has_cxr
    other = load(files, "miss0.5", seed=4).splits["train"].has_cxr
    assert torch.equal(again, train.has_cxr) and not torch.equal(other, train.has_cxr)
    assert int(load(files, "miss0.0").splits["train"].has_cxr.sum()) == (fit_pool["split"] == "train").sum()
    assert int(load(files, "miss1").splits["val"].has_cxr.sum()) == 0
    with pytest.raises(ValueError, match="miss<r>"):
        load(files, "miss1.5")


def test_without_cxr_data_every_stay_is_unpaired(tmp_path):
    files = write_cell_files(tmp_path)
    data = load(files, with_cxr=False)
    assert len(data.splits["paired_test"]) == 0
    assert all(int(s.has_cxr.sum()) == 0 for s in data.splits.values())
    assert data.splits["train"].collate([0, 1]).cxr.shape == (2, 1, 1, 1)


def _fit_tiny(files, out_dir, *, missing="natural", with_cxr=False, **overrides):
    data = load(files, missing, with_cxr=with_cxr)
    seed_everything(1)
    model = create_model("tiny_test_model", n_labels=1, ehr_features=data.ehr_features,
                         cxr={} if with_cxr else None)
    params = {**TRAIN, **overrides}
    device = params.pop("device")
    return model, data, fit(model, data, out_dir, seed=1, device=device, **params)


def test_trainer_learns_ehr_and_image_signals(tmp_path):
    (tmp_path / "ehr_data").mkdir()
    files = write_cell_files(tmp_path / "ehr_data")
    model, data, result = _fit_tiny(files, tmp_path / "ehr_run")
    assert result.best_val_auprc > 0.9
    history = pd.read_csv(tmp_path / "ehr_run" / "history.csv")
    assert history.columns.tolist() == ["epoch", "train_loss", "val_loss", "val_auprc", "val_auroc", "lr", "seconds"]
    assert (history["lr"] == TRAIN["lr"]).all()  # no scheduler
    assert result.best_epoch == history["epoch"][history["val_auprc"].idxmax()]
    # the selected model is the best validation epoch: its val AUPRC is reproduced by predict
    val = data.splits["val"]
    assert average_precision_score(val.labels[:, 0], predict(model, val, 64, "cpu")[:, 0]) == pytest.approx(
        history["val_auprc"].max())

    (tmp_path / "cxr_data").mkdir()
    image_files = write_cell_files(tmp_path / "cxr_data", label_from="image")
    _, _, image_result = _fit_tiny(image_files, tmp_path / "cxr_run", missing="miss0.0", with_cxr=True)
    assert image_result.best_val_auprc > 0.9


def test_early_stopping_after_patience_epochs_without_gain(tmp_path):
    files = write_cell_files(tmp_path)
    _, _, result = _fit_tiny(files, tmp_path / "run", lr=0.0, patience=2, epochs=10)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and result.stopped_early and result.best_epoch == 1


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    files = write_cell_files(tmp_path)
    _fit_tiny(files, tmp_path / "resumed", epochs=2)
    resumed_model, data, _ = _fit_tiny(files, tmp_path / "resumed", epochs=6)
    straight_model, _, _ = _fit_tiny(files, tmp_path / "straight", epochs=6)
    resumed = pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns="seconds")
    straight = pd.read_csv(tmp_path / "straight" / "history.csv").drop(columns="seconds")
    assert len(straight) == 6
    pd.testing.assert_frame_equal(resumed, straight)
    test = data.splits["partial_test"]
    np.testing.assert_array_equal(predict(resumed_model, test, 64, "cpu"), predict(straight_model, test, 64, "cpu"))


def _without_val_positives(files: dict) -> dict:
    """Rewrite the cell's stays.parquet so that no val stay is a death (train and test keep both classes)."""
    stays = pd.read_parquet(files["stays"])
    stays.loc[stays["split"] == "val", "mortality"] = 0
    stays.to_parquet(files["stays"])
    return files


def _fit_scheduled(files, out_dir, **overrides):
    data = load(files, with_cxr=False)
    model = create_model("scheduled_logit_test_model", n_labels=1, ehr_features=data.ehr_features,
                         schedule=SCHEDULE)
    params = {**TRAIN, "epochs": len(SCHEDULE), "patience": 2, **overrides}
    device = params.pop("device")
    return model, data, fit(model, data, out_dir, seed=1, device=device, **params)


def test_validation_loss_selects_when_no_val_label_has_both_classes(tmp_path, caplog):
    files = _without_val_positives(write_cell_files(tmp_path))
    inputs = {key: files[key] for key in ("stays", "ehr", "cxr_index")}
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        run_cell(inputs, tmp_path / "run", "mortality", "scheduled_logit_test_model", "natural", 1,
                 settings(["ehr"], {"schedule": list(SCHEDULE)}, train=_train_params(epochs=len(SCHEDULE), patience=2)))
    assert ("cell mortality/natural seed 1: the validation set has a single class for all 1 label(s), so validation "
            "AUPRC is undefined; selecting the epoch with the lowest validation loss instead") in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selection_metric"] == "val_loss" and metrics["val_labels_with_both_classes"] == 0
    assert metrics["best_epoch"] == 4
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]  # early stop: epochs 5, 6 without gain
    np.testing.assert_allclose(history["val_loss"], np.log1p(np.exp(SCHEDULE[:6])), rtol=1e-6)
    assert history["val_auprc"].isna().all()
    # the saved model is epoch 4's: every test probability is sigmoid(-3)
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    np.testing.assert_allclose(predictions["p_mortality"], 1 / (1 + np.exp(3.0)), rtol=1e-6)


def test_validation_loss_selection_resumes_exactly_and_older_checkpoints_restart(tmp_path, caplog):
    files = _without_val_positives(write_cell_files(tmp_path))
    _fit_scheduled(files, tmp_path / "resumed", epochs=3)  # best epoch 2 so far, one epoch without gain
    _, _, resumed = _fit_scheduled(files, tmp_path / "resumed")
    _, _, straight = _fit_scheduled(files, tmp_path / "straight")
    assert (resumed.best_epoch, resumed.epochs_run, resumed.selection_metric) == (4, 6, "val_loss")
    assert (straight.best_epoch, straight.epochs_run) == (4, 6) and np.isnan(straight.best_val_auprc)
    pd.testing.assert_frame_equal(resumed.history.drop(columns="seconds"), straight.history.drop(columns="seconds"))

    # a checkpoint without the criterion its best score was measured in (an older ehrcxr) is not resumed
    checkpoint_path = tmp_path / "resumed" / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    del checkpoint["selection_metric"]
    torch.save(checkpoint, checkpoint_path)
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        _, _, restarted = _fit_scheduled(files, tmp_path / "resumed")
    assert "written for other settings or inputs (or selection criterion)" in caplog.text
    assert restarted.history["epoch"].tolist() == [1, 2, 3, 4, 5, 6] and restarted.best_epoch == 4


def test_selection_criterion_counts_labels_with_both_classes(caplog):
    def cell(val_labels: list[list[int]]) -> CellData:
        n, n_labels = len(val_labels), len(val_labels[0])
        val = StaySet("val", np.arange(n), np.zeros((n, 1, 1)), np.zeros((n, 1, 1)), np.ones(n),
                      np.array(val_labels), np.zeros(n), np.zeros(n), np.full(n, -1), None)
        return CellData("phenotyping", "natural", 1, ["ph_a", "ph_b", "ph_c"][:n_labels], {"val": val}, 1)

    log = logging.getLogger("ehrcxr.train")
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        # ph_a and ph_c hold both classes, ph_b only positives
        assert selection_criterion(cell([[0, 1, 1], [1, 1, 0], [0, 1, 1]]), log) == ("val_auprc", 2)
    assert ("the validation set has a single class for 1 of 3 labels (ph_b); model selection uses the macro AUPRC "
            "of the other 2") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        assert selection_criterion(cell([[0, 1], [1, 0]]), log) == ("val_auprc", 2)
        assert caplog.text == ""
        assert selection_criterion(cell([[0, 1], [0, 1]]), log) == ("val_loss", 0)
    assert "single class for all 2 label(s)" in caplog.text


def _train_params(**overrides) -> dict:
    return {**TRAIN, "epochs": 3, **overrides}


def settings(modalities: list[str], params: dict, cxr: dict | None = None, train: dict | None = None) -> dict:
    """A model's resolved settings as ``ehrcxr.settings.model_settings`` gives them to ``run_cell``."""
    return {"modalities": modalities, "pretrained": [], "params": params, "cxr": cxr or {},
            "train": train or _train_params()}


def test_run_cell_outputs_and_determinism(tmp_path):
    files = write_cell_files(tmp_path)
    inputs = {key: files[key] for key in ("stays", "ehr", "cxr_index", "cxr_images")}
    for name in ("a", "b"):
        run_cell(inputs, tmp_path / name, "mortality", "tiny_test_model", "natural", 2,
                 settings(["ehr", "cxr"], {"dropout": 0.2}, cxr={"image_size": IMAGE}))
    for file in ("predictions.parquet", "metrics.json", "model.pt", "history.csv", "checkpoint.pt"):
        assert (tmp_path / "a" / file).is_file(), file
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first == json.loads((tmp_path / "b" / "metrics.json").read_text())

    predictions = pd.read_parquet(tmp_path / "a" / "predictions.parquet")
    assert predictions.columns.tolist() == ["stay_id", "eval_set", "has_cxr", "y_mortality", "p_mortality",
                                            "p_nocxr_mortality", "p_noehr_mortality"]
    assert predictions[["p_mortality", "p_nocxr_mortality", "p_noehr_mortality"]].stack().between(0, 1).all()
    plan = stay_plan()
    val = plan[plan["in_mortality_task"] & (plan["split"] == "val")]
    assert predictions.loc[predictions["eval_set"] == "val", "stay_id"].tolist() == val["stay_id"].tolist()
    # withholding the X-ray of a stay that has none changes nothing; withholding an X-ray or the EHR changes scores
    without = predictions[(predictions["eval_set"] == "partial_test") & (predictions["has_cxr"] == 0)]
    np.testing.assert_array_equal(without["p_nocxr_mortality"], without["p_mortality"])
    with_cxr = predictions[predictions["has_cxr"] == 1]
    assert (with_cxr["p_nocxr_mortality"] != with_cxr["p_mortality"]).all()
    assert (predictions["p_noehr_mortality"] != predictions["p_mortality"]).mean() > 0.9
    test = plan[plan["in_mortality_task"] & (plan["split"] == "test")]
    paired = predictions[predictions["eval_set"] == "paired_test"]
    assert paired["stay_id"].tolist() == test.loc[test["usable"], "stay_id"].tolist()
    assert (predictions["eval_set"] == "partial_test").sum() == len(test)
    assert first["n_stays"]["paired_test"] == test["usable"].sum() and first["n_stays"]["partial_test"] == len(test)
    for eval_set in ("paired_test", "partial_test"):
        part = predictions[predictions["eval_set"] == eval_set]
        assert first["metrics"][eval_set]["auroc"] == pytest.approx(roc_auc_score(part["y_mortality"], part["p_mortality"]))
        assert first["metrics"][eval_set]["auprc"] == pytest.approx(
            average_precision_score(part["y_mortality"], part["p_mortality"]))
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert first["best_epoch"] == history["epoch"][history["val_auprc"].idxmax()]
    assert first["selection_metric"] == "val_auprc" and first["val_labels_with_both_classes"] == 1


def test_real_models_and_frozen_prefix_features(tmp_path, caplog):
    files = write_cell_files(tmp_path)
    inputs = {key: files[key] for key in ("stays", "ehr", "cxr_index", "cxr_images")}
    run_cell(inputs, tmp_path / "lstm", "mortality", "ehr_lstm", "natural", 1,
             settings(["ehr"], {"hidden": 8}, train=_train_params(epochs=2)))
    assert len(pd.read_csv(tmp_path / "lstm" / "history.csv")) == 2
    cxr = {"depth": 18, "weights": None, "frozen_stages": 2, "image_size": IMAGE}
    with caplog.at_level(logging.INFO, logger="ehrcxr"):
        run_cell(inputs, tmp_path / "fusion", "mortality", "late_fusion", "natural", 1,
                 settings(["ehr", "cxr"], {"hidden": 8, "heads": 2}, cxr=cxr, train=_train_params(epochs=1)))
    assert "frozen CXR prefix" in caplog.text
    predictions = pd.read_parquet(tmp_path / "fusion" / "predictions.parquet")
    assert predictions["p_mortality"].between(0, 1).all() and len(predictions) > 0

    # serving precomputed prefix features gives the same predictions as running the prefix on images
    data = load(files)
    seed_everything(0)
    model = create_model("late_fusion", n_labels=1, ehr_features=data.ehr_features, cxr=cxr, hidden=8, heads=2)
    from_images = predict(model, data.splits["paired_test"], 64, "cpu")
    assert precompute_cxr_features(model, data, torch.device("cpu"), 32, logging.getLogger("test")) > 0
    assert data.splits["paired_test"].collate([0]).cxr.shape[1:] == (128, 2, 2)  # layer2 output of a 16 px image
    np.testing.assert_allclose(predict(model, data.splits["paired_test"], 64, "cpu"), from_images, rtol=1e-5, atol=1e-6)


def test_stored_pooled_features_replace_the_frozen_encoder_and_must_match_it(tmp_path, caplog):
    files = write_cell_files(tmp_path)
    torch.manual_seed(11)
    backbone = CXRBackbone(depth=18, frozen_stages=4).eval()
    encoder = tmp_path / "encoder.pt"
    torch.save(backbone.backbone_state_dict(), encoder)
    assert cxr_features(encoder, files["cxr_images"], tmp_path / "features.npy", depth=18) == len(files["images"])
    stored = np.load(tmp_path / "features.npy")
    # row i is the whole frozen ResNet (conv stages + global average pool) applied to cache image i
    with torch.no_grad():
        expected = backbone(normalise_images(files["images"])).numpy()
    assert stored.shape == (len(files["images"]), 512) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)

    inputs = {key: files[key] for key in ("stays", "ehr", "cxr_index", "cxr_images")} | {"cxr_encoder": str(encoder)}
    cxr = {"depth": 18, "weights": None, "frozen_stages": 4, "image_size": IMAGE}
    cell = settings(["ehr", "cxr"], {"hidden": 8, "heads": 2}, cxr=cxr, train=_train_params(epochs=2))
    with caplog.at_level(logging.INFO, logger="ehrcxr"):
        run_cell(inputs, tmp_path / "computed", "mortality", "late_fusion", "natural", 1, cell)
        run_cell(inputs | {"cxr_features": str(tmp_path / "features.npy")}, tmp_path / "stored", "mortality",
                 "late_fusion", "natural", 1, cell)
    assert "features (512, 1, 1) read from" in caplog.text and "features (512, 1, 1) computed" in caplog.text
    computed, read = (pd.read_parquet(tmp_path / name / "predictions.parquet") for name in ("computed", "stored"))
    np.testing.assert_allclose(read["p_mortality"], computed["p_mortality"], rtol=1e-4, atol=1e-6)

    # features of another encoder, or of another image cache, are refused before training
    np.save(tmp_path / "other.npy", stored + 0.05 * np.abs(stored).max())
    with pytest.raises(ValueError, match=r"other\.npy: stored CXR features differ from this model's frozen encoder"):
        run_cell(inputs | {"cxr_features": str(tmp_path / "other.npy")}, tmp_path / "other", "mortality",
                 "late_fusion", "natural", 1, cell)
    np.save(tmp_path / "short.npy", stored[:-1])
    with pytest.raises(ValueError, match=r"short\.npy: CXR features of shape \(\d+, 512\) do not fit the image cache"):
        run_cell(inputs | {"cxr_features": str(tmp_path / "short.npy")}, tmp_path / "short", "mortality",
                 "late_fusion", "natural", 1, cell)


def test_pretrain_uses_train_subjects_and_saves_a_loadable_backbone(tmp_path):
    files = write_cell_files(tmp_path)
    plan = stay_plan()
    paired = plan[plan["paired"]]
    rng = np.random.default_rng(3)
    raw = rng.choice(np.array([1.0, 0.0, -1.0, np.nan]), size=(len(paired), len(CHEXPERT_LABELS)))
    studies = pd.DataFrame(raw, columns=CHEXPERT_LABELS).assign(
        stay_id=paired["stay_id"].to_numpy(), subject_id=paired["subject_id"].to_numpy(),
        dicom_id=[f"img{i}" for i in paired["i"]], view_position="AP")
    lateral = studies.iloc[:3].assign(dicom_id=["lat0", "lat1", "lat2"], view_position="LATERAL")
    studies_path = tmp_path / "cxr_studies.parquet"
    pd.concat([studies, lateral]).to_parquet(studies_path)

    table = chexpert_image_labels(pd.read_parquet(studies_path), pd.read_parquet(files["stays"]),
                                  pd.read_parquet(files["cxr_index"]))
    usable = paired[paired["usable"]].assign(dicom_id=lambda f: "img" + f["i"].astype(str)).sort_values("dicom_id")
    assert table["dicom_id"].tolist() == usable["dicom_id"].tolist()
    assert table["split"].tolist() == usable["split"].tolist()
    expected_targets = (raw[paired["usable"].to_numpy()] == 1).astype(np.float32)
    by_dicom = pd.DataFrame(expected_targets, index=paired.loc[paired["usable"], "i"].map(lambda i: f"img{i}"))
    np.testing.assert_array_equal(table[CHEXPERT_LABELS].to_numpy(), by_dicom.loc[table["dicom_id"]].to_numpy())

    out, history_path = tmp_path / "encoder.pt", tmp_path / "pretrain_history.csv"
    summary = pretrain_cxr(studies_path, files["stays"], files["cxr_images"], files["cxr_index"], out, history_path,
                           depth=18, weights=None, epochs=2, batch_size=16, lr=1e-3, weight_decay=0.0, seed=0,
                           device="cpu")
    history = pd.read_csv(history_path)
    assert history["epoch"].tolist() == [1, 2]
    assert summary["best_epoch"] == history["epoch"][history["val_auroc"].idxmax()]
    assert summary["n_train"] == (usable["split"] == "train").sum() and summary["n_val"] == (usable["split"] == "val").sum()
    backbone = CXRBackbone(18, None, frozen_stages=2)
    backbone.load_pretrained(out)
    saved = torch.load(out, weights_only=True)
    torch.testing.assert_close(backbone.backbone_state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_macro_scores_of_one_label_many_labels_and_an_empty_set():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([0.1, 0.8, 0.4, 0.3])
    auprc, auroc = macro_scores(labels, probabilities)
    assert auroc == pytest.approx(1.0) and auprc == pytest.approx(1.0)
    two = np.stack([labels, 1 - labels], axis=1)
    # second label: positives are rows 0 and 3 with scores 0.9 and 0.7 against 0.2 and 0.6 -> AUROC 1.0
    auprc, auroc = macro_scores(two, np.stack([probabilities, 1 - probabilities], axis=1))
    assert auroc == pytest.approx(1.0)
    # an empty paired test set (no X-rays at all): undefined, not a crash
    assert all(np.isnan(v) for v in macro_scores(np.zeros((0, 25)), np.zeros((0, 25))))
    assert all(np.isnan(v) for v in macro_scores(np.zeros(0), np.zeros(0)))


def test_checkpoint_of_other_settings_or_unreadable_is_ignored(tmp_path, caplog):
    files = write_cell_files(tmp_path)
    _fit_tiny(files, tmp_path / "run", epochs=2, lr=0.05, run_key="settings-a")
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        model, data, result = _fit_tiny(files, tmp_path / "run", epochs=3, run_key="settings-b")
    assert "written for other settings or inputs" in caplog.text
    fresh_model, _, _ = _fit_tiny(files, tmp_path / "fresh", epochs=3, run_key="settings-b")
    history = pd.read_csv(tmp_path / "run" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history, pd.read_csv(tmp_path / "fresh" / "history.csv").drop(columns="seconds"))
    assert history["epoch"].tolist() == [1, 2, 3] and result.epochs_run == 3
    test = data.splits["partial_test"]
    np.testing.assert_array_equal(predict(model, test, 64, "cpu"), predict(fresh_model, test, 64, "cpu"))

    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ehrcxr.train"):
        _, _, result = _fit_tiny(files, tmp_path / "run", epochs=3, run_key="settings-b")
    assert "ignoring unreadable checkpoint" in caplog.text and result.epochs_run == 3


def test_run_key_tracks_settings_and_inputs_but_not_the_device(tmp_path):
    stays, ehr = tmp_path / "stays.parquet", tmp_path / "ehr.nc"
    stays.write_bytes(b"a")
    ehr.write_bytes(b"b")
    inputs = {"stays": str(stays), "ehr": str(ehr)}
    cell = ("mortality", "ehr_lstm", "natural", 1)

    def key_of(hidden: int = 8, lr: float = 0.1, device: str = "cpu") -> str:
        return run_key(inputs, *cell, {"params": {"hidden": hidden}, "cxr": {}, "train": {"lr": lr, "device": device}})

    key = key_of()
    assert key_of(device="cuda") == key
    assert key_of(lr=0.2) != key
    assert key_of(hidden=16) != key
    ehr.write_bytes(b"bb")  # a regenerated input
    assert key_of() != key


def test_shuffle_order_depends_only_on_the_sampler_generator():
    """Creating extra iterators (as worker start-up or a resumed run does) must not shift the order."""
    from ehrcxr.train.loop import _loader

    class Items(torch.utils.data.Dataset):
        collate = staticmethod(lambda items: list(items))

        def __len__(self):
            return 10

        def __getitem__(self, index):
            return index

    def order(extra_iterators: int) -> list[int]:
        loader = _loader(Items(), 10, torch.device("cpu"), 1, torch.Generator().manual_seed(3))
        for _ in range(extra_iterators):
            iter(loader)
        return next(iter(loader))

    assert sorted(order(0)) == list(range(10)) and order(0) != list(range(10))
    assert order(2) == order(0)
