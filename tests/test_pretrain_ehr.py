"""EHR-encoder pretraining (MedFuse's first stage) on a tiny generated mortality task."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from ehrcxr.data.datasets import load_cell_data
from ehrcxr.models import create_model
from ehrcxr.models.encoders import EHRTransformerEncoder
from ehrcxr.train.pretrain import EHRPretrainClassifier, pretrain_ehr

N_STAYS, HOURS, N_VALUES, N_VARIABLES = 120, 4, 3, 2
PARAMS = {"hidden": 8, "dropout": 0.0, "ehr_layers": 1}
TRAIN = dict(epochs=3, batch_size=16, lr=0.05, weight_decay=0.0, patience=5, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def write_cell_files(tmp_path) -> dict:
    """stays.parquet and ehr/mortality.nc: stay i is train (i % 10 < 6), val (6, 7) or test (8, 9), in the
    mortality task unless i % 15 == 14, and dies when its first EHR value at hour 0 is positive. No images."""
    rng = np.random.default_rng(11)
    i = np.arange(N_STAYS)
    values = rng.normal(size=(N_STAYS, HOURS, N_VALUES)).astype(np.float32)
    mask = rng.integers(0, 2, size=(N_STAYS, HOURS, N_VARIABLES)).astype(np.uint8)
    stays = pd.DataFrame({"stay_id": 500 + i, "subject_id": 1 + i,
                          "split": np.where(i % 10 < 6, "train", np.where(i % 10 < 8, "val", "test")),
                          "in_mortality_task": i % 15 != 14, "mortality": (values[:, 0, 0] > 0).astype(np.int8),
                          "cxr_dicom_id": None, "cxr_hours": np.nan})
    stays.to_parquet(tmp_path / "stays.parquet")
    xr.Dataset({"values": (("stay", "hour", "feature"), values), "mask": (("stay", "hour", "variable"), mask),
                "length": (("stay",), 1 + i % HOURS)},
               coords={"stay_id": ("stay", stays["stay_id"].to_numpy())}).to_netcdf(
        tmp_path / "mortality.nc", engine="h5netcdf")
    return {"stays": tmp_path / "stays.parquet", "ehr": tmp_path / "mortality.nc", "plan": stays}


@pytest.fixture
def cell_files(tmp_path) -> dict:
    return write_cell_files(tmp_path)


def test_pretrained_ehr_encoder_is_the_selected_epochs_and_loads_into_a_fresh_model(tmp_path, cell_files):
    out, run_dir = tmp_path / "pretrain" / "medfuse.pt", tmp_path / "pretrain" / "medfuse"
    train = {**TRAIN, "optimiser": "adam", "selection": "val_auroc"}  # the model's train settings reach fit
    summary = pretrain_ehr(cell_files["stays"], cell_files["ehr"], out, run_dir, task="mortality", model="medfuse",
                           params=PARAMS, train=train, seed=1)

    plan = cell_files["plan"][cell_files["plan"]["in_mortality_task"]]
    # 72 train stays, 4 of them (i = 14, 44, 74, 104) outside the task; 24 val stays, all in it
    assert summary["n_train"] == (plan["split"] == "train").sum() == 68
    assert summary["n_val"] == (plan["split"] == "val").sum() == 24
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert summary["selection_metric"] == "val_auroc"
    assert summary["best_epoch"] == history["epoch"][history["val_auroc"].idxmax()]
    assert history["val_auroc"].idxmax() != history["val_auprc"].idxmax()  # here the criteria pick other epochs

    # the saved state is the encoder part of fit's best (selected) classifier state, on the CPU
    saved = torch.load(out, weights_only=True)
    best = torch.load(run_dir / "model.pt", weights_only=True)
    encoder_part = {key.removeprefix("encoder."): value for key, value in best.items() if key.startswith("encoder.")}
    assert saved.keys() == encoder_part.keys()
    for key, value in saved.items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, encoder_part[key])

    # it loads (strictly) into a fresh MedFuse's ehr_encoder and is not the fresh (same seed) initialisation
    torch.manual_seed(1)
    fresh = create_model("medfuse", n_labels=1, ehr_features=N_VALUES + N_VARIABLES, cxr=None, **PARAMS)
    initial = {key: value.clone() for key, value in fresh.ehr_encoder.state_dict().items()}
    fresh.ehr_encoder.load_state_dict(saved, strict=True)
    assert any(not torch.equal(initial[key], saved[key]) for key in saved)
    for key, value in fresh.ehr_encoder.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_a_model_without_an_ehr_encoder_is_a_clear_error(tmp_path, cell_files):
    with pytest.raises(ValueError, match="model 'cxr_resnet' has no ehr_encoder, so it cannot declare a pretrained "
                                         "'ehr' part"):
        pretrain_ehr(cell_files["stays"], cell_files["ehr"], tmp_path / "x.pt", tmp_path / "x", task="mortality",
                     model="cxr_resnet", params={"hidden": 8}, train=TRAIN, seed=1)
    assert not (tmp_path / "x.pt").exists()


def test_classifier_heads_the_pooled_feature_of_a_transformer_encoder(cell_files):
    data = load_cell_data(cell_files["stays"], cell_files["ehr"], "mortality", "natural", 1)
    batch = data.splits["val"].collate(list(range(5)))
    torch.manual_seed(0)
    encoder = EHRTransformerEncoder(N_VALUES + N_VARIABLES, 8, heads=2)
    classifier = EHRPretrainClassifier(encoder, n_labels=1, dropout=0.5).eval()
    pooled, _ = encoder(batch.ehr, batch.ehr_length)
    output = classifier(batch)
    assert output.logits.shape == (5, 1) and output.aux_losses == {}
    torch.testing.assert_close(output.logits, pooled @ classifier.head.weight.T + classifier.head.bias)
