"""A training job killed with SIGKILL resumes from its last epoch checkpoint when rerun and ends with exactly
the result of an uninterrupted run (CPU, same seed); two uninterrupted runs are identical.

Each run is a real child process calling ``run_cell``, as the workflow's train rule does."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
N_STAYS, HOURS, N_VALUES, N_VARIABLES = 600, 24, 6, 3
SEED, EPOCHS = 3, 20
TRAIN = {"epochs": EPOCHS, "batch_size": 16, "lr": 0.01, "weight_decay": 0.01, "patience": EPOCHS, "device": "cpu"}
MODEL = {"modalities": ["ehr"], "params": {"hidden": 64, "dropout": 0.3}}
METRICS_KEYS = {"task", "model", "missing", "seed", "labels", "n_stays", "best_epoch", "augmented", "selection_metric",
                "val_labels_with_both_classes", "metrics"}
# what snakemake's train rule declares as outputs; it deletes them before it reruns an interrupted job
DECLARED_OUTPUTS = ("metrics.json", "predictions.parquet", "model.pt", "history.csv")
RUN_CELL = """
import json, sys
from ehrcxr.logs import log_to
from ehrcxr.train.cell import run_cell
log_to(None)
run_cell(**json.loads(sys.argv[1]))
"""


def stay_index() -> np.ndarray:
    return np.arange(N_STAYS)


def expected_sizes() -> dict[str, int]:
    """Stays per set of the cell written by ``write_cell_inputs``: split by i % 10 (0-5 train, 6-7 val,
    8-9 test), a paired image when i % 3 != 0."""
    i = stay_index()
    test = i % 10 >= 8
    return {"train": int((i % 10 < 6).sum()), "val": int(((i % 10 >= 6) & (i % 10 < 8)).sum()),
            "paired_test": int((test & (i % 3 != 0)).sum()), "partial_test": int(test.sum())}


def write_cell_inputs(directory: Path) -> dict:
    """stays.parquet, mortality.nc and a CXR index; mortality is a noisy threshold of the first value at
    hour 0, so validation AUPRC keeps moving between epochs."""
    rng = np.random.default_rng(11)
    i = stay_index()
    split = np.where(i % 10 < 6, "train", np.where(i % 10 < 8, "val", "test"))
    values = rng.normal(size=(N_STAYS, HOURS, N_VALUES)).astype(np.float32)
    mask = rng.integers(0, 2, size=(N_STAYS, HOURS, N_VARIABLES)).astype(np.uint8)
    mortality = (values[:, 0, 0] + rng.normal(size=N_STAYS) > 0.5).astype(np.int8)
    paired = i % 3 != 0
    dicom = [f"img{k}" for k in i]
    stays = pd.DataFrame({"stay_id": 5000 + i, "subject_id": 1 + i, "split": split, "in_mortality_task": True,
                          "mortality": mortality, "cxr_dicom_id": np.where(paired, dicom, None),
                          "cxr_hours": np.where(paired, 2.0, np.nan)})
    index = pd.DataFrame({"dicom_id": np.asarray(dicom)[paired], "row": np.arange(paired.sum()), "status": "ok"})
    ehr = xr.Dataset({"values": (("stay", "hour", "feature"), values),
                      "mask": (("stay", "hour", "variable"), mask),
                      "length": (("stay",), 1 + i % HOURS)},
                     coords={"stay_id": ("stay", 5000 + i)})
    paths = {"stays": directory / "stays.parquet", "ehr": directory / "mortality.nc",
             "cxr_index": directory / "index.parquet"}
    stays.to_parquet(paths["stays"])
    index.to_parquet(paths["cxr_index"])
    ehr.to_netcdf(paths["ehr"], engine="h5netcdf")
    return {key: str(path) for key, path in paths.items()}


def start_run(inputs: dict, out_dir: Path, log_path: Path) -> subprocess.Popen:
    """Start ``run_cell`` on the cell in a child process logging to ``log_path``."""
    arguments = {"inputs": inputs, "out_dir": str(out_dir), "task": "mortality", "model": "ehr_lstm",
                 "missing": "natural", "seed": SEED, "settings": {**MODEL, "train": TRAIN, "cxr": {}},
                 "threads": 1}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-c", RUN_CELL, json.dumps(arguments)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def run_to_completion(inputs: dict, out_dir: Path, log_path: Path) -> str:
    """Run the cell to the end; returns its log."""
    process = start_run(inputs, out_dir, log_path)
    assert process.wait(timeout=300) == 0, log_path.read_text()
    return log_path.read_text()


def kill_when(process: subprocess.Popen, ready, log_path: Path) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fails if the process ends first."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def epochs_logged(log: str) -> list[int]:
    return [int(epoch) for epoch in re.findall(r"epoch (\d+): train loss", log)]


def history_rows(out_dir: Path) -> int:
    """Epoch rows in history.csv (written atomically after each epoch's checkpoint); 0 before the first."""
    path = out_dir / "history.csv"
    return path.read_text().count("\n") - 1 if path.exists() else 0


def assert_same_result(run: Path, reference: Path) -> None:
    """Identical metrics.json text, predictions, best model weights and history (but for its timing column)."""
    assert (run / "metrics.json").read_text() == (reference / "metrics.json").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(run / "predictions.parquet"),
                                  pd.read_parquet(reference / "predictions.parquet"), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(run / "history.csv").drop(columns="seconds"),
                                  pd.read_csv(reference / "history.csv").drop(columns="seconds"), check_exact=True)
    weights = torch.load(run / "model.pt", weights_only=True)
    reference_weights = torch.load(reference / "model.pt", weights_only=True)
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[key], reference_weights[key]) for key in weights)
    assert not list(run.glob("*.tmp"))


@pytest.fixture(scope="module")
def cell_inputs(tmp_path_factory) -> dict:
    return write_cell_inputs(tmp_path_factory.mktemp("cell"))


@pytest.fixture(scope="module")
def uninterrupted(cell_inputs, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run_to_completion(cell_inputs, out_dir, out_dir.parent / "run.log")
    assert epochs_logged(log) == list(range(1, EPOCHS + 1)) and "resuming" not in log
    return out_dir


def test_two_uninterrupted_runs_are_identical(cell_inputs, uninterrupted, tmp_path):
    run_to_completion(cell_inputs, tmp_path / "again", tmp_path / "again.log")
    assert_same_result(tmp_path / "again", uninterrupted)
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS  # no wall-clock field, so exact equality is the right test
    assert metrics["n_stays"] == expected_sizes()
    history = pd.read_csv(uninterrupted / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert metrics["best_epoch"] == history["epoch"][history["val_auprc"].idxmax()]
    assert metrics["selection_metric"] == "val_auprc" and metrics["val_labels_with_both_classes"] == 1


def test_killed_after_an_epoch_checkpoint_resumes_to_the_uninterrupted_result(cell_inputs, uninterrupted, tmp_path):
    out_dir = tmp_path / "run"
    process = start_run(cell_inputs, out_dir, tmp_path / "killed.log")
    kill_when(process, lambda: history_rows(out_dir) >= 2, tmp_path / "killed.log")
    assert not (out_dir / "metrics.json").exists()
    resumed_after = torch.load(out_dir / "checkpoint.pt", weights_only=False)["epoch"]
    assert 2 <= resumed_after < EPOCHS
    # rerun as snakemake would: the declared outputs of the killed job deleted; plus what a kill inside
    # torch.save leaves behind, half-written temporaries
    for name in DECLARED_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    for name in ("checkpoint.pt.tmp", "model.pt.tmp"):
        (out_dir / name).write_bytes(b"PK\x03\x04 truncated by SIGKILL")

    log = run_to_completion(cell_inputs, out_dir, tmp_path / "rerun.log")
    assert f"resuming from {out_dir / 'checkpoint.pt'} after epoch {resumed_after}" in log
    assert epochs_logged(log) == list(range(resumed_after + 1, EPOCHS + 1))
    assert_same_result(out_dir, uninterrupted)


def test_killed_before_the_first_checkpoint_restarts_from_scratch(cell_inputs, uninterrupted, tmp_path):
    out_dir = tmp_path / "run"
    log_path = tmp_path / "killed.log"
    process = start_run(cell_inputs, out_dir, log_path)
    # the cell's data are loaded (logged just before training starts) and epoch 1 has not ended yet
    kill_when(process, lambda: "cell mortality/natural" in log_path.read_text(), log_path)
    assert not (out_dir / "checkpoint.pt").exists()

    log = run_to_completion(cell_inputs, out_dir, tmp_path / "rerun.log")
    assert "resuming" not in log and epochs_logged(log) == list(range(1, EPOCHS + 1))
    assert_same_result(out_dir, uninterrupted)


def test_a_checkpoint_that_no_longer_fits_the_model_is_ignored(cell_inputs, uninterrupted, tmp_path):
    # the same settings and inputs (same run key) but weights of another shape, as after a change of the model's code
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    checkpoint = torch.load(uninterrupted / "checkpoint.pt", weights_only=False)
    name = next(key for key, value in checkpoint["model"].items() if value.dim() == 2)
    checkpoint["model"][name] = torch.zeros(checkpoint["model"][name].shape[0] + 1, checkpoint["model"][name].shape[1])
    torch.save(checkpoint, out_dir / "checkpoint.pt")
    log = run_to_completion(cell_inputs, out_dir, tmp_path / "rerun.log")
    assert "weights do not fit the model" in log and "resuming" not in log
    assert epochs_logged(log) == list(range(1, EPOCHS + 1))
    assert_same_result(out_dir, uninterrupted)
